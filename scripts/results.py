"""make results: copy the last run's folder to RESULTS_DIR/<run_id>/, once (never overwritten)."""

from __future__ import annotations

import argparse

import common
import report
from common import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-id", help="the run to fetch (default: the last one)")
    parser.add_argument("--no-report", action="store_true", help="copy only; `make report` draws it later")
    args = parser.parse_args(argv)
    settings = common.load_settings()
    with common.exclusive(settings, "results"):
        state = common.need_nodes(settings, "results")
        run = pick_run(state, args.run_id)
        target = settings.results_dir / run["id"]
        if target.exists():
            raise UserError(f"{target} already exists: run {run['id']} was fetched before; move that folder "
                            f"away to fetch it again.")
        common.check_results_dir(settings)
        if settings.dry_run:
            common.show_plan(settings, {**state, "nodes": state["nodes"][:1]}, "results", run["id"])
            return 0
        handles = common.clap(settings, state)
        with common.recording(settings, state, "results"):
            result = handles.role_manager.perform_action(
                common.ROLE, "results", common.node_ids(state)[:1], node_vars=common.node_vars(state),
                extra_args=common.role_vars(settings, state, "results", run["id"]))
            if not result.ok:
                raise UserError(f"results failed: {common.playbook_failure(result, state)}")
            run["fetched"] = str(target)
    if not args.no_report and report.main([str(target)]) != 0:
        common.warn(f"no report for {target}; its files are there all the same.")
    outputs = sorted(p.name for p in target.glob("output-*.txt"))
    common.say(f"run {run['id']} is in {target}: {', '.join(outputs) or 'no output-*.txt'}, "
               f"{len(list(target.glob('*.png')))} images")
    return 0


def pick_run(state: dict, run_id: str | None) -> dict:
    runs = state.get("runs") or []
    if not runs:
        raise UserError("no run yet: run `make run` before `make results`.")
    if run_id is None:
        return runs[-1]
    for run in runs:
        if run["id"] == run_id:
            return run
    raise UserError(f"no run {run_id} in nodes.json: pick one of {', '.join(r['id'] for r in runs)}.")


if __name__ == "__main__":
    common.main_guard(main)
