"""make results: copy every run not fetched yet to RESULTS_DIR/<run_id>/, each once (never overwritten).

RUN_ID=<id> (or --run-id) fetches that run only. A failed or stopped run is fetched too: its
report says how it ended.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import checks
import cluster
import cluster_state
import config
import output
import report
import role
from output import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-id", help="the run to fetch (default: RUN_ID, else every run not fetched yet)")
    parser.add_argument("--no-report", action="store_true", help="copy only; `make report` draws it later")
    args = parser.parse_args(argv)
    settings = config.load_settings()
    fetched: list[Path] = []
    with cluster_state.exclusive(settings, "results"):
        state = cluster_state.need_nodes(settings, "results")
        runs = pick_runs(state, args.run_id or settings.run_id)
        if not runs:
            output.say("nothing to fetch: every finished run is in RESULTS_DIR already (`make status` lists them).")
            return 0
        for run in runs:
            target = settings.results_dir / run["id"]
            if target.exists():
                raise UserError(f"{target} already exists: run {run['id']} was fetched before; move that folder "
                                f"away to fetch it again.")
        checks.check_results_dir(settings)
        master = {**state, "nodes": state["nodes"][:1]}  # the shared filesystem is read on rank 0
        if settings.dry_run:
            for run in runs:
                role.show_plan(settings, master, "results", run["id"])
            return 0
        handles = cluster.clap(settings, state)
        with cluster_state.recording(settings, state, "results"):
            for run in runs:
                target = settings.results_dir / run["id"]
                result = role.play(settings, handles, master, "results", run["id"])
                if not result.ok:
                    raise UserError(f"results of run {run['id']} failed: {role.playbook_failure(result, state)}")
                run["fetched"] = str(target)
                cluster_state.write_state(settings, state)  # a later failure keeps this run's fetch on record
                fetched.append(target)
    for target in fetched:
        if not args.no_report and report.main([str(target)]) != 0:
            output.warn(report.NO_REPORT.format(folder=target))
        outputs = sorted(p.name for p in target.glob("output-*.txt"))
        output.say(f"run {target.name} is in {target}: {', '.join(outputs) or 'no output-*.txt'}, "
                   f"{len(list(target.glob('*.png')))} images")
    return 0


def pick_runs(state: dict, run_id: str) -> list[dict]:
    """The run named, or every finished run (done, failed or stopped) not fetched yet, oldest first."""
    runs = state.get("runs") or []
    if not runs:
        raise UserError("no run yet: run `make run` before `make results`.")
    if run_id:
        for run in runs:
            if run["id"] == run_id:
                return [run]
        raise UserError(f"RUN_ID={run_id}: no such run in nodes.json: pick one of {', '.join(r['id'] for r in runs)}.")
    for run in runs:
        if run.get("state") == "running":
            output.warn(f"run {run['id']} is still going, not fetched: `make run` waits for it, then `make results`.")
    return [run for run in runs if not run.get("fetched") and run.get("state") != "running"]


if __name__ == "__main__":
    output.main_guard(main)
