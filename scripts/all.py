"""make all: up, setup, run, results, then down.

On a failure the nodes are kept (so the failed step can be fixed and re-run
alone) and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import checks
import cluster
import cluster_state
import config
import down
import output
import report
import results
import role
import run
import setup
import up
from output import UserError

STEPS = (("up", up), ("setup", setup), ("run", run), ("results", results))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    if settings.dry_run:
        return show_whole_plan(settings)
    fetched_before = fetched(settings)
    for index, (name, step) in enumerate(STEPS):
        try:
            status = step.main(["--no-report"] if step is results else [])
        except UserError as error:
            output.fail(str(error))
            status = 1
        if status != 0:
            if live_nodes(settings):  # otherwise the step's own message, with its fix, is all there is to say
                output.fail(f"`make all` stopped at `{name}`. The nodes are KEPT and still running.\n"
                            f"  resume:   make {' '.join(n for n, _ in STEPS[index:])} down\n"
                            f"  or stop:  make down")
            return status
    # A report needs only the fetched files: drawn while the nodes stop, it adds no time of its own.
    drawings = {folder: subprocess.Popen([sys.executable, report.__file__, str(folder)], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
                for folder in fetched(settings) if folder not in fetched_before}
    try:
        return down.main([])
    finally:
        for folder, drawing in drawings.items():
            print(drawing.communicate()[0], end="")
            if drawing.returncode != 0:
                output.warn(report.NO_REPORT.format(folder=folder))


def fetched(settings: config.Settings) -> list[Path]:
    """The folders of the runs nodes.json records as fetched."""
    runs = (cluster_state.read_state(settings) or {}).get("runs") or []
    return [Path(run["fetched"]) for run in runs if run.get("fetched")]


def live_nodes(settings: config.Settings) -> bool:
    """Does nodes.json list nodes that are still running? Without CLAP to ask, a listed node counts."""
    try:
        state = cluster_state.read_state(settings)
    except UserError:
        return True  # a damaged nodes.json may still stand for nodes: `make down` finds them
    if not state or not state.get("nodes"):
        return False
    try:
        alive = cluster.nodes_alive(cluster.clap(settings, state), cluster_state.node_ids(state))
    except UserError:
        return True
    return any(alive.values())


def show_whole_plan(settings: config.Settings) -> int:
    """Every step's plan; on no cluster, placeholders stand for what only the started nodes know."""
    state = cluster_state.read_state(settings)
    cluster_state.check_provider(settings, state)
    checks.preflight(settings)
    if state and state.get("nodes"):
        print(f"DRY RUN: the {len(state['nodes'])} nodes of {settings.nodes_file.name} are up already.")
    else:
        up.show_plan(settings, settings.nodes)
        state = {"cluster_id": "<cluster id>", "provider": settings.provider, "created": time.time(), "runs": [],
                 "nodes": [{"id": f"<node {rank}>", "rank": rank, "address": f"<address of node {rank}>",
                            "private_address": f"<private address of node {rank}>"}
                           for rank in range(settings.nodes)]}
    run_id = "<run id>"  # `make run` picks it from the time it starts
    role.show_plan(settings, state, "setup")
    role.show_plan(settings, state, "run", run_id)
    role.show_plan(settings, {**state, "nodes": state["nodes"][:1]}, "results", run_id)
    print(down.plan(settings, cluster_state.node_ids(state)))
    return 0


if __name__ == "__main__":
    output.main_guard(main)
