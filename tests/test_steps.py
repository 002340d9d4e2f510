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

import cluster
import cluster_state
import config
import output
import role
from conftest import ROOT


def step(name: str, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py")],
                          env={**env, **extra}, capture_output=True, text=True, timeout=60)


def write_nodes(env: dict[str, str], **fields: object) -> dict:
    state = {"format": cluster_state.STATE_FORMAT, "cluster_id": "c-test", "provider": "local",
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
    ({"MARKET": "auction"}, "MARKET='auction' is unknown: use MARKET=on-demand or MARKET=spot."),
    ({"SPOT_MAX_PRICE": "cheap"}, "SPOT_MAX_PRICE='cheap' must be US dollars per hour above 0: set it like "
                                  "SPOT_MAX_PRICE=0.05"),
    ({"SPOT_MAX_PRICE": "0"}, "SPOT_MAX_PRICE='0' must be US dollars per hour above 0"),
    ({"EFS_FSTYPE": "nfs"}, "EFS_FSTYPE='nfs' is unknown: use EFS_FSTYPE=nfs4 (EFS, NFS 4.1) or EFS_FSTYPE=fuse.sshfs"),
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
    settings = config.load_settings({"ENV_FILE": str(env_file), "EPOCHS": "5"})
    assert (settings.nodes, settings.epochs, settings.app_args) == (4, 5, "--max_workers 0")
    assert {"NODES", "EPOCHS", "APP_ARGS"} <= settings.user_set


def test_provider_defaults_fill_empty_settings() -> None:
    aws = config.load_settings({"ENV_FILE": os.devnull, "PROVIDER": "aws"})
    assert (aws.instance_type, aws.runner, aws.user_dir) == ("type-t2.medium", "docker", "/home/ubuntu/efs/dcgan")
    local = config.load_settings({"ENV_FILE": os.devnull})
    assert (local.instance_type, local.runner, local.synthetic_data) == ("type-local", "native", True)


def test_efs_host_of_the_user_is_mounted_as_efs_fstype_says() -> None:
    state = {"nodes": [], "created": 0.0, "efs": {"efs_host": "10.0.0.9", "efs_fstype": "fuse.sshfs"}}
    nfs = config.load_settings({"ENV_FILE": os.devnull, "PROVIDER": "aws", "EFS_HOST": "172.31.16.10"})
    setup = role.role_vars(nfs, state, "setup")
    assert (setup["efs_host"], setup["efs_fstype"]) == ("172.31.16.10", "nfs4") and "efs_mount_options" not in setup
    sftp = config.load_settings({"ENV_FILE": os.devnull, "PROVIDER": "aws", "EFS_HOST": "root@10.0.0.9",
                                 "EFS_FSTYPE": "fuse.sshfs", "EFS_MOUNT_OPTIONS": "reconnect,_netdev"})
    setup = role.role_vars(sftp, state, "setup")
    assert (setup["efs_host"], setup["efs_fstype"], setup["efs_mount_options"]) == \
        ("root@10.0.0.9", "fuse.sshfs", "reconnect,_netdev")


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
    settings = config.load_settings(project)
    cluster_state.write_state(settings, {"format": 1, "nodes": [], "big": "x" * 100_000})
    seen = []

    def reader() -> None:
        for _ in range(200):
            seen.append(len(json.loads(settings.nodes_file.read_text())["big"]))

    thread = threading.Thread(target=reader)
    thread.start()
    for size in range(200):
        cluster_state.write_state(settings, {"format": 1, "nodes": [], "big": "y" * (100_000 + size)})
    thread.join()
    assert seen and all(n >= 100_000 for n in seen)  # every read parsed: never half a file
    assert not list(settings.nodes_file.parent.glob(".nodes.json.*.tmp"))


def test_second_command_on_the_same_nodes_file_refuses(project: dict) -> None:
    write_nodes(project)
    settings = config.load_settings(project)
    with cluster_state.exclusive(settings, "run"):
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


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def namespaces(env: dict[str, str]) -> list[str]:
    """This project's host namespaces: other test workers make and remove their own meanwhile."""
    octets = env["LOCAL_SUBNET"].split(".")
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if line.startswith(f"dcgan-{octets[1]}-{octets[2]}-")]


