"""What keeps `make run` cheap while the model trains, and how `make bench` counts it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import bench
import common


def test_ansible_waits_without_spinning(tmp_path: Path) -> None:
    """Ansible's main loop wakes every millisecond by default while a task runs (a tenth of a core
    for the whole training); the project's ansible.cfg, which every step's Ansible reads, slows it."""
    settings = common.load_settings({"ENV_FILE": os.devnull, "CLAP_PATH": str(tmp_path)})
    env = {**os.environ, **common.ansible_env(settings)}
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
