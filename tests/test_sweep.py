"""`make sweep`: bad input refused before anything starts; a local sweep with a rank killed in
its middle point, resumed; the AWS plan, cost ceiling and refusal on the EC2 emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, clap_checkout, leftovers, need_root, subnet, subnet_tag
from ec2_emulator import Ec2Emulator
from local_hosts import LocalHosts
from test_aws_steps import instances, prepare_aws
from test_aws_steps import make as make_aws
from test_clap_e2e import app_processes


def make(env: dict, *targets: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *targets], env={**env, **settings},
                          capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize(("settings", "message"), [
    ({"SIZES": ""}, "SIZES='' must list whole numbers of nodes above 0, comma-separated: set it like SIZES=1,2,4."),
    ({"SIZES": "1,two"}, "SIZES='1,two' must list whole numbers"),
    ({"SIZES": "1.5"}, "SIZES='1.5' must list whole numbers"),
    ({"SIZES": "0,2"}, "SIZES='0,2' must list whole numbers of nodes above 0"),
    ({"INSTANCE_TYPES": "type-local,type-huge"}, "INSTANCE_TYPE='type-huge' is not in"),
    ({"SIZES": "1,300"}, "SIZES asks for 300 nodes but LOCAL_SUBNET has room for 253: lower SIZES."),
    ({"SIZES": "1,3", "SSH_HOSTS": "10.0.0.1,10.0.0.2"}, "SIZES asks for 3 nodes but SSH_HOSTS lists 2"),
])
def test_bad_input_is_one_sentence_and_starts_nothing(project: dict, settings: dict, message: str) -> None:
    done = make(project, "sweep", **settings)
    assert done.returncode != 0
    assert message in done.stderr
    assert len([line for line in done.stderr.splitlines() if not line.startswith("make")]) == 1, done.stderr
    assert not Path(project["NODES_FILE"]).exists()
    assert not Path(project["RESULTS_DIR"]).exists()


@pytest.fixture
def env(project: dict) -> Iterator[dict]:
    need_root()
    project.update(CLAP=str(clap_checkout()), SIZES="1,2,3", EPOCHS="1", SYNTHETIC_IMAGES="256")
    yield project
    make(project, "down")
    assert leftovers(subnet_tag(251)) == []


def sweep_record(env: dict) -> tuple[Path, dict]:
    folder = next(Path(env["RESULTS_DIR"]).glob("sweep-*"))
    return folder, json.loads((folder / "sweep.json").read_text())


def kill_rank_in_point(env: dict, point: int, rank: int) -> None:
    """Once the run of that point trains on that rank, kill the rank's app (SIGKILL)."""
    nodes_file, runs = Path(env["NODES_FILE"]), Path(env["EFS_MOUNT_POINT"]) / "dcgan" / "runs"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            state = json.loads(nodes_file.read_text())
        except (OSError, ValueError):
            state = {}
        run = (state.get("runs") or [{}])[-1]
        if state.get("sweep", {}).get("point") == point and run.get("state") == "running" and \
                "[iteration: 1/" in "".join(p.read_text() for p in runs.glob(f"{run['id']}/output-{rank}.txt")):
            assert f"sweep: point {point} of 3 ({point} type-local nodes)" in make(env, "status").stdout
            hosts = LocalHosts(Path(env["CLAP_PATH"]) / "storage" / "local", subnet(251)).hosts()
            namespace = next(h.namespace for h in hosts if h.address == state["nodes"][rank]["address"])
            app = app_processes(namespace)
            assert len(app) == 1, app
            os.kill(app[0], signal.SIGKILL)
            return
        time.sleep(0.1)
    pytest.fail(f"point {point} never trained on rank {rank}")


