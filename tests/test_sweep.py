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
from test_clap_e2e import app_processes, interruptible_make


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
    ({"SAMPLE_ITERATIONS": "many"}, "SAMPLE_ITERATIONS='many' is not a whole number: set it like "
                                    "SAMPLE_ITERATIONS=20."),
    ({"SAMPLE_ITERATIONS": "7"}, "SAMPLE_ITERATIONS=7 must be at least 8 (or 0, no sample): past the 3 slower "
                                 "first ones, fewer steps show no pace or spread; set it like SAMPLE_ITERATIONS=20."),
    ({"VALIDATE": "1"}, "VALIDATE=1 compares each point's prediction with its full run: set SAMPLE_ITERATIONS too, "
                        "like SAMPLE_ITERATIONS=20."),
    ({"DEADLINE": "0"}, "DEADLINE='0' must be a number of minutes above 0: set it like DEADLINE=30."),
    ({"DEADLINE": "soon"}, "DEADLINE='soon' must be a number of minutes above 0"),
    ({"BUDGET": "-1"}, "BUDGET='-1' must be a number of US dollars: set it like BUDGET=2."),
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


def interrupt(sweep: subprocess.Popen) -> None:
    """A sweep still going when its test ends (it failed) gets a Ctrl-C, as from a user, so that it stops
    its nodes; killing `make` alone would leave the sweep going on behind the fixture's `make down`."""
    if sweep.poll() is None:
        os.killpg(sweep.pid, signal.SIGINT)
        try:
            sweep.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.communicate()


def sweep_record(env: dict) -> tuple[Path, dict]:
    folder = next(Path(env["RESULTS_DIR"]).glob("sweep-*"))
    return folder, json.loads((folder / "sweep.json").read_text())


