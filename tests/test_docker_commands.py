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
    """dcgan_build_command, dcgan_rank_command and how EFS is mounted, for two nodes, as the playbooks see them."""
    playbook = tmp_path / "render.yaml"
    playbook.write_text(f"""
- hosts: all
  gather_facts: false
  vars_files: [{PLAYBOOKS / "dcgan_defaults.yaml"}]
  tasks:
    - ansible.builtin.copy:
        dest: "{tmp_path}/{{{{ inventory_hostname }}}}.json"
        content: "{{{{ {{'build': dcgan_build_command, 'rank': dcgan_rank_command,
                     'mount': [efs_source, efs_fstype, efs_mount_options, efs_packages]}} | to_json }}}}"
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


def test_run_command_mounts_an_app_outside_user_dir(tmp_path: Path) -> None:
    rank = render(tmp_path, dcgan_dir="/home/ubuntu/src/dcgan")["node-a"]["rank"]
    assert " -v /home/ubuntu/efs/ana:/home/ubuntu/efs/ana -v /home/ubuntu/src/dcgan:/home/ubuntu/src/dcgan " in rank
    assert " -w /home/ubuntu/src/dcgan dcgan:latest " in rank
    # The app at user_dir itself: one mount (Docker refuses the same path twice).
    rank = render(tmp_path, dcgan_dir="/home/ubuntu/efs/ana")["node-a"]["rank"]
    assert rank.count("-v /home/ubuntu/efs/ana:") == 1


def test_run_command_mounts_each_folder_once(tmp_path: Path) -> None:
    """Docker refuses a path mounted twice: data in user_dir itself, or inside an app outside it."""
    rank = render(tmp_path, cifar_data_dir="/home/ubuntu/efs/ana/")["node-a"]["rank"]
    assert rank.count(" -v ") == 1 and " -v /home/ubuntu/efs/ana:/home/ubuntu/efs/ana " in rank
    rank = render(tmp_path, dcgan_dir="/srv/app", cifar_data_dir="/srv/app/data")["node-a"]["rank"]
    assert " -v /home/ubuntu/efs/ana:/home/ubuntu/efs/ana -v /srv/app:/srv/app -w /srv/app " in rank
    assert rank.count(" -v ") == 2


def test_commands_quote_a_folder_with_a_space(tmp_path: Path) -> None:
    commands = render(tmp_path, dcgan_dir="/home/ubuntu/my app")["node-a"]
    assert commands["build"].endswith(" -t dcgan:latest '/home/ubuntu/my app'")
    assert " -v '/home/ubuntu/my app:/home/ubuntu/my app' " in commands["rank"]
    assert " -w '/home/ubuntu/my app' dcgan:latest " in commands["rank"]


def test_native_command_and_app_args(tmp_path: Path) -> None:
    rank = render(tmp_path, runner="native", dcgan_python="/opt/venv/bin/python",
                  app_args=["--max_workers", "0", "--batch_size", "16"], epochs=5)["node-b"]["rank"]
    assert rank.startswith("/opt/venv/bin/python -m torch.distributed.run --nnodes 2 --node_rank 1 ")
    assert rank.endswith("--num_epochs 5 --out_folder /home/ubuntu/efs/ana/runs/run-1 --max_workers 0 --batch_size 16")


@pytest.mark.parametrize("action", ["setup", "run", "results"])
def test_playbooks_pass_ansible_syntax_check(action: str) -> None:
    done = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), "--syntax-check",
                           str(PLAYBOOKS / f"dcgan_{action}.yaml")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def play_setup(tmp_path: Path, start_at: str, path: str = "", user_dirs: tuple[Path, ...] = (),
               **extra: object) -> subprocess.CompletedProcess:
    """The setup playbook on this machine (local connection), from the task `start_at` on;
    one host per user_dirs (default: tmp_path/user)."""
    inventory = tmp_path / "hosts.yaml"
    inventory.write_text(json.dumps({"all": {"hosts": {
        f"node-{rank}": {"node_rank": rank, "ansible_connection": "local", "user_dir": str(user_dir)}
        for rank, user_dir in enumerate(user_dirs or (tmp_path / "user",))}}}))
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    (app / "dist_dcgan.py").write_text("")
    (app / "Dockerfile").write_text("FROM ubuntu:20.04\n")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "test_batch"
    batch.parent.mkdir(parents=True, exist_ok=True)
    batch.write_text("")
    variables = {"runner": "native", "efs_mount_point": str(tmp_path),
                 "dcgan_dir": str(app), "cifar_data_dir": str(tmp_path / "data"), "dcgan_python": sys.executable,
                 "ansible_python_interpreter": sys.executable, **extra}
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), "--start-at-task", start_at,
         str(PLAYBOOKS / "dcgan_setup.yaml"), "-e", json.dumps(variables)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "ANSIBLE_NOCOLOR": "1", "PATH": f"{path}{os.environ['PATH']}"})


def test_setup_keeps_the_mode_of_an_existing_user_folder(tmp_path: Path) -> None:
    """A user_dir made by someone else keeps its mode; a missing one is made 0755."""
    theirs, missing = tmp_path / "theirs", tmp_path / "missing"
    theirs.mkdir(mode=0o700)
    done = play_setup(tmp_path, "Create the user folder when it is missing", user_dirs=(theirs, missing))
    assert done.returncode == 0, done.stdout + done.stderr
    assert theirs.stat().st_mode & 0o777 == 0o700
    assert missing.stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize(("buildx", "buildkit"), [(0, "1"), (1, "0")])
def test_setup_builds_with_buildkit_where_docker_has_it(tmp_path: Path, buildx: int, buildkit: str) -> None:
    """A stand-in `docker` records how the image is built: BuildKit (each layer written once)
    when the buildx plugin answers, the legacy builder otherwise."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "docker").write_text(f"""#!/bin/sh
case "$1" in
  image) exit 1 ;;
  buildx) exit {buildx} ;;
  build) echo "DOCKER_BUILDKIT=$DOCKER_BUILDKIT $*" > {tmp_path}/built; exit 0 ;;
esac
exit 2
""")
    (shims / "docker").chmod(0o755)
    (tmp_path / "user").mkdir()
    done = play_setup(tmp_path, "Look at the app's Dockerfile and code", path=f"{shims}:", runner="docker")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "built").read_text().startswith(f"DOCKER_BUILDKIT={buildkit} build -t dcgan:")


def test_efs_is_mounted_as_nfs_41_unless_efs_fstype_says_sshfs(tmp_path: Path) -> None:
    nfs = render(tmp_path, efs_host="172.31.16.10")["node-a"]["mount"]
    assert nfs == ["172.31.16.10:/", "nfs4", "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,"
                   "noresvport,_netdev", ["nfs-common"]]
    sftp = render(tmp_path, efs_host="root@10.0.0.9", efs_fstype="fuse.sshfs")["node-a"]["mount"]
    assert sftp == ["root@10.0.0.9:/", "fuse.sshfs", "_netdev", ["sshfs"]]