@pytest.mark.long  # three points, then the rerun of one: the longest test
def test_sweep_records_a_killed_point_and_a_rerun_redoes_only_it(env: dict) -> None:
    sweep = subprocess.Popen(["make", "-s", "-C", str(ROOT), "sweep"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        kill_rank_in_point(env, point=2, rank=1)
        out, err = sweep.communicate(timeout=600)
    finally:
        sweep.kill()
    assert sweep.returncode != 0, out[-3000:] + err[-3000:]
    assert "point 2 of 3: 2 type-local nodes" in out
    assert "setup done on 1 new of 3 nodes" in out  # a grown cluster sets up only its new node
    assert "failed: type-local/2; `make sweep` again redoes them." in out
    folder, record = sweep_record(env)
    states = {key: p["state"] for key, p in record["points"].items()}
    assert states == {"type-local/1": "done", "type-local/2": "failed", "type-local/3": "done"}
    first_runs = {p["run_id"] for p in record["points"].values()}
    for key, p in record["points"].items():  # every run fetched, each on its own ranks
        assert (Path(env["RESULTS_DIR"]) / p["run_id"] / "output-0.txt").exists(), key
        assert f"World Size: {p['size']}" in (Path(env["RESULTS_DIR"]) / p["run_id"] / "output-0.txt").read_text()
    assert record["points"]["type-local/3"]["speedup"] > 0
    assert not Path(env["NODES_FILE"]).exists() and leftovers(subnet_tag(251)) == []

    again = make(env, "sweep")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "point 1 of 1: 2 type-local nodes" in again.stdout
    _, record = sweep_record(env)
    assert all(p["state"] == "done" for p in record["points"].values())
    redone = {p["run_id"] for p in record["points"].values()} - first_runs
    assert len(redone) == 1 and record["points"]["type-local/2"]["run_id"] in redone
    table = (folder / "sweep.md").read_text()
    assert table.count("| type-local |") == 3 and "share this machine's" in table
    assert (folder / "sweep.png").stat().st_size > 10_000

    fetched = sorted(p.name for p in Path(env["RESULTS_DIR"]).iterdir())
    last = make(env, "sweep")
    assert last.returncode == 0 and "point 1 of" not in last.stdout
    assert sorted(p.name for p in Path(env["RESULTS_DIR"]).iterdir()) == fetched  # no new run
    assert not Path(env["NODES_FILE"]).exists()


@pytest.fixture
def aws_env(project: dict, emulator: Ec2Emulator, tmp_path: Path) -> dict:
    return {**prepare_aws(project, emulator, tmp_path), "CLAP": str(clap_checkout()),
            "INSTANCE_TYPES": "type-t2.small,type-t2.medium", "SIZES": "1,2,4", "RUN_TIMEOUT": "3600"}


@pytest.mark.xdist_group("sweep_aws")  # with the next test, on one worker: one emulator for both
def test_aws_plan_shows_points_growth_and_cost_ceiling(aws_env: dict, emulator: Ec2Emulator) -> None:
    done = make_aws(emulator, {**aws_env, "DRY_RUN": "1"}, "sweep")
    assert done.returncode == 0, done.stderr
    assert "6 of 6 points to run" in done.stdout
    assert "point 3 of 6: type-t2.small, 4 nodes (ranks 0..3); starts 2 nodes" in done.stdout
    assert "point 4 of 6: type-t2.medium, 1 nodes (ranks 0..0); starts 1 nodes" in done.stdout
    # prices.yaml: t2.small 0.023, t2.medium 0.0464 per hour; 1+2+4 nodes each, one hour each
    assert f"cost ceiling ${(0.023 + 0.0464) * 7:.2f}" in done.stdout and "within MAX_SWEEP_COST=5" in done.stdout
    assert instances(emulator) == [] and not Path(aws_env["NODES_FILE"]).exists()


@pytest.mark.xdist_group("sweep_aws")
def test_aws_sweep_above_max_sweep_cost_is_refused(aws_env: dict, emulator: Ec2Emulator) -> None:
    plan = make_aws(emulator, {**aws_env, "DRY_RUN": "1", "RUN_TIMEOUT": "54000"}, "sweep")
    assert "ABOVE: `make sweep` refuses it" in plan.stdout
    done = make_aws(emulator, {**aws_env, "RUN_TIMEOUT": "54000"}, "sweep")
    assert done.returncode != 0
    assert (f"the sweep's cost ceiling is ${(0.023 + 0.0464) * 7 * 15:.2f} (6 runs at RUN_TIMEOUT=54000 s), "
            f"above MAX_SWEEP_COST=5:") in done.stderr
    assert instances(emulator) == [] and not Path(aws_env["NODES_FILE"]).exists()
    raised = make_aws(emulator, {**aws_env, "RUN_TIMEOUT": "54000", "MAX_SWEEP_COST": "10", "DRY_RUN": "1"},
                      "sweep")
    assert raised.returncode == 0 and "within MAX_SWEEP_COST=10" in raised.stdout


def test_cost_columns_and_the_cheapest_for_their_speed(tmp_path: Path) -> None:
    """AWS rows: speed-up and efficiency per type, cost per epoch, and which points no other beats."""
    import sweep

    def row(kind: str, size: int, epoch_s: float, cost: float) -> dict:
        return {"type": kind, "size": size, "state": "done", "epoch_s": epoch_s, "wall_seconds": 10 * epoch_s,
                "cost_usd": cost}

    record = {"plan": {"epochs": 10, "sizes": [1, 2, 4]}, "points": {
        "small/1": row("small", 1, 40.0, 0.02), "small/2": row("small", 2, 25.0, 0.03),
        "small/4": row("small", 4, 20.0, 0.05), "large/1": row("large", 1, 30.0, 0.04)}}
    rows = sweep.derived(record)
    by_key = {f"{r['type']}/{r['size']}": r for r in rows}
    assert by_key["small/2"]["speedup"] == pytest.approx(1.6)
    assert by_key["small/4"]["efficiency"] == pytest.approx(0.5)
    assert by_key["large/1"]["speedup"] == pytest.approx(1.0)
    assert by_key["small/2"]["cost_per_epoch_usd"] == pytest.approx(0.003)
    # large/1 costs more per epoch than small/2 and is slower: never the cheapest for its speed
    assert sorted(f"{r['type']}/{r['size']}" for r in sweep.cheapest_for_speed(rows)) == [
        "small/1", "small/2", "small/4"]
    table = sweep.table(record["plan"], rows, "")
    assert "| small | 2 | done | - | - | 25.00 | - | 1.60 | 80% | 250.0 | 0.0300 | 0.00300 |" in table
    sweep.plot(rows, "", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


@pytest.mark.parametrize("ranks", ["0", "2"])
def test_run_on_more_ranks_than_nodes_refuses_and_keeps_nodes_json(project: dict, ranks: str) -> None:
    from test_steps import write_nodes

    state = write_nodes(project, steps={"setup": {"state": "done"}})
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "run.py"), "--nodes", ranks], env=project,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"--nodes {ranks} must be between 1 and the 1 nodes of the cluster: `make up NODES={ranks}` first." \
        in done.stderr
    assert json.loads(Path(project["NODES_FILE"]).read_text()) == state


def test_a_point_whose_fetch_fails_is_recorded_failed_not_the_end_of_the_sweep(
        project: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run trained but `make results` failed (a full disk, a lost link): the point is failed,
    with a reason, and the sweep goes on to its next point instead of stopping there."""
    import config
    import output
    import sweep
    from test_steps import write_nodes

    write_nodes(project, steps={"setup": {"state": "done"}},
                runs=[{"id": "run-1", "state": "done", "started": 0, "finished": 9, "nodes": 1, "fetched": False}])
    for name, value in {**project, "INSTANCE_TYPE": "type-local", "NODES": "1"}.items():
        monkeypatch.setenv(name, value)  # run_point sets the last two; monkeypatch puts them back
    for step in (sweep.up, sweep.setup, sweep.run):
        monkeypatch.setattr(step, "main", lambda argv: 0)

    def fetch_fails(argv: list[str]) -> int:
        raise output.UserError("results of run run-1 failed: no space left on device")

    monkeypatch.setattr(sweep.results, "main", fetch_fails)
    settings = config.load_settings()
    outcome = sweep.run_point(settings, settings, "type-local", 1, 1, 2)
    assert outcome["state"] == "failed" and outcome["reason"] == "run run-1 was not fetched"
    assert outcome["run_id"] == "run-1" and outcome["wall_seconds"] == 9
