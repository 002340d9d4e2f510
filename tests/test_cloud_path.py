"""The course's own path, played for real on cloud-like local nodes (INSTANCE_TYPE=type-local-vm):
each node a whole Debian with its own apt, users and Docker; the EFS stand-in mounted by the role's
own EFS tasks; the app's image built on every node; ranks in containers. Through `make` and CLAP.

The tests of this module run in order on one cluster (its setup costs minutes); each says what a
user would check after that step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, clap_checkout, leftovers, need_root, project_env, subnet, subnet_tag
from local_netns import pid_alive

# One cluster for the whole module, its tests in order: on one pytest-xdist worker, handed out first.
pytestmark = [pytest.mark.xdist_group("cloud_path"), pytest.mark.long]
THIRD = 248  # this module's test subnet: subnet(THIRD)
LOCK_HELD_S = 20


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    need_root()
    missing = [tool for tool in ("debootstrap", "systemd-nspawn", "tinyproxy", "sshfs") if not shutil.which(tool)]
    if missing:
        pytest.skip(f"cloud-like nodes need {', '.join(missing)} (.ci/run installs them)")
    env = project_env(tmp_path_factory.mktemp("cloud"))
    env.update({"CLAP": str(clap_checkout()), "INSTANCE_TYPE": "type-local-vm", "LOCAL_SUBNET": subnet(THIRD)})
    del env["EFS_MOUNT_POINT"]  # the nodes' own default, /home/ubuntu/efs, as on AWS
    try:
        done = make(env, "up")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield env
    finally:
        make(env, "down")  # whatever a test left, pass or fail


def make(env: dict, *targets: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *targets], env={**env, **extra}, capture_output=True,
                          text=True, timeout=1800)


def state(env: dict) -> dict:
    return json.loads(Path(env["NODES_FILE"]).read_text())


def ssh(env: dict, rank: int, command: str) -> list[str]:
    """The command line that runs `command` as the login user (ubuntu) of a node, with the cluster's key."""
    key = Path(env["CLAP_PATH"]) / "private" / "local_key"
    return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ControlPath=none", f"ubuntu@{state(env)['nodes'][rank]['address']}", command]


def on_node(env: dict, rank: int, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ssh(env, rank, command), capture_output=True, text=True, timeout=timeout)


def export(env: dict) -> Path:
    """The EFS stand-in's folder on this machine."""
    return Path(env["CLAP_PATH"]) / "storage" / "local" / "efs-export"


def setup_recap(env: dict) -> str:
    """The PLAY RECAP lines of the newest setup log."""
    log = max((Path(env["CLAP_PATH"]) / "storage" / "logs").glob("setup-*.log"))
    return "\n".join(line for line in log.read_text().splitlines() if re.search(r" : ok=\d+ +changed=", line))