def test_dry_run_all_from_nothing_prints_the_whole_experiment(project: dict, tmp_path: Path) -> None:
    before, hosts_before = files_under(tmp_path), namespaces(project)
    done = step("all", project, DRY_RUN="1", NODES="3")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "DRY RUN: would start 3 type-local nodes on local" in out
    for action in ("setup", "run", "results"):
        assert f"DRY RUN: would play {project['CLAP_PATH']}/roles/roles/dcgan_{action}.yaml" in out
    for rank in (0, 1, 2):
        assert f"on rank {rank}: node <node {rank}> at <address of node {rank}>" in out
        assert (f"rank {rank} runs: env GLOO_SOCKET_IFNAME=<interface to the master> OMP_NUM_THREADS=" in out)
        assert (f"--nnodes 3 --node_rank {rank} --master_addr <private address of node 0> --master_port 29500"
                in out)
    assert "/runs/<run id>'" in out and '"run_id": "<run id>"' in out
    assert "DRY RUN: would stop 3 nodes (<node 0>, <node 1>, <node 2>)" in out
    assert files_under(tmp_path) == before  # no nodes.json, no key, no lock, no results
    assert namespaces(project) == hosts_before


def test_all_without_clap_names_only_the_fix(project: dict, tmp_path: Path) -> None:
    done = step("all", project, CLAP=str(tmp_path / "no-clap"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: CLAP not found at {tmp_path / 'no-clap'}: run `git submodule update --init`, "
        f"or set CLAP=/path/to/a/CLAP/checkout."]
    assert not Path(project["NODES_FILE"]).exists()


def test_all_says_the_nodes_are_kept_only_when_nodes_json_lists_them(project: dict, tmp_path: Path) -> None:
    write_nodes(project)
    done = step("all", project, CLAP=str(tmp_path / "no-clap"))
    assert done.returncode == 1
    assert "CLAP not found" in done.stderr
    assert "`make all` stopped at `up`. The nodes are KEPT and still running." in done.stderr
    assert "resume:   make up setup run results down" in done.stderr


class FakeResult:
    ok = True


@pytest.fixture
def fake_fetch(project: dict, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """results.main in this process, the role's copy played by a stand-in: the runs it was asked for."""
    import results

    for name, value in project.items():
        monkeypatch.setenv(name, value)
    fetched: list[str] = []

    def play(settings: config.Settings, handles: object, state: dict, action: str, run_id: str) -> FakeResult:
        assert action == "results" and len(state["nodes"]) == 1
        (settings.results_dir / run_id).mkdir(parents=True)
        (settings.results_dir / run_id / "output-0.txt").write_text(run_id)
        fetched.append(run_id)
        return FakeResult()

    monkeypatch.setattr(cluster, "clap", lambda settings, state: None)
    monkeypatch.setattr(role, "play", play)
    monkeypatch.setattr(results.report, "main", lambda argv: 0)
    return fetched


def run_record(run_id: str, state: str, fetched: str | bool = False) -> dict:
    return {"id": run_id, "state": state, "started": 0, "epochs": 2, "fetched": fetched}


def test_results_fetches_every_finished_run_not_fetched_yet(project: dict, fake_fetch: list[str],
                                                            capsys: pytest.CaptureFixture) -> None:
    import results

    write_nodes(project, runs=[run_record("r1", "done", "/elsewhere/r1"), run_record("r2", "failed"),
                               run_record("r3", "stopped"), run_record("r4", "done"), run_record("r5", "running")])
    assert results.main([]) == 0
    assert fake_fetch == ["r2", "r3", "r4"]
    runs = {run["id"]: run["fetched"] for run in json.loads(Path(project["NODES_FILE"]).read_text())["runs"]}
    results_dir = Path(project["RESULTS_DIR"])
    assert runs == {"r1": "/elsewhere/r1", "r2": str(results_dir / "r2"), "r3": str(results_dir / "r3"),
                    "r4": str(results_dir / "r4"), "r5": False}
    assert "run r5 is still going, not fetched" in capsys.readouterr().err
    assert results.main([]) == 0  # again: nothing new, nothing overwritten
    assert fake_fetch == ["r2", "r3", "r4"]
    assert "nothing to fetch" in capsys.readouterr().out


def test_results_keeps_a_run_whose_report_fails(project: dict, fake_fetch: list[str], monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    import results

    write_nodes(project, runs=[run_record("r1", "done")])
    monkeypatch.setattr(results.report, "main", lambda argv: 1)
    assert results.main([]) == 0  # the files are the result; the report only reads them
    target = Path(project["RESULTS_DIR"]) / "r1"
    assert f"no report for {target}; its files are there all the same." in capsys.readouterr().err
    assert (target / "output-0.txt").read_text() == "r1"
    assert json.loads(Path(project["NODES_FILE"]).read_text())["runs"][0]["fetched"] == str(target)


@pytest.mark.parametrize("how", ["RUN_ID", "--run-id"])
def test_results_of_one_run_by_id(project: dict, fake_fetch: list[str], monkeypatch: pytest.MonkeyPatch,
                                  how: str) -> None:
    import results

    write_nodes(project, runs=[run_record("r1", "done"), run_record("r2", "done")])
    if how == "RUN_ID":
        monkeypatch.setenv("RUN_ID", "r1")
    assert results.main(["--run-id", "r1"] if how == "--run-id" else []) == 0
    assert fake_fetch == ["r1"]
    with pytest.raises(output.UserError, match=r"already exists: run r1 was fetched before"):
        results.main(["--run-id", "r1"])
    with pytest.raises(output.UserError, match=r"RUN_ID=r9: no such run in nodes.json: pick one of r1, r2\."):
        results.main(["--run-id", "r9"])
    assert fake_fetch == ["r1"]


def test_a_failure_in_a_steps_log_is_named_with_the_log(tmp_path: Path) -> None:
    log = tmp_path / "setup-1.log"
    log.write_text('2026-01-01 p=1 u=root n=ansible | TASK [Check the app]\n'
                   '2026-01-01 p=1 u=root n=ansible | fatal: [33785da822464d87]: FAILED! => '
                   '{"changed": false, "msg": "/usr/bin/python3 has no torch on 33785da8: set DCGAN_PYTHON. "}\n')
    assert role.logged_failure(log) == (f"node 33785da8: /usr/bin/python3 has no torch on 33785da8: set DCGAN_PYTHON."
                                        f" (whole output: {log})")
    log.write_text("PLAY RECAP\n")
    assert role.logged_failure(log) == f"its message is in {log}"


def test_a_run_going_on_fewer_nodes_is_re_attached_on_its_own_ranks(project: dict) -> None:
    """`run.py --nodes 1` (a sweep point) interrupted, then a bare `make run`: it re-attaches to
    the ranks that run has, not to every node of the cluster."""
    write_nodes(project, steps={"setup": {"state": "done"}},
                runs=[{"id": "run-1", "state": "running", "started": 0, "epochs": 2, "nodes": 1, "fetched": False}],
                nodes=[{"id": f"{rank}" * 32, "rank": rank, "name": f"n{rank}", "address": f"10.0.0.{rank + 2}",
                        "private_address": f"10.0.0.{rank + 2}"} for rank in (0, 1)])
    done = step("run", project, DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    assert "on rank 0: node 00000000" in done.stdout and "on rank 1:" not in done.stdout
    assert '"run_id": "run-1"' in done.stdout and "--nnodes 1 --node_rank 0" in done.stdout


def test_torch_for_the_local_demo_comes_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """`make deps` leaves torch out; the local path installs requirements-local.txt when it is missing,
    and says what to do when pip cannot (here: a wheel that is not there, so no network is asked)."""
    import demo_torch

    assert "torch" not in (ROOT / "requirements.txt").read_text()
    demo_torch.install_if_missing(tmp_path / "never-read.txt")  # torch is here: pip is not even started
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(demo_torch.importlib.util, "find_spec", lambda name: None)
    requirements = tmp_path / "requirements-local.txt"
    requirements.write_text(f"torch @ file://{tmp_path}/torch-2.13.0-cp311-cp311-linux_x86_64.whl\n")
    with pytest.raises(output.UserError) as refused:
        demo_torch.install_if_missing(requirements)
    assert "installing torch for the local demo, once (requirements-local.txt)" in capsys.readouterr().out
    assert str(refused.value).startswith("pip could not install torch for the local demo (ERROR: ")
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_installing_torch_writes_the_bytecode_a_rank_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's first run should not compile torch's dependencies that `make deps` left uncompiled: the
    install imports what a rank imports once, writing its bytecode even under PYTHONDONTWRITEBYTECODE
    (here a module of this test's stands for sympy, which the ranks' torch._dynamo loads)."""
    import demo_torch

    (tmp_path / "uncompiled_dependency.py").write_text("VALUE = 1\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setattr(demo_torch, "RANK_IMPORTS", "import uncompiled_dependency")
    demo_torch.write_rank_bytecode()
    assert [path.name.split(".")[0] for path in (tmp_path / "__pycache__").glob("*.pyc")] == ["uncompiled_dependency"]
    monkeypatch.setattr(demo_torch, "RANK_IMPORTS", "import missing_dependency")
    with pytest.raises(output.UserError) as refused:
        demo_torch.write_rank_bytecode()
    assert "(ModuleNotFoundError: No module named 'missing_dependency'): reinstall it with" in str(refused.value)


def test_the_cloud_like_nodes_get_the_cpu_torch_of_requirements_local(tmp_path: Path) -> None:
    """The nodes' image installs the wheels setup fetches: the pin whose marker holds on Linux x86_64."""
    import local_efs

    assert local_efs.node_torch_pin(ROOT / "requirements-local.txt") == "torch==2.13.0+cpu"
    mac_only = tmp_path / "requirements-local.txt"
    mac_only.write_text('torch==2.13.0; sys_platform == "darwin"\n')
    with pytest.raises(output.UserError, match=r"pins no torch for Linux x86_64: pin one there"):
        local_efs.node_torch_pin(mac_only)
