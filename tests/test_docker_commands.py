"""The exact Docker commands the role runs on the cloud, rendered by Ansible from the
role's own definitions (no Docker engine here: the commands are checked, not run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PLAYBOOKS

CLOUD_VARS = {
    "runner": "docker", "user_dir": "/home/ubuntu/efs/ana", "efs_mount_point": "/home/ubuntu/efs",
    "cifar_data_dir": "/home/ubuntu/efs/data/cifar10", "run_id": "run-1", "epochs": 2,
    "dcgan_master_addr": "172.31.5.10",
    "dcgan_image_hash": "0123456789ab",
}


def render(tmp_path: Path, **extra: object) -> dict[str, dict[str, str]]:
    """dcgan_build_command and dcgan_rank_command for two nodes, as the playbooks see them."""
    playbook = tmp_path / "render.yaml"
    playbook.write_text(f"""
- hosts: all
  gather_facts: false
  vars_files: [{PLAYBOOKS / "dcgan_defaults.yaml"}]
  tasks:
    - ansible.builtin.copy:
        dest: "{tmp_path}/{{{{ inventory_hostname }}}}.json"
        content: "{{{{ {{'build': dcgan_build_command, 'rank': dcgan_rank_command}} | to_json }}}}"
        mode: "0644"
      delegate_to: localhost
""")
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(json.dumps({"all": {"hosts": {
        "node-a": {"node_rank": 0, "ansible_connection": "local"},
        "node-b": {"node_rank": 1, "ansible_connection": "local"}}}}))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), str(playbook),
         "-e", json.dumps({**CLOUD_VARS, **extra, "ansible_python_interpreter": sys.executable})],
        capture_output=True, text=True, env={**os.environ, "ANSIBLE_NOCOLOR": "1"}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return {host: json.loads((tmp_path / f"{host}.json").read_text()) for host in ("node-a", "node-b")}


def test_build_command_tags_the_image_with_its_hash(tmp_path: Path) -> None:
    build = render(tmp_path)["node-a"]["build"]
    assert build == ("docker build -t dcgan:0123456789ab -t dcgan:latest /home/ubuntu/efs/ana/Distributed-DCGAN")


def test_run_command_per_rank(tmp_path: Path) -> None:
    commands = render(tmp_path)
    for host, rank in (("node-a", 0), ("node-b", 1)):
        assert commands[host]["rank"] == (
            f"docker run --rm --name dcgan-run-1-{rank} --network=host"
            " -e GLOO_SOCKET_IFNAME -e OMP_NUM_THREADS -e PYTHONUNBUFFERED"  # set by the rank's watchdog
            " -v /home/ubuntu/efs/ana:/home/ubuntu/efs/ana"
            " -v /home/ubuntu/efs/data/cifar10:/home/ubuntu/efs/data/cifar10"
            " -w /home/ubuntu/efs/ana/Distributed-DCGAN dcgan:latest python -m torch.distributed.run"
            f" --nnodes 2 --node_rank {rank} --master_addr 172.31.5.10 --master_port 29500 --nproc_per_node 1"
            " --rdzv-conf timeout=120 /home/ubuntu/efs/ana/Distributed-DCGAN/dist_dcgan.py --dataset cifar10"
            " --dataroot /home/ubuntu/efs/data/cifar10 --test_data --num_epochs 2"
            " --out_folder /home/ubuntu/efs/ana/runs/run-1")


def test_native_command_and_app_args(tmp_path: Path) -> None:
    rank = render(tmp_path, runner="native", dcgan_python="/opt/venv/bin/python",
                  app_args="--max_workers 0 --batch_size 16", epochs=5)["node-b"]["rank"]
    assert rank.startswith("/opt/venv/bin/python -m torch.distributed.run --nnodes 2 --node_rank 1 ")
    assert rank.endswith("--num_epochs 5 --out_folder /home/ubuntu/efs/ana/runs/run-1 --max_workers 0 --batch_size 16")


@pytest.mark.parametrize("action", ["setup", "run", "results"])
def test_playbooks_pass_ansible_syntax_check(action: str) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "--syntax-check",
                           str(PLAYBOOKS / f"dcgan_{action}.yaml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