def test_setup_on_fresh_nodes_installs_mounts_builds_and_waits_for_dpkg(vm: dict) -> None:
    """apt, the docker group, the EFS mount and the image build, on fresh nodes; one of them has its
    dpkg lock held (as unattended-upgrades holds it on a fresh EC2 Ubuntu): setup waits for it."""
    export(vm).mkdir(mode=0o755, parents=True, exist_ok=True)
    export(vm).chmod(0o751)  # the EFS root's mode is its owner's: setup must leave it
    # A fresh apt cache, so that the install itself, not the cache update, meets the held lock.
    assert on_node(vm, 1, "sudo apt-get update -qq").returncode == 0
    hold = (f"import fcntl, time; f = open('/var/lib/dpkg/lock-frontend', 'w'); fcntl.lockf(f, fcntl.LOCK_EX); "
            f"print('held', flush=True); time.sleep({LOCK_HELD_S})")
    holder = subprocess.Popen(ssh(vm, 1, f'sudo python3 -c "{hold}"'), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        released = time.time() + LOCK_HELD_S
        done = make(vm, "setup")
    finally:
        holder.wait(timeout=LOCK_HELD_S + 30)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # dpkg installed docker.io on that node only once the lock was free: it waited, it did not fail.
    installed = on_node(vm, 1, "grep -m1 ' install docker.io' /var/log/dpkg.log | cut -c1-19").stdout.strip()
    assert time.mktime(time.strptime(installed, "%Y-%m-%d %H:%M:%S")) - time.timezone >= int(released) - 2
    for rank in (0, 1):
        checks = on_node(vm, rank, "dpkg-query -W -f '${Status}\\n' docker.io sshfs; id -nG; "
                                   "grep -q ' /home/ubuntu/efs fuse.sshfs ' /proc/mounts && echo mounted; "
                                   "grep -c ' fuse.sshfs ' /etc/fstab; "
                                   "test -f /run/systemd/shutdown/scheduled && echo capped; "  # MAX_HOURS
                                   "docker image ls dcgan --format '{{.Tag}}'")  # as ubuntu: the group works
        assert checks.returncode == 0, checks.stderr
        lines = checks.stdout.splitlines()
        assert lines[:2] == ["install ok installed"] * 2
        assert "docker" in lines[2].split()
        assert lines[3:6] == ["mounted", "1", "capped"]
        assert "latest" in lines[6:] and len(lines[6:]) == 2  # dcgan:latest and dcgan:<hash of the app>
    assert export(vm).stat().st_mode & 0o777 == 0o751
    writable = on_node(vm, 0, "touch /home/ubuntu/efs/dcgan/.probe && rm /home/ubuntu/efs/dcgan/.probe")
    assert writable.returncode == 0, writable.stderr  # the login user's folder on the shared filesystem


def test_second_setup_changes_nothing_and_builds_nothing(vm: dict) -> None:
    done = make(vm, "setup")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recap = setup_recap(vm)
    assert recap.count("changed=0") == 2, recap
    assert export(vm).stat().st_mode & 0o777 == 0o751


def test_mount_comes_back_from_fstab_as_at_boot(vm: dict) -> None:
    back = on_node(vm, 1, "sudo umount /home/ubuntu/efs && sudo mount -a && "
                          "grep -q ' /home/ubuntu/efs fuse.sshfs ' /proc/mounts && "
                          "ls /home/ubuntu/efs/dcgan/Distributed-DCGAN/dist_dcgan.py")
    assert back.returncode == 0, back.stderr


def test_run_trains_in_containers_and_leaves_none(vm: dict) -> None:
    done = make(vm, "run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = state(vm)["runs"][-1]
    run_dir = export(vm) / "dcgan" / "runs" / run["id"]
    for rank in (0, 1):
        assert f"[rank: {rank}] Epoch 1 took:" in (run_dir / f"output-{rank}.txt").read_text()
        command = json.loads((run_dir / f".rank-{rank}.json").read_text())["command"][-1]
        assert command.startswith(f"docker run --rm --name dcgan-{run['id']}-{rank} --network=host ")
        assert on_node(vm, rank, "docker ps -aq").stdout == ""


def test_killed_rank_fails_the_run_and_no_container_is_left(vm: dict) -> None:
    started = subprocess.Popen(["make", "-s", "-C", str(ROOT), "run"], env={**vm, "EPOCHS": "200"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        container = ""
        while time.monotonic() < deadline and not container:
            time.sleep(2)
            runs = state(vm).get("runs", [])
            if runs and runs[-1]["state"] == "running":
                found = on_node(vm, 1, f"docker ps -q --filter name=dcgan-{runs[-1]['id']}-1").stdout.strip()
                log = export(vm) / "dcgan" / "runs" / runs[-1]["id"] / "output-1.txt"
                container = found if log.exists() and "[iteration: 1/" in log.read_text() else ""
        assert container, "rank 1 never trained"
        assert on_node(vm, 1, f"docker kill {container}").returncode == 0
        killed = time.monotonic()
        out, _ = started.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if started.poll() is None:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()
    assert started.returncode != 0 and "rank 1" in out, out[-2000:]
    assert took < 30, f"the run took {took:.0f} s to fail after the kill"
    assert state(vm)["runs"][-1]["state"] == "failed"
    for rank in (0, 1):
        assert on_node(vm, rank, "docker ps -aq").stdout == ""


def test_results_come_home(vm: dict) -> None:
    done = make(vm, "results")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in state(vm)["runs"]:
        assert (Path(vm["RESULTS_DIR"]) / run["id"] / "output-0.txt").is_file()


def test_down_leaves_no_namespace_mount_container_tree_or_rule(vm: dict) -> None:
    local = Path(vm["CLAP_PATH"]) / "storage" / "local"
    pids = [host["pid"] for host in json.loads((local / "hosts.json").read_text())]
    done = make(vm, "down")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert leftovers(subnet_tag(THIRD)) == []
    assert not [pid for pid in pids if pid_alive(pid)]  # nodes, EFS stand-in, proxy (a zombie is gone)
    assert str(local) not in Path("/proc/mounts").read_text()  # the nodes' disks
    assert not [path.name for path in local.iterdir() if subnet_tag(THIRD) in path.name]  # nodes, stand-in, proxy
    assert (local / "efs-export" / "dcgan").is_dir()  # the stand-in's files outlive it, as an EFS does
    # only this module's nodes: another session's cluster on this machine has its own
    cgroups = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "4", "-name", f"dcgan-node-{subnet_tag(THIRD)}-*"],
                             capture_output=True, text=True).stdout
    assert cgroups == ""
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert subnet(THIRD) not in rules
