"""make sweep: the same experiment on every cluster size of SIZES (and, on AWS, every INSTANCE_TYPES).

Per type the cluster grows from the smallest size to the next (setup only on the new
nodes); the run of size k trains on ranks 0..k-1. Every run is fetched as `make results`
does; RESULTS_DIR/sweep-<id>/ gets sweep.json, sweep.md and sweep.png. The id is a hash of
the plan, so `make sweep` again resumes: points done are not run twice, failed ones are.

With SAMPLE_ITERATIONS=K each point trains only until every rank has done K iterations past
its first, and predicts its full run from that sample (scripts/predict.py); VALIDATE=1 also
runs it in full and compares. DEADLINE and BUDGET name the point to pick (sweep_report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from pathlib import Path

import aws_nodes
import checks
import clap_configs
import cluster_state
import config
import dcgan_logs
import down
import output
import predict
import results
import run
import setup
import sweep_plan
import sweep_report
import up
from output import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    per_type = {kind: sweep_plan.type_settings(kind) for kind in settings.instance_types}
    flavors = {}
    for kind, typed in per_type.items():
        try:
            flavors[kind] = str(clap_configs.check_configs(typed).get("flavor", ""))
        except UserError as error:
            raise UserError(f"INSTANCE_TYPES={','.join(settings.instance_types)}: {error}") from None
        sweep_plan.check_size(typed, settings.sizes[-1])
    plan = sweep_plan.plan(settings)
    folder = settings.results_dir / f"sweep-{sweep_plan.sweep_id(plan)}"
    record = sweep_plan.read_record(folder, plan)
    todo = sweep_plan.points_to_run(settings, record)
    ceiling = sweep_plan.cost_ceiling(settings, per_type, record, todo)
    burstable = [kind for kind, flavor in flavors.items() if sweep_plan.BURSTABLE.match(flavor)] \
        if settings.sample_iterations else []
    if settings.dry_run:
        sweep_plan.show_plan(settings, record, todo, ceiling, folder, burstable)
        return 0
    if ceiling is not None and ceiling > settings.max_sweep_cost:
        runs = sweep_plan.runs_to_do(settings, record, todo)
        raise UserError(f"the sweep's cost ceiling is ${ceiling:.2f} ({runs} runs at "
                        f"RUN_TIMEOUT={settings.run_timeout} s), above MAX_SWEEP_COST={settings.max_sweep_cost:g}: "
                        f"fewer SIZES or INSTANCE_TYPES, a lower RUN_TIMEOUT, or a higher MAX_SWEEP_COST.")
    if todo:
        state = cluster_state.read_state(settings)
        if state and state.get("nodes"):
            raise UserError(f"{settings.nodes_file.name} lists a cluster of {len(state['nodes'])} nodes: "
                            f"`make down` first (the sweep starts its own nodes).")
        checks.preflight(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with cluster_state.exclusive_file(folder / "sweep.json", "sweep"):
        # Again, under the lock: a sweep that just ended may have written it.
        record = sweep_plan.read_record(folder, plan)
        return sweep(settings, per_type, folder, record, sweep_plan.points_to_run(settings, record), burstable)


def sweep(settings: config.Settings, per_type: dict, folder: Path, record: dict, todo: list[tuple[str, int]],
          burstable: list[str]) -> int:
    """Run the points still to do, one after the other, recording each; then `make down` and the report."""
    if burstable:
        output.warn(sweep_report.burstable_note(burstable))
    for number, (kind, size) in enumerate(todo, start=1):
        if number > 1 and todo[number - 2][0] != kind and down.main([]) != 0:
            raise UserError("`make down` failed between two instance types: run `make down`, then `make sweep`.")
        output.say(f"point {number} of {len(todo)}: {size} {kind} nodes")
        record["points"][f"{kind}/{size}"] = run_point(settings, per_type[kind], kind, size, number, len(todo),
                                                       sweep_plan.point(record, kind, size))
        write_outputs(settings, folder, record, burstable)
    if todo and down.main([]) != 0:
        raise UserError("`make down` failed at the end of the sweep: run `make down` again.")
    write_outputs(settings, folder, record, burstable)
    failed = [key for key, p in record["points"].items() if sweep_plan.parts_to_run(settings, p)]
    output.say(f"sweep in {folder}: {len(record['points']) - len(failed)} points done"
               + (f", failed: {', '.join(failed)}; `make sweep` again redoes them." if failed else "."))
    if burstable:
        output.warn(sweep_report.burstable_note(burstable))
    scored = sweep_report.error_line(record)
    if scored:
        output.say(scored)
    pick = sweep_report.recommendation(settings, record)
    if pick:
        output.say(pick["line"])
    return 1 if failed else 0


def run_point(settings: config.Settings, typed: config.Settings, kind: str, size: int, number: int,
              points: int, before: dict | None = None) -> dict:
    """up (grow), setup, then the parts the point still needs on ranks 0..size-1, each fetched: the
    point's record. A failed sample skips the full run (it would fail alike, and it is redone later)."""
    os.environ.update({"INSTANCE_TYPE": kind, "NODES": str(size)})
    started = time.monotonic()
    for step in (up, setup):
        if step.main([]) != 0:
            raise UserError(f"`make {step.__name__}` failed for {size} {kind} nodes: fix it, then `make sweep`.")
    cluster = {"setup_seconds": time.monotonic() - started}  # growing to this size: a sampled or full sweep alike
    state = cluster_state.read_state(settings)
    state["sweep"] = {"point": number, "of": points, "type": kind, "size": size}
    cluster_state.write_state(settings, state)
    before = before or {}
    parts = sweep_plan.parts_to_run(settings, before)
    full = {name: value for name, value in before.items()
            if name not in ("type", "size", "sample", "setup_seconds", "hourly_usd")}
    sample = before.get("sample")
    hourly = aws_nodes.hourly_cost(typed, size) if settings.provider == "aws" else None
    if hourly is not None:
        cluster["hourly_usd"] = hourly
    if "sample" in parts:
        sample, whole = sample_run(settings, size, hourly)
        if whole is not None:  # the sample was the whole run: nothing left to run in full
            full, parts = whole, []
    if "full" in parts and (sample is None or sample["state"] == "done"):
        full = full_run(settings, size, hourly)
    return {"type": kind, "size": size, **cluster, **full, **({"sample": sample} if sample else {})}


