"""Faults during a run on real namespace hosts: the run fails within its bound, names
the rank, stops the survivor, and the outputs so far can still be fetched.

Each test breaks its hosts, so each gets its own. The bound under test is the
role's own: a rank's watchdog ends it when a peer fails, when a peer's heartbeat
is silent for `peer_timeout` seconds, or when the master is unreachable for as long.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import failure_messages, leftovers, need_root, play, role_cluster, subnet, subnet_tag
from local_hosts import LocalHosts

PEER_TIMEOUT = 8
SSH_KEEPALIVE = 15  # ServerAliveInterval 5 x ServerAliveCountMax 3: when Ansible gives up on a silent node
SUBNET = subnet(252)


@pytest.fixture
def cluster(tmp_path: Path, ssh_key: Path) -> Iterator[dict]:
    need_root()
    hosts = LocalHosts(tmp_path / "hosts", SUBNET)
    try:
        made = hosts.create(2, ssh_key.with_suffix(".pub").read_text())
        with role_cluster(made, ssh_key, tmp_path) as cluster:
            cluster["local_hosts"], cluster["key"] = hosts, ssh_key
            assert play(cluster, "setup").status == "successful"
            yield cluster
    finally:
        hosts.destroy()
        assert leftovers(subnet_tag(252)) == []


def start_long_run(cluster: dict, run_id: str, **extra: object) -> tuple[threading.Thread, object]:
    return play(cluster, "run", wait=False, **{"run_id": run_id, "epochs": 500, "peer_timeout": PEER_TIMEOUT,
                                               "master_hostname": cluster["ids"][0], **extra})


def wait_for_training(run_dir: Path, rank: int, deadline_s: float = 60) -> None:
    log = run_dir / f"output-{rank}.txt"
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if log.exists() and "[iteration: 3/" in log.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"rank {rank} did not train within {deadline_s} s: {log.read_text() if log.exists() else 'no log'}")


def on_host(cluster: dict, rank: int, command: str) -> subprocess.CompletedProcess:
    host = cluster["hosts"][rank]
    return subprocess.run(["ssh", "-i", str(cluster["key"]), "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                           f"root@{host.address}", command], capture_output=True, text=True, timeout=30)


def rank_processes(cluster: dict, rank: int) -> list[str]:
    """Processes of the app still alive on a host (its PID namespace shows only its own)."""
    ps = on_host(cluster, rank, "ps -eo args")
    return [line for line in ps.stdout.splitlines() if "dist_dcgan.py" in line and "ps -eo" not in line]


def outcome(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / f".rank-{rank}.exit").read_text())


def finish(thread: threading.Thread, runner: object, bound_s: float) -> float:
    started = time.monotonic()
    thread.join(timeout=bound_s + 60)
    assert not thread.is_alive(), "the run did not end"
    return time.monotonic() - started


def test_killed_rank_fails_the_run_and_stops_the_survivor(cluster: dict, tmp_path: Path) -> None:
    thread, runner = start_long_run(cluster, "killed")
    run_dir = cluster["user_dir"] / "runs" / "killed"
    wait_for_training(run_dir, 1)
    pid = json.loads((run_dir / ".rank-1.json").read_text())["pid"]
    assert on_host(cluster, 1, f"kill -KILL -- -{pid}").returncode == 0

    took = finish(thread, runner, PEER_TIMEOUT)
    assert runner.status == "failed"
    assert took < 20, f"the run took {took:.0f} s to fail after the kill"
    assert "exited with code" in outcome(run_dir, 1)["reason"]
    assert outcome(run_dir, 0)["reason"].startswith("rank 1 failed")
    assert "rank 1 failed" in failure_messages(runner)
    assert rank_processes(cluster, 0) == [] and rank_processes(cluster, 1) == []

    fetched = play(cluster, "results", results_dir=str(tmp_path / "results"), run_id="killed")
    assert fetched.status == "successful", failure_messages(fetched)
    assert "[iteration: 3/" in (tmp_path / "results" / "killed" / "output-1.txt").read_text()


def test_dead_host_fails_the_run_within_the_peer_timeout(cluster: dict) -> None:
    thread, runner = start_long_run(cluster, "dead")
    run_dir = cluster["user_dir"] / "runs" / "dead"
    wait_for_training(run_dir, 1)
    killed_at = time.monotonic()
    cluster["local_hosts"].destroy([cluster["hosts"][1].name])  # the whole host: sshd, sessions, rank

    thread.join(timeout=PEER_TIMEOUT + 60)
    took = time.monotonic() - killed_at
    assert not thread.is_alive() and runner.status == "failed"
    assert took < PEER_TIMEOUT + 15, f"the survivor ran {took:.0f} s after its peer's host died"
    # Either gloo saw the peer's sockets close, or the watchdog saw its heartbeat stop.
    reason = outcome(run_dir, 0)["reason"]
    assert "rank 1 stopped answering" in reason or "the app exited with code" in reason
    assert rank_processes(cluster, 0) == []


def test_cut_link_fails_the_run_within_the_peer_timeout(cluster: dict) -> None:
    thread, runner = start_long_run(cluster, "cut")
    run_dir = cluster["user_dir"] / "runs" / "cut"
    wait_for_training(run_dir, 1)
    veth = cluster["hosts"][1].veth
    cut_at = time.monotonic()
    subprocess.run(["ip", "link", "set", veth, "down"], check=True)
    try:
        thread.join(timeout=PEER_TIMEOUT + 60)
        took = time.monotonic() - cut_at
    finally:
        subprocess.run(["ip", "link", "set", veth, "up"], check=True)
    assert not thread.is_alive() and runner.status == "failed"
    assert took < PEER_TIMEOUT + SSH_KEEPALIVE + 10, f"the run took {took:.0f} s to fail after the cut"
    assert "unreachable" in outcome(run_dir, 1)["reason"]
    assert outcome(run_dir, 0)["reason"].startswith("rank 1 failed")
    assert rank_processes(cluster, 0) == [] and rank_processes(cluster, 1) == []


def test_ssh_drop_keeps_training_and_a_rerun_reattaches(cluster: dict) -> None:
    dropped = threading.Event()
    thread, runner = start_long_run(cluster, "drop", epochs=15, cancel=dropped.is_set)
    run_dir = cluster["user_dir"] / "runs" / "drop"
    wait_for_training(run_dir, 0)
    started = {rank: json.loads((run_dir / f".rank-{rank}.json").read_text()) for rank in (0, 1)}
    dropped.set()  # ansible-runner kills ansible-playbook and with it every SSH connection
    thread.join(timeout=30)
    size = (run_dir / "output-0.txt").stat().st_size
    time.sleep(2)
    assert (run_dir / "output-0.txt").stat().st_size > size, "training stopped with the connection"

    again = play(cluster, "run", run_id="drop", epochs=15, master_hostname=cluster["ids"][0])
    assert again.status == "successful", failure_messages(again)
    for rank in (0, 1):
        assert json.loads((run_dir / f".rank-{rank}.json").read_text()) == started[rank]  # not restarted
        assert f"[rank: {rank}] Epoch 14 took:" in (run_dir / f"output-{rank}.txt").read_text()


def test_rank_that_never_meets_its_master_fails_within_the_bound(cluster: dict) -> None:
    master_link = cluster["hosts"][0].veth
    subprocess.run(["ip", "link", "set", master_link, "down"], check=True)
    try:
        started = time.monotonic()
        result = play(cluster, "run", run_id="lonely", epochs=1, peer_timeout=PEER_TIMEOUT,
                      master_hostname=cluster["ids"][0])
        took = time.monotonic() - started
    finally:
        subprocess.run(["ip", "link", "set", master_link, "up"], check=True)
    assert result.status == "failed"
    assert took < PEER_TIMEOUT + 40, f"the lonely rank took {took:.0f} s to give up"
    reason = outcome(cluster["user_dir"] / "runs" / "lonely", 1)["reason"]
    assert "rank 0 never started" in reason or "unreachable" in reason
    assert rank_processes(cluster, 1) == []


def test_a_new_run_stops_the_rank_an_abandoned_run_left(cluster: dict) -> None:
    abandoned = threading.Event()
    thread, _ = start_long_run(cluster, "old", cancel=abandoned.is_set)
    wait_for_training(cluster["user_dir"] / "runs" / "old", 0)
    abandoned.set()  # its controller is gone; its ranks would keep the port
    thread.join(timeout=30)

    fresh = play(cluster, "run", run_id="new", epochs=1, master_hostname=cluster["ids"][0])
    assert fresh.status == "successful", failure_messages(fresh)
    for rank in (0, 1):
        assert outcome(cluster["user_dir"] / "runs" / "old", rank)["reason"] == "stopped on request"
    assert rank_processes(cluster, 0) == [] and rank_processes(cluster, 1) == []
