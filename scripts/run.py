"""make run: train on every node, one rank each, and wait for all ranks.

While it trains, one line per rank shows epoch, iteration, speed and ETA.
A run still going (after Ctrl-C, or a dropped connection) is re-attached,
never started twice. Ctrl-C stops the watching, not the training.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

import cluster
import cluster_state
import config
import dcgan_logs
import output
import role
import run_logs
from output import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--every", type=float, default=float(os.environ.get("PROGRESS_EVERY", config.PROGRESS_EVERY_S)),
                        help="seconds between two progress reports (default %(default)s)")
    parser.add_argument("--nodes", type=int, help="train on ranks 0..NODES-1 only (default: every node)")
    parser.add_argument("--clock", action="store_true", help="note when each line of the ranks' logs arrives")
    parser.add_argument("--sample", type=int, default=0, metavar="K",
                        help="a sample: stop once every rank has done K iterations past its first (implies --clock)")
    args = parser.parse_args(argv)
    settings = config.load_settings()
    with cluster_state.exclusive(settings, "run"):
        state = cluster_state.need_nodes(settings, "run")
        if args.nodes is not None and not 1 <= args.nodes <= len(state["nodes"]):
            raise UserError(f"--nodes {args.nodes} must be between 1 and the {len(state['nodes'])} nodes of the "
                            f"cluster: `make up NODES={args.nodes}` first.")
        run = current_run(state)
        # The ranks of this run, or of the run re-attached to; nodes.json keeps every node (state is what is written).
        ranks = {**state, "nodes": state["nodes"][:run.get("nodes") if run else args.nodes]}
        if state.get("steps", {}).get("setup", {}).get("state") != "done":
            raise UserError("the nodes are not set up: run `make setup` before `make run`.")
        if settings.dry_run:
            role.show_plan(settings, ranks, "run", (run or {}).get("id") or new_run_id(state))
            return 0
        if run:
            output.say(f"re-attaching to run {run['id']}, going since {_clock(run['started'])}")
        else:
            run = {"id": new_run_id(state), "state": "running", "started": time.time(),
                   "epochs": settings.epochs, "nodes": len(ranks["nodes"]), "fetched": False}
            if args.clock or args.sample:
                run["clock"] = True
            if args.sample:
                run["sample_iterations"] = args.sample
            state.setdefault("runs", []).append(run)
            output.say(f"starting run {run['id']}: " + (f"a sample of {args.sample} iterations past the first of "
                                                        if args.sample else "")
                       + f"{settings.epochs} epochs on {len(ranks['nodes'])} nodes")
        handles = cluster.clap(settings, state)
        progress = Progress(settings, ranks, run["id"], handles, args.every, run.get("sample_iterations", 0))
        try:
            with cluster_state.recording(settings, state, "run"):
                progress.start()
                result = role.play(settings, handles, ranks, "run", run["id"])
                if result.ret_code == role.PLAYBOOK_CANCELED:
                    raise KeyboardInterrupt
                # The ranks of a sample that ended well were stopped: their logs end in the stop's traceback.
                progress.finish(report=not (result.ok and run.get("sample_iterations")))
                if not result.ok:
                    stop_watching_if_only_contact_is_lost(handles, result, run)
                # A sample that ended well is a sample, not a whole run.
                run["state"] = ("sampled" if run.get("sample_iterations") else "done") if result.ok else "failed"
                run["finished"] = time.time()
                if not result.ok:
                    run["reason"] = role.playbook_failure(result, ranks)
                    raise UserError(f"run {run['id']} failed: {run['reason']}. Its outputs so far: `make results`.")
        except KeyboardInterrupt:
            progress.finish(report=False)
            output.warn(f"stopped watching run {run['id']}; the training goes on: `make run` re-attaches, "
                        f"`make logs` shows its output.")
            return 130
    output.say(f"run {run['id']} {run['state'] if run['state'] == 'sampled' else 'finished'} in "
               f"{run['finished'] - run['started']:.1f} s; next: make results")
    return 0


def stop_watching_if_only_contact_is_lost(handles: cluster.Clap, result: Any, run: dict) -> None:
    """A node that stops answering SSH (a laptop losing its Wi-Fi) may still be training: while its
    provider says it is there, the run is not failed but left running, for `make run` to re-attach.
    A rank that really died ends the run by itself, through its peers' watchdogs."""
    lost = role.unreachable_only(result)
    if lost and all(cluster.nodes_alive(handles, lost).values()):
        names = ", ".join(cluster_state.short_id(node_id) for node_id in lost)
        raise UserError(f"lost contact with node {names} (no answer to SSH for {cluster.SSH_SILENCE_S} s); the "
                        f"nodes are up and run {run['id']} goes on there: `make run` re-attaches once they answer, "
                        f"`make status` shows them.")


def current_run(state: dict) -> dict | None:
    runs = state.get("runs") or []
    return runs[-1] if runs and runs[-1]["state"] == "running" else None


def new_run_id(state: dict) -> str:
    taken = {run["id"] for run in state.get("runs", [])}
    base = time.strftime("run-%Y%m%d-%H%M%S")
    return next(f"{base}{suffix}" for suffix in ["", *(f"-{n}" for n in range(2, 100))]
                if f"{base}{suffix}" not in taken)


class Progress(threading.Thread):
    """Reports every rank's progress from its log while the playbook waits."""

    def __init__(self, settings: config.Settings, state: dict, run_id: str, handles: cluster.Clap,
                 every: float, sample: int = 0) -> None:
        super().__init__(daemon=True)
        self.settings, self.state, self.every = settings, state, every
        self.sample = sample  # a sample's ranks are stopped once done: their logs end in the stop's traceback
        self.logs = run_logs.RunLogs(settings, state, run_id, handles)
        self.stopped = threading.Event()
        self.sizes: dict[int, tuple[int, float]] = {}  # rank -> (log size, when it last grew)
        self.shown = ""  # the last report printed

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.report()

    def finish(self, report: bool = True) -> None:
        self.stopped.set()
        if report:
            self.join()  # a report under way ends first: the last one shown is then the last one made
            self.report(only_news=True)

    def report(self, only_news: bool = False) -> None:
        try:
            logs = self.logs.read()
        except (OSError, UserError) as error:  # a missed report is no reason to stop the run
            output.warn(f"no progress this time: {error}")
            return
        now = time.time()
        lines = []
        for rank in range(len(self.state["nodes"])):
            text = logs.get(rank, "")
            size, since = self.sizes.get(rank, (-1, now))
            if len(text) != size:
                self.sizes[rank] = (len(text), now)
            log = dcgan_logs.parse_log(text)
            log.rank = rank if log.rank is None else log.rank
            if self.sample and log.status == dcgan_logs.STATUS_FAILED and len(log.iterations) > self.sample:
                lines.append(f"rank {rank}  sampled: stopped after {len(log.iterations) - 1} iterations past its first")
                continue
            lines.append(dcgan_logs.progress_line(log, now, self.sizes[rank][1], color=sys.stdout.isatty(),
                                                  stall_bound=self.settings.stall_timeout or None))
        shown = "\n           ".join(lines)
        if only_news and shown == self.shown:
            return
        self.shown = shown
        print(f"[{_clock(now)}] {shown}", flush=True)


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


if __name__ == "__main__":
    output.main_guard(main)