def sample_run(settings: config.Settings, size: int, hourly: float | None) -> tuple[dict, dict | None]:
    """The point's sample and what it predicts; and when the app ended before the sample did (a run of
    fewer iterations), the measured run it then is."""
    outcome, last = fetched_run(settings, size, settings.sample_iterations)
    if hourly is not None:
        outcome["sample_cost_usd"] = hourly * outcome["wall_seconds"] / 3600
    if outcome["state"] != "done":
        return outcome, None
    folder = settings.results_dir / last["id"]
    logs = dcgan_logs.parse_run_folder(folder)
    if logs and all(log.finished for log in logs.values()):
        output.say(f"the sample of run {last['id']} was its whole run: measured, nothing to predict")
        return {**outcome, "whole_run": True}, {**outcome, **measured(folder, last, hourly)}
    try:
        terms = predict.timing(folder, last)
    except predict.NoTiming as error:
        return {**outcome, "state": "failed", "reason": f"the sample shows too little to predict from: {error}"}, None
    prediction = predict.predict(terms, settings.epochs, hourly)
    output.say(f"the sample predicts {prediction['wall_s']:.1f} s for the whole run "
               f"({prediction['wall_low_s']:.1f}-{prediction['wall_high_s']:.1f} s)"
               + (f", ${prediction['cost_usd']:.4f}" if hourly is not None else ""))
    return {**outcome, "iterations": settings.sample_iterations, "timing": dataclasses.asdict(terms),
            "prediction": prediction}, None


