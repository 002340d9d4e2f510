"""make run: train on every node, one rank each, and wait for all ranks.

A run still going (say after Ctrl-C, or a dropped connection) is re-attached,
never started twice. Ctrl-C stops the watching, not the training.
"""

from __future__ import annotations

import argparse
import time

import common
from common import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = common.load_settings()
    with common.exclusive(settings, "run"):
        state = common.need_nodes(settings, "run")
        if state.get("steps", {}).get("setup", {}).get("state") != "done":
            raise UserError("the nodes are not set up: run `make setup` before `make run`.")
        run = current_run(state)
        if run:
            common.say(f"re-attaching to run {run['id']}, still going since "
                       f"{time.strftime('%H:%M:%S', time.localtime(run['started']))}")
        else:
            run = {"id": time.strftime("run-%Y%m%d-%H%M%S"), "state": "running", "started": time.time(),
                   "epochs": settings.epochs, "nodes": len(state["nodes"]), "fetched": False}
            state.setdefault("runs", []).append(run)
            common.say(f"starting run {run['id']}: {settings.epochs} epochs on {len(state['nodes'])} nodes")
        handles = common.clap(settings, state)
        try:
            with common.recording(settings, state, "run"):
                result = handles.role_manager.perform_action(
                    common.ROLE, "run", common.node_ids(state), node_vars=common.node_vars(state),
                    extra_args=common.role_vars(settings, state, "run", run["id"]))
                run["state"] = "done" if result.ok else "failed"
                run["finished"] = time.time()
                if not result.ok:
                    raise UserError(f"run {run['id']} failed: {common.playbook_failure(result, state)}. "
                                    f"Its outputs so far: `make results`.")
        except KeyboardInterrupt:
            common.warn(f"stopped watching run {run['id']}; the training goes on: `make run` re-attaches.")
            return 130
    common.say(f"run {run['id']} finished in {run['finished'] - run['started']:.1f} s; next: make results")
    return 0


def current_run(state: dict) -> dict | None:
    runs = state.get("runs") or []
    return runs[-1] if runs and runs[-1]["state"] == "running" else None


if __name__ == "__main__":
    common.main_guard(main)
