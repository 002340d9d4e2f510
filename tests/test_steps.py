"""The steps' decisions and the user's mistakes, checked without root, CLAP or nodes.

Each bad input must give one sentence naming the variable or file and the fix,
a non-zero exit, and touch nothing: no nodes.json written, no result changed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import common
from conftest import ROOT


def step(name: str, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py")],
                          env={**env, **extra}, capture_output=True, text=True, timeout=60)


def write_nodes(env: dict[str, str], **fields: object) -> dict:
    state = {"format": common.STATE_FORMAT, "cluster_id": "c-test", "provider": "local",
             "instance_type": "type-local", "created": time.time(), "steps": {}, "runs": [],
             "nodes": [{"id": "a" * 32, "rank": 0, "name": "n0", "address": "10.0.0.2",
                        "private_address": "10.0.0.2"}]}
    state.update(fields)
    Path(env["NODES_FILE"]).write_text(json.dumps(state))
    return state


BAD_SETTINGS = [
    ({"NODES": "0"}, "NODES=0 must be at least 1: set it like NODES=2."),
    ({"NODES": "-1"}, "NODES=-1 must be at least 1"),
    ({"NODES": "abc"}, "NODES='abc' is not a whole number: set it like NODES=2."),
    ({"EPOCHS": "0"}, "EPOCHS=0 must be at least 1"),
    ({"PROVIDER": "gcp"}, "PROVIDER='gcp' is unknown: use PROVIDER=local or PROVIDER=aws."),
    ({"INSTANCE_TYPE": "type-huge"}, "INSTANCE_TYPE='type-huge' is not in"),
    ({"INSTANCE_TYPE": "type-t2.medium"}, "INSTANCE_TYPE=type-t2.medium belongs to provider 'aws'"),
    ({"RUNNER": "podman"}, "RUNNER='podman' is unknown"),
    ({"RESULTS_DIR": "/proc/results"}, "RESULTS_DIR=/proc/results is not writable"),
    ({"DCGAN_DIR": "/"}, "DCGAN_DIR=/ has no dist_dcgan.py"),
    ({"CIFAR_DATA_DIR": "/"}, "CIFAR_DATA_DIR=/ has no cifar-10-batches-py/test_batch"),
    ({"STALL_TIMEOUT": "abc"}, "STALL_TIMEOUT='abc' is not a whole number: set it like STALL_TIMEOUT=300."),
    ({"STALL_TIMEOUT": "-1"}, "STALL_TIMEOUT=-1 must be at least 0: set it like STALL_TIMEOUT=300."),
    ({"STALL_TIMEOUT": "5"}, "STALL_TIMEOUT=5 is shorter than the progress report interval (10 s)"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SETTINGS, ids=[next(iter(b)) + "=" + next(iter(b.values()))
                                                                for b, _ in BAD_SETTINGS])
@pytest.mark.parametrize("name", ["check", "up"])
def test_bad_setting_is_one_clear_sentence_and_starts_nothing(name: str, bad: dict, message: str,
                                                              project: dict) -> None:
    done = step(name, project, **bad)
    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not Path(project["NODES_FILE"]).exists()


def test_malformed_yaml_in_clap_config_names_file_and_line(project: dict) -> None:
    instances = Path(project["CLAP_PATH"]) / "configs" / "instances.yaml"
    instances.write_text(instances.read_text() + "type-broken:\n  flavor: [unclosed\n")
    done = step("check", project)
    assert done.returncode == 1
    assert f"{instances}:" in done.stderr and "is not valid YAML" in done.stderr


def test_env_file_overrides_defaults_and_environment_overrides_it(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("NODES=4  # a comment\nEPOCHS=3\nAPP_ARGS=\"--max_workers 0\"\n")
    settings = common.load_settings({"ENV_FILE": str(env_file), "EPOCHS": "5"})
    assert (settings.nodes, settings.epochs, settings.app_args) == (4, 5, "--max_workers 0")
    assert {"NODES", "EPOCHS", "APP_ARGS"} <= settings.user_set


def test_provider_defaults_fill_empty_settings() -> None:
    aws = common.load_settings({"ENV_FILE": os.devnull, "PROVIDER": "aws"})
    assert (aws.instance_type, aws.runner, aws.user_dir) == ("type-t2.medium", "docker", "/home/ubuntu/efs/dcgan")
    local = common.load_settings({"ENV_FILE": os.devnull})
    assert (local.instance_type, local.runner, local.synthetic_data) == ("type-local", "native", True)


def test_setup_run_results_refuse_without_nodes(project: dict) -> None:
    for name in ("setup", "run", "results"):
        done = step(name, project)
        assert done.returncode == 1
        assert f"no nodes in nodes.json: run `make up` before `make {name}`." in done.stderr


def test_run_before_setup_refuses(project: dict) -> None:
    write_nodes(project)
    done = step("run", project)
    assert done.returncode == 1
    assert "the nodes are not set up: run `make setup` before `make run`." in done.stderr
    assert json.loads(Path(project["NODES_FILE"]).read_text())["runs"] == []


def test_results_before_any_run_refuses(project: dict) -> None:
    write_nodes(project, steps={"setup": {"state": "done"}})
    done = step("results", project)
    assert done.returncode == 1
    assert "no run yet: run `make run` before `make results`." in done.stderr


def test_results_never_overwrite_an_earlier_copy(project: dict) -> None:
    write_nodes(project, runs=[{"id": "run-1", "state": "done", "started": 0, "epochs": 2, "fetched": False}])
    earlier = Path(project["RESULTS_DIR"]) / "run-1"
    earlier.mkdir(parents=True)
    (earlier / "output-0.txt").write_text("precious")
    done = step("results", project)
    assert done.returncode == 1
    assert f"{earlier} already exists" in done.stderr
    assert (earlier / "output-0.txt").read_text() == "precious"


def test_nodes_file_of_an_older_format_is_explained(project: dict) -> None:
    write_nodes(project, format=0)
    done = step("setup", project)
    assert done.returncode == 1
    assert "has format 0, this version reads format 1" in done.stderr


def test_damaged_nodes_file_is_explained(project: dict) -> None:
    Path(project["NODES_FILE"]).write_text('{"format": 1, "nodes": [')
    done = step("run", project)
    assert done.returncode == 1
    assert "is damaged (not JSON)" in done.stderr and "make down" in done.stderr


def test_state_is_replaced_atomically(project: dict) -> None:
    settings = common.load_settings(project)
    common.write_state(settings, {"format": 1, "nodes": [], "big": "x" * 100_000})
    seen = []

    def reader() -> None:
        for _ in range(200):
            seen.append(len(json.loads(settings.nodes_file.read_text())["big"]))

    thread = threading.Thread(target=reader)
    thread.start()
    for size in range(200):
        common.write_state(settings, {"format": 1, "nodes": [], "big": "y" * (100_000 + size)})
    thread.join()
    assert seen and all(n >= 100_000 for n in seen)  # every read parsed: never half a file
    assert not list(settings.nodes_file.parent.glob(".nodes.json.*.tmp"))


def test_second_command_on_the_same_nodes_file_refuses(project: dict) -> None:
    write_nodes(project)
    settings = common.load_settings(project)
    with common.exclusive(settings, "run"):
        done = step("setup", project)
    assert done.returncode == 1
    assert f"`make run` (PID {os.getpid()}) is using nodes.json" in done.stderr


@pytest.mark.parametrize("name", ["setup", "run", "results"])
def test_dry_run_prints_the_plan_and_touches_nothing(project: dict, name: str) -> None:
    write_nodes(project, steps={"setup": {"state": "done"}},
                runs=[{"id": "run-1", "state": "done", "started": 0, "epochs": 2, "fetched": False}],
                nodes=[{"id": f"{rank}" * 32, "rank": rank, "name": f"n{rank}", "address": f"10.0.0.{rank + 2}",
                        "private_address": f"10.0.0.{rank + 2}"} for rank in (0, 1)])
    before = Path(project["NODES_FILE"]).read_bytes()
    done = step(name, project, DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    assert f"DRY RUN: would play {project['CLAP_PATH']}/roles/roles/dcgan_{name}.yaml" in done.stdout
    assert "Nothing was started, changed or written." in done.stdout
    assert Path(project["NODES_FILE"]).read_bytes() == before
    assert not Path(project["RESULTS_DIR"]).exists()
    if name == "run":
        for rank in (0, 1):
            assert (f"rank {rank} runs: env GLOO_SOCKET_IFNAME=<interface to the master> OMP_NUM_THREADS="
                    in done.stdout)
            assert f"--nnodes 2 --node_rank {rank} --master_addr 10.0.0.2 --master_port 29500" in done.stdout


def test_dry_run_up_says_what_it_would_start(project: dict) -> None:
    done = step("up", project, DRY_RUN="1", NODES="3")
    assert done.returncode == 0, done.stderr
    assert "DRY RUN: would start 3 type-local nodes on local" in done.stdout
    assert not Path(project["NODES_FILE"]).exists()
    assert not (Path(project["CLAP_PATH"]) / "private" / "local_key").exists()