def full_run(settings: config.Settings, size: int, hourly: float | None) -> dict:
    outcome, last = fetched_run(settings, size, 0)
    folder = settings.results_dir / last["id"]
    return {**outcome, **(measured(folder, last, hourly) if folder.exists() else {})}


def fetched_run(settings: config.Settings, size: int, sample_iterations: int) -> tuple[dict, dict]:
    """One run on ranks 0..size-1 (a sample of that many iterations, or the whole run), with its
    logs' clock, fetched as `make results` does: its record, done or failed, and its nodes.json entry."""
    outcome = {"state": "done"}
    started = time.monotonic()
    # The nodes share this machine: its load at the run's start and end says how steady the pace could be.
    here = settings.provider == "local" and not settings.ssh_hosts
    load = [round(os.getloadavg()[0], 2)] if here else []
    try:
        status = run.main(["--nodes", str(size), "--clock"]
                          + (["--sample", str(sample_iterations)] if sample_iterations else []))
        if status == 130:
            raise KeyboardInterrupt  # Ctrl-C stops the sweep; `make down`, then `make sweep` resumes
        if status != 0:
            outcome.update(state="failed", reason=f"`make run` ended with status {status}")
    except UserError as error:
        output.warn(str(error))
        outcome.update(state="failed", reason=str(error))
    last = cluster_state.read_state(settings)["runs"][-1]
    if here:
        outcome["load"] = [*load, round(os.getloadavg()[0], 2)]
    outcome.update(run_id=last["id"], wall_seconds=last.get("finished", 0) - last["started"],
                   started=last["started"], finished=last.get("finished"))  # its logs' clock is read against them
    try:  # a sample's report would only show its ranks stopped: sweep.md says what it shows
        fetched = results.main(["--run-id", last["id"], *(["--no-report"] if sample_iterations else [])]) == 0
    except UserError as error:  # recorded like a failed run: the other points still run
        output.warn(str(error))
        fetched = False
    if not fetched:
        outcome.update(state="failed", reason=outcome.get("reason") or f"run {last['id']} was not fetched")
    outcome["seconds"] = time.monotonic() - started  # what the run added to the sweep: itself and its fetch
    return outcome, last


def measured(folder: Path, last: dict, hourly: float | None) -> dict:
    """A fetched full run's figures: its epochs, its cost, and the model's terms as it shows them."""
    figures = measure(folder)
    if hourly is not None:
        figures["cost_usd"] = hourly * (last.get("finished", 0) - last["started"]) / 3600
    if last.get("finished"):  # a run without a clock, or one that failed early, has no terms to compare
        with contextlib.suppress(predict.NoTiming):
            figures["timing"] = dataclasses.asdict(predict.timing(folder, last))
    return figures


def measure(folder: Path) -> dict:
    """Epoch times of the slowest rank (the run waits for it) and the images trained per second."""
    logs = dcgan_logs.parse_run_folder(folder)
    if not logs or not all(log.epoch_times for log in logs.values()):
        return {}
    first = max(log.epoch_times[min(log.epoch_times)] for log in logs.values())
    later = [statistics.mean(t for e, t in log.epoch_times.items() if e > 0) for log in logs.values()
             if len(log.epoch_times) > 1]
    epoch = max(later) if later else first
    images = sum((log.iterations_per_epoch or 0) * int(log.args.get("batch_size", 0)) for log in logs.values())
    return {"first_epoch_s": first, "epoch_s": epoch, "images_per_s": images / epoch if epoch else None}


def write_outputs(settings: config.Settings, folder: Path, record: dict, burstable: list[str]) -> None:
    cluster_state.write_json(folder / "sweep.json", record)  # what a resumed sweep reads: never half written
    sweep_report.write(settings, folder, record, burstable)


if __name__ == "__main__":
    output.main_guard(main)
