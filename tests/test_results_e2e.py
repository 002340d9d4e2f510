"""`make results` through real CLAP on namespace hosts (root + CLAP): every run comes home, each
once, and the step speaks in one line while Ansible's whole output goes to its log."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, clap_checkout, leftovers, need_root, subnet_tag


@pytest.fixture
def env(project: dict) -> dict:
    need_root()
    project.update(CLAP=str(clap_checkout()), NODES="1", EPOCHS="1")
    yield project
    make(project, "down")
    assert leftovers(subnet_tag(251)) == []


def make(env: dict, *targets: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *targets], env={**env, **settings}, capture_output=True,
                          text=True, timeout=900)


def test_two_runs_come_home_as_two_folders_in_one_line_each(env: dict) -> None:
    for targets in (["up", "setup", "run"], ["run"]):  # make runs a target once per command
        done = make(env, *targets)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = [run["id"] for run in json.loads(Path(env["NODES_FILE"]).read_text())["runs"]]
    assert len(runs) == 2

    started = time.monotonic()
    done = make(env, "results")
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = Path(env["RESULTS_DIR"])
    assert sorted(p.name for p in results.iterdir()) == sorted(runs)
    for run_id in runs:
        assert "[rank: 0] Epoch 0 took:" in (results / run_id / "output-0.txt").read_text()
        assert f"==> run {run_id} is in {results / run_id}: output-0.txt," in done.stdout
    assert "TASK [" not in done.stdout and "PLAY RECAP" not in done.stdout, done.stdout
    logs = sorted((Path(env["CLAP_PATH"]) / "storage" / "logs").glob("results-*.log"))
    assert logs and "PLAY RECAP" in logs[-1].read_text()
    print(f"make results of two runs: {seconds:.1f} s")

    again = make(env, "results")
    assert again.returncode == 0 and "nothing to fetch" in again.stdout

    # A run whose folder is gone on the cluster: the failure names the log with the whole story.
    shutil.rmtree(results / runs[0])
    shutil.rmtree(Path(env["EFS_MOUNT_POINT"]) / "dcgan" / "runs" / runs[0])
    failed = make(env, "results", RUN_ID=runs[0])
    assert failed.returncode != 0
    assert f"run {runs[0]} never started there" in failed.stderr
    log = next(line for line in failed.stderr.splitlines() if "whole output: " in line).split("whole output: ")[1]
    assert "PLAY RECAP" in Path(log.rstrip(").")).read_text(), failed.stderr
    assert "TASK [" not in failed.stdout
    streamed = make(env, "results", RUN_ID=runs[0], VERBOSE="1")
    assert streamed.returncode != 0 and "TASK [" in streamed.stdout and "PLAY RECAP" in streamed.stdout
