"""What keeps `make run` cheap while the model trains, and how `make bench` counts it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import yaml

import bench
import cluster
import config

WATCHDOG = config.ROOT / "clap_config" / "roles" / "roles" / "files" / "rank_watchdog.py"


def test_ansible_waits_without_spinning(tmp_path: Path) -> None:
    """Ansible's main loop wakes every millisecond by default while a task runs (a tenth of a core
    for the whole training); the project's ansible.cfg, which every step's Ansible reads, slows it."""
    settings = config.load_settings({"ENV_FILE": os.devnull, "CLAP_PATH": str(tmp_path)})
    env = {**os.environ, **cluster.ansible_env(settings)}
    ansible_config = Path(env["PATH"].split(os.pathsep)[0]) / "ansible-config"
    dump = subprocess.run([str(ansible_config), "dump", "--only-changed"], env=env, capture_output=True,
                          text=True, check=True).stdout
    assert "DEFAULT_INTERNAL_POLL_INTERVAL(" in dump and "= 0.05" in dump.split("DEFAULT_INTERNAL_POLL_INTERVAL(")[1]


def test_bench_counts_what_it_started_as_machinery_here() -> None:
    """The CPU of `make run`'s own processes is machinery; the bench's own sampling and other
    people's processes are not counted at all."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        found = bench.processes(set())
        assert found[child.pid][0] == "make run on this machine"
        assert os.getpid() not in found and 1 not in found
    finally:
        child.kill()
        child.wait()


def test_bench_counts_the_watchdogs_as_machinery_and_the_ranks_as_training() -> None:
    """A watchdog names its rank's command in its own arguments; it is still machinery, not training."""
    play = yaml.safe_load((config.ROOT / "clap_config" / "roles" / "roles" / "dcgan_run.yaml").read_text())[0]
    watchdog_argv = play["tasks"][-1]["vars"]["dcgan_watchdog_argv"]
    rank = "env OMP_NUM_THREADS=1 python3 -m torch.distributed.run --nnodes 2 demo/dist_dcgan.py"
    assert not bench.is_training("\0".join([*watchdog_argv[:-1], rank]))
    assert bench.is_training("\0".join(["sh", "-c", rank]))
    assert bench.is_training("\0".join(["/usr/bin/python3", "-u", "demo/dist_dcgan.py", "--test_data"]))
    assert not bench.is_training("\0".join(["sshd: root@notty"]))


def load_watchdog() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rank_watchdog", WATCHDOG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ranks_start_together_once_every_watchdog_is_up(tmp_path: Path) -> None:
    """A rank started early would slow the starts of the others on shared cores: each waits for all."""
    watchdog = load_watchdog()
    late = threading.Timer(0.5, lambda: [(tmp_path / f".rank-{r}.ready").touch() for r in (1, 2)])
    late.start()
    started = time.monotonic()
    assert watchdog._wait_for_peers(tmp_path, 0, 3, bound=10) == []
    assert 0.4 < time.monotonic() - started < 3


def test_a_missing_peer_delays_the_start_only_by_the_bound(tmp_path: Path) -> None:
    """A peer that never comes up is not waited for forever: the usual watch (peer timeout) names it."""
    watchdog = load_watchdog()
    (tmp_path / ".rank-1.ready").touch()
    started = time.monotonic()
    assert watchdog._wait_for_peers(tmp_path, 0, 3, bound=1) == [2]
    assert 1 <= time.monotonic() - started < 3


def voluntary_switches(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def test_a_watchdog_sleeps_between_beats_and_wakes_when_its_rank_ends(tmp_path: Path) -> None:
    """Every wake-up of a watchdog takes CPU from the training it shares the node with: it wakes once a
    beat (Popen.wait with a timeout would wake 20 times a second), and at once when its rank ends."""
    started = subprocess.run([sys.executable, "-I", "-S", str(WATCHDOG), "start", f"--run-dir={tmp_path}",
                              "--rank=0", "--world=1", f"--log={tmp_path / 'output-0.txt'}", "--beat=1",
                              "--", "sleep", "4"], capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    info = json.loads((tmp_path / ".rank-0.json").read_text())
    try:
        before = voluntary_switches(info["watchdog_pid"])
        time.sleep(2.5)
        assert voluntary_switches(info["watchdog_pid"]) - before <= 8
        deadline = time.monotonic() + 10
        while not (tmp_path / ".rank-0.exit").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        outcome = json.loads((tmp_path / ".rank-0.exit").read_text())
        assert outcome["reason"] == "finished" and outcome["seconds"] < 4.5
    finally:
        if not (tmp_path / ".rank-0.exit").exists():
            for pid in (info["pid"], info["watchdog_pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
