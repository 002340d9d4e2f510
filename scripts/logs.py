"""make logs: the last lines of every rank's output in the current run (RANK=n for one)."""

from __future__ import annotations

import argparse
import os

import cluster_state
import config
import output
import run_logs
from output import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=int(os.environ.get("LINES_PER_RANK", "15")))
    parser.add_argument("--rank", type=int, default=None if os.environ.get("RANK", "") == ""
                        else int(os.environ["RANK"]))
    args = parser.parse_args(argv)
    settings = config.load_settings()
    state = cluster_state.need_nodes(settings, "logs")
    if not state.get("runs"):
        raise UserError("no run yet: `make run` starts one.")
    run = state["runs"][-1]
    logs = run_logs.read_run_logs(settings, state, run["id"])
    if args.rank is not None and args.rank not in logs:
        raise UserError(f"RANK={args.rank} has no output in run {run['id']}: ranks are 0..{len(state['nodes']) - 1}.")
    print(f"run {run['id']} ({run['state']})")
    for rank, text in sorted(logs.items()):
        if args.rank is None or rank == args.rank:
            print(f"--- rank {rank}: output-{rank}.txt (last {args.lines} lines)")
            print("\n".join(text.splitlines()[-args.lines:]))
    return 0


if __name__ == "__main__":
    output.main_guard(main)