def kill_rank_in_point(env: dict, point: int, rank: int, points: int = 3) -> None:
    """Once the (first) run of that point trains on that rank, kill the rank's app (SIGKILL). `make status`
    is asked before: the run of a point is a few seconds long, and the app would end while it answered."""
    nodes_file, runs = Path(env["NODES_FILE"]), Path(env["EFS_MOUNT_POINT"]) / "dcgan" / "runs"
    deadline = time.monotonic() + 300
    status_seen = False
    while time.monotonic() < deadline:
        try:
            state = json.loads(nodes_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("sweep", {}).get("point") == point and not status_seen:
            assert f"sweep: point {point} of {points} ({point} type-local nodes)" in make(env, "status").stdout
            status_seen = True
        run = (state.get("runs") or [{}])[-1]
        if status_seen and run.get("state") == "running" and \
                "[iteration: 0/" in "".join(p.read_text() for p in runs.glob(f"{run['id']}/output-{rank}.txt")):
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
    sweep = interruptible_make(["sweep"], env)
    try:
        kill_rank_in_point(env, point=2, rank=1)
        out, err = sweep.communicate(timeout=600)
    finally:
        interrupt(sweep)
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
    import sweep_report

    def row(kind: str, size: int, epoch_s: float, cost: float) -> dict:
        return {"type": kind, "size": size, "state": "done", "epoch_s": epoch_s, "wall_seconds": 10 * epoch_s,
                "cost_usd": cost}

    record = {"plan": {"epochs": 10, "sizes": [1, 2, 4]}, "points": {
        "small/1": row("small", 1, 40.0, 0.02), "small/2": row("small", 2, 25.0, 0.03),
        "small/4": row("small", 4, 20.0, 0.05), "large/1": row("large", 1, 30.0, 0.04)}}
    rows = sweep_report.derived(record)
    by_key = {f"{r['type']}/{r['size']}": r for r in rows}
    assert by_key["small/2"]["speedup"] == pytest.approx(1.6)
    assert by_key["small/4"]["efficiency"] == pytest.approx(0.5)
    assert by_key["large/1"]["speedup"] == pytest.approx(1.0)
    assert by_key["small/2"]["cost_per_epoch_usd"] == pytest.approx(0.003)
    # large/1 costs more per epoch than small/2 and is slower: never the cheapest for its speed
    assert sorted(f"{r['type']}/{r['size']}" for r in sweep_report.cheapest_for_speed(rows)) == [
        "small/1", "small/2", "small/4"]
    table = sweep_report.table(record["plan"], rows, "")
    assert "| small | 2 | done | - | - | 25.00 | - | 1.60 | 80% | 250.0 | 0.0300 | 0.00300 |" in table
    sweep_report.plot(rows, "", tmp_path / "sweep.png")
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


@pytest.fixture
def sampled_env(env: dict) -> dict:
    """Sizes 1 and 2 of 512 images, one epoch: 16 iterations per rank on 1 node, 8 on 2; a sample of 12
    iterations past the first is then a part of the first run and the whole of the second."""
    env.update(SIZES="1,2", SYNTHETIC_IMAGES="512", SAMPLE_ITERATIONS="12", VALIDATE="1")
    return env


def test_a_sampled_sweep_records_a_failed_sample_predicts_validates_and_resumes(sampled_env: dict) -> None:
    env = sampled_env
    sweep = interruptible_make(["sweep"], env)
    try:
        kill_rank_in_point(env, point=1, rank=0, points=2)  # during the sample, the point's first run
        out, err = sweep.communicate(timeout=600)
    finally:
        interrupt(sweep)
    assert sweep.returncode != 0, out[-3000:] + err[-3000:]
    assert "failed: type-local/1; `make sweep` again redoes them." in out
    folder, record = sweep_record(env)
    failed, whole = record["points"]["type-local/1"], record["points"]["type-local/2"]
    assert failed["sample"]["state"] == "failed" and "the app exited with code" in failed["sample"]["reason"]
    assert "state" not in failed  # its full run was not tried after a failed sample
    assert whole["sample"]["whole_run"] and whole["state"] == "done" and whole["epoch_s"] > 0  # measured
    assert "- type-local/1: the sample failed: " in (folder / "sweep.md").read_text()
    assert not Path(env["NODES_FILE"]).exists() and leftovers(subnet_tag(251)) == []

    again = make(env, "sweep")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "point 1 of 1: 1 type-local nodes" in again.stdout and "the sample predicts" in again.stdout
    _, record = sweep_record(env)
    point = record["points"]["type-local/1"]
    prediction = point["sample"]["prediction"]
    assert point["sample"]["state"] == "done" and point["state"] == "done"
    assert prediction["wall_low_s"] <= prediction["wall_s"] <= prediction["wall_high_s"]
    # The sample stopped before the end: in iterations (below), not in seconds, which the machine's load
    # sets (in CI a 27 s sample outlasted its 22 s full run).
    assert point["sample"]["wall_seconds"] > 0
    sample_run = Path(env["RESULTS_DIR"]) / point["sample"]["run_id"]
    assert (sample_run / ".rank-0.clock").exists() and not (sample_run / "summary.md").exists()
    log = (sample_run / "output-0.txt").read_text()
    assert "[iteration: 12/16]" in log and "Epoch 0 took" not in log
    table = (folder / "sweep.md").read_text()
    assert "## Measured: full runs" in table and "## Predicted from a sample of 12 iterations past the first" in table
    assert "## Predicted against measured" in table
    score = "Predicted wall time against measured: median absolute error "
    assert score in table and score in again.stdout and "this machine's load average (1 min) " in again.stdout
    assert "The samples' own cost: their runs took " in table

    fetched = sorted(p.name for p in Path(env["RESULTS_DIR"]).iterdir())
    last = make(env, "sweep", DEADLINE="10")
    assert last.returncode == 0 and "point 1 of" not in last.stdout
    assert "DEADLINE=10 min: " in last.stdout and "nodes, the cheapest that meets it: " in last.stdout
    assert sorted(p.name for p in Path(env["RESULTS_DIR"]).iterdir()) == fetched  # no new run
    assert "DEADLINE=10 min: " in (folder / "sweep.md").read_text()


def test_aws_plan_of_a_sampled_sweep_counts_both_runs_and_warns_of_burstable_types(
        aws_env: dict, emulator: Ec2Emulator) -> None:
    done = make_aws(emulator, {**aws_env, "DRY_RUN": "1", "SAMPLE_ITERATIONS": "20", "VALIDATE": "1"}, "sweep")
    assert done.returncode == 0, done.stderr
    assert "a sample of 20 iterations past the first per point, and each in full (VALIDATE)" in done.stdout
    assert "point 1 of 6: type-t2.small, 1 nodes (ranks 0..0); starts 1 nodes; runs: sample then full" in done.stdout
    assert f"cost ceiling ${(0.023 + 0.0464) * 7 * 2:.2f}" in done.stdout  # a sample and a full run per point
    assert "type-t2.small, type-t2.medium are burstable types (T-type)" in done.stdout
    assert instances(emulator) == [] and not Path(aws_env["NODES_FILE"]).exists()


def sampled_point(kind: str, size: int, wall: float, high: float, cost: float | None = None,
                  measured: float | None = None) -> dict:
    """A point's record as `make sweep` writes it: its sample's prediction, and a measured run."""
    prediction = {"first_iteration_s": 5.0, "epoch_s": wall / 3, "end_s": 1.0, "wall_s": wall,
                  "wall_low_s": wall * 0.9, "wall_high_s": high}
    if cost is not None:
        prediction.update(cost_usd=cost, cost_low_usd=cost * 0.9, cost_high_usd=cost * high / wall)
    point = {"type": kind, "size": size, "setup_seconds": 5.0,
             "sample": {"state": "done", "run_id": f"run-s{size}", "wall_seconds": 9.0, "seconds": 12.0,
                        "timing": {"step": 0.1}, "prediction": prediction}}
    if measured is not None:
        point.update(state="done", run_id=f"run-f{size}", wall_seconds=measured, seconds=measured + 3,
                     epoch_s=measured / 3, timing={"first": 5.5, "step": 0.11, "end": 1.2})
    return point


def settings_with(**values: str) -> object:
    import config

    return config.load_settings({"ENV_FILE": os.devnull, **values})


def test_a_second_sweep_on_the_same_record_refuses_naming_the_first(tmp_path: Path) -> None:
    import cluster_state
    import output

    first = cluster_state.exclusive_file(tmp_path / "sweep.json", "sweep")
    second = cluster_state.exclusive_file(tmp_path / "sweep.json", "sweep")
    with first, pytest.raises(output.UserError) as refused, second:
        pass
    assert str(refused.value) == (f"`make sweep` (PID {os.getpid()}) is using sweep.json: wait for it to end (or stop "
                                  f"it), then run `make sweep` again.")
    with cluster_state.exclusive_file(tmp_path / "sweep.json", "sweep"):  # free again once the first ended
        pass


def test_a_deadline_picks_the_fewest_node_hours_locally_and_a_budget_the_fastest() -> None:
    import sweep_report

    record = {"plan": {"epochs": 2, "sizes": [1, 2, 4]}, "points": {
        "type-local/1": sampled_point("type-local", 1, 300.0, 330.0),
        "type-local/2": sampled_point("type-local", 2, 200.0, 210.0),
        "type-local/4": sampled_point("type-local", 4, 120.0, 190.0)}}
    # 1 node: 0.083 node-hours but up to 5.5 min; 2 nodes: 0.111, up to 3.5 min; 4 nodes: 0.133
    pick = sweep_report.recommendation(settings_with(DEADLINE="5"), record)
    assert pick["key"] == "type-local/2"
    assert pick["line"].startswith("DEADLINE=5 min: 2 type-local nodes, the cheapest that meets it: 3.3 min "
                                   "predicted (up to 3.5), 0.111 node-hours (ranked by nodes x hours")
    assert sweep_report.recommendation(settings_with(DEADLINE="6"), record)["key"] == "type-local/1"
    assert sweep_report.recommendation(settings_with(BUDGET="0"), record)["key"] == "type-local/4"
    none = sweep_report.recommendation(settings_with(DEADLINE="1"), record)
    assert none["key"] is None
    assert none["line"] == "DEADLINE=1 min: no point fits; the fastest, 4 type-local nodes, takes 2.0 min predicted " \
                           "(up to 3.2), 0.133 node-hours."
    assert sweep_report.recommendation(settings_with(), record) is None


def test_on_aws_a_deadline_picks_the_cheapest_and_a_measured_run_beats_its_prediction() -> None:
    import sweep_report

    record = {"plan": {"epochs": 2, "sizes": [1, 2]}, "points": {
        "small/1": sampled_point("small", 1, 600.0, 700.0, cost=0.004),
        "small/2": sampled_point("small", 2, 400.0, 450.0, cost=0.005, measured=500.0),
        "large/1": sampled_point("large", 1, 300.0, 320.0, cost=0.008)}}
    record["points"]["small/2"]["cost_usd"] = 0.0064
    aws = settings_with(PROVIDER="aws", DEADLINE="10", INSTANCE_TYPE="type-t2.small")
    pick = sweep_report.recommendation(aws, record)
    assert pick["key"] == "small/2"  # small/1 is cheaper but may take 700 s; small/2 measured 500 s
    assert "8.3 min measured, $0.0064 (ranked by cost" in pick["line"]
    budget = settings_with(PROVIDER="aws", BUDGET="0.0065", INSTANCE_TYPE="type-t2.small")
    assert sweep_report.recommendation(budget, record)["key"] == "small/2"  # large/1 is faster but above it


def test_sweep_md_keeps_predicted_and_measured_apart_and_scores_the_prediction(tmp_path: Path) -> None:
    import sweep_report

    record = {"plan": {"epochs": 2, "sizes": [1, 2, 4], "sample_iterations": 20}, "points": {
        "type-local/1": sampled_point("type-local", 1, 110.0, 120.0, measured=100.0),
        "type-local/2": sampled_point("type-local", 2, 60.0, 70.0, measured=75.0),
        "type-local/4": {"type": "type-local", "size": 4,
                         "sample": {"state": "failed", "reason": "`make run` ended with status 1"}}}}
    record["points"]["type-local/1"]["sample"]["load"] = [2.0, 2.5]  # this machine's load at the runs' ends
    record["points"]["type-local/1"]["load"] = [2.5, 7.5]
    settings = settings_with(DEADLINE="2")
    sweep_report.write(settings, tmp_path, record, burstable=[])
    text = (tmp_path / "sweep.md").read_text()
    measured, predicted = text.split("## Predicted from a sample")[0], text.split("## Predicted from a sample")[1]
    assert "| type-local | 1 | done | run-f1 |" in measured and "run-s1" not in measured
    assert "| type-local | 1 | done | run-s1 | 9.0 | - | 5.0 | 0.100 | 36.67 | 1.00 | 110.0 | 99.0-120.0 |" in predicted
    assert "- type-local/4: the sample failed: `make run` ended with status 1" in predicted
    assert "| type-local | 2 | 60.0 | 54.0-70.0 | 75.0 | -20.0% | NO | 5.0 / 5.5 | 0.100 / 0.110 |" in text
    assert "| 2.0-2.5 / 2.5-7.5 |" in text and "| - / - |" in text  # the load, where it was recorded
    line = ("Predicted wall time against measured: median absolute error 15.0%, largest 20.0% (type-local/2); "
            "1 of 2 measured runs inside their interval; this machine's load average (1 min) 2.0-7.5 at the runs' "
            "starts and ends.")
    assert line in text and sweep_report.error_line(record) == line  # make sweep prints it last but the pick
    assert ("their runs took 18.0 s against 175.0 s for the same points' full runs (10%); as whole sweeps (each "
            "point's nodes started and set up, its run and fetch) 34.0 s against 191.0 s (18%).") in text
    assert ("in the full runs they took 13.4 s of 175.0 s (8%), so sampling saves most on runs that are long "
            "against their start.") in text  # first 5.5 s and end 1.2 s of each full run
    assert text.rstrip().endswith("held to the top of the interval).")  # the pick: the last line
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    for point in record["points"].values():  # on AWS each point has its hourly price
        point["hourly_usd"] = 0.0464
    dollars = "34.0 s against 191.0 s (18%), $0.0004 against $0.0025 on AWS. A sample pays"
    assert dollars in sweep_report.validation(record)
