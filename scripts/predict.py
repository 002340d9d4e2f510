"""Predict a whole run from a sample of its first iterations (`make sweep SAMPLE_ITERATIONS=K`).

The app's log has no clock; each rank's watchdog keeps one for it (`.rank-R.clock`: when each
line arrived, to a few milliseconds), so a sample shows how long each part of a run takes. A run's
wall time, as `make run` records it (from the step's start to its end), is then

    wall = first + warm + (E*I - 1 - W) * step + (E - 1) * loader + (E * ceil(I / 100) - 1) * save + end

for E epochs of I iterations per rank (the log's `[iteration: i/I]`: the data split over the ranks),
with every term measured on the sample as it will be on the full run (`timing` measures a full run
the same way, which is how VALIDATE=1 checks each term):

- first: from the step's start to the first iteration line of the last rank to print it. A sample
  goes through all of it as the full run does: Ansible and the watchdogs, torchrun's and the app's
  imports, the process group, the data set, the model and its first (warm-up) iteration.
- warm: the next W = WARMUP_STEPS iterations, taken whole as the sample timed them: they are slower
  than the rest (the first image save, the allocator's and the caches' first rounds, the loader's
  first batches: 1.1 to 5 times the later steps in the 9 samples of the branch's sweeps here), and a
  full run goes through the same ones.
- step: from one iteration line to the next, over the sample's steady iterations (past the warm-up,
  with no image save between them), of the slowest rank: the app's own `iteration time` plus what
  its timer leaves out (loading the next batch, printing). The ranks wait for each other at every
  all-reduce, so the slowest rank sets the pace of the whole run. Its median, not its mean: on a
  shared machine a burst of load slows a few steps of a short sample two- to threefold, and the
  mean of 17 steps then follows the burst, not the pace (here it moved 4 of 9 predictions by 5-60 %).
- loader: each later epoch starts a new pass of the data loader (with --max_workers > 0 its worker
  processes start again): from the epoch's `Training ...` line to its first iteration line, less
  that iteration's own time and one batch's loading, as the sample's first epoch shows it.
- save: at every 100th iteration of an epoch (and its first) each rank saves two image grids and
  waits at a barrier: the gap after such an iteration, less the next iteration's time and a batch's
  loading. The first save is in the warm-up; the later ones are timed from the saves past the
  warm-up when the run shows any, else from the first (which is slower: an upper bound, a few
  tenths of a second per save here).
- end: from the last iteration line to the step's end: the ranks' processes exit, then Ansible's
  recap. A sample shows the recap, and the exit of a rank stopped by a signal: torchrun handles it
  and unloads torch while the app dies at once. A full run's app exits by itself: it frees the
  process group and unloads torch too, before torchrun's exit barrier across nodes and its own
  exit. So the prediction counts the sample's exit twice (once for torchrun, once for the app):
  over 9 points measured here, a full run's exit took 1.1 to 4.0 times its sample's (median 2.6;
  a few seconds either way, on 2 loaded cores).

The interval is the run at the pace of the sample's faster iterations (the 10th percentile of its
steady steps past the warm-up) to its slower ones (the 90th): on a shared or throttled machine the pace changes
with the load, and the start-up and the end change with it. It says how steady the sample was; a
machine that gets slower or faster after the sample (burstable instances running out of CPU
credits, other tenants) can put the run outside it.
"""

from __future__ import annotations

import bisect
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import dcgan_logs

SAVE_EVERY = 100  # the app saves image grids at every iteration i with i % 100 == 0
LOW, HIGH = 0.1, 0.9  # the interval's quantiles of the sample's steady steps
WARMUP_STEPS = 3  # iterations past the first that are timed whole, not taken for the pace (see above)


class NoTiming(Exception):
    """The run's logs or clocks do not show what the model needs; the message says what is missing."""


@dataclass
class Timing:
    """The terms of the model, as one run (a sample or a full run) shows them. Seconds."""

    first: float  # from the step's start to the first iteration line of the last rank
    warm: float  # from there to the last rank's line of iteration WARMUP_STEPS
    step: float  # the slowest rank's median time from one steady iteration line to the next
    step_low: float  # its steps' 10th percentile
    step_high: float  # and 90th
    step_mean: float  # and their mean (what a full run's steps add up to)
    iteration: float  # of that, the app's own `iteration time` (mean)
    loader: float  # a data loader's start at an epoch's beginning, beyond a batch's loading
    save: float  # one image save (with its barrier), beyond a step
    end: float  # from the last iteration line to the step's end
    exit: float  # of that, until the last rank's processes had exited (its outcome written)
    iterations_per_epoch: int
    steps: int  # steady steps it measured


class _Rank:
    """One rank's parsed log and the clock of its lines."""

    def __init__(self, rank: int, text: str, marks: list[list[float]], exited: float) -> None:
        self.log = dcgan_logs.parse_log(text)
        self.log.rank = rank if self.log.rank is None else self.log.rank
        self.times = [time for time, _ in marks]
        self.counts = [count for _, count in marks]  # the watchdog counts "\n"s: complete lines by then
        self.exited = exited  # when its watchdog wrote its outcome: its processes had ended
        # The parser splits lines as str.splitlines does (at "\r" too): the "\n"s by the end of each.
        self.newlines, seen = [], 0
        for line in text.splitlines(keepends=True):
            seen += line.count("\n")
            self.newlines.append(seen if line.endswith("\n") else seen + 1)

    def arrival(self, line: int) -> float:
        """When line (0-based, as the parser counts) of the log had arrived whole."""
        found = bisect.bisect_left(self.counts, self.newlines[line])
        if found == len(self.counts):
            raise NoTiming(f"the clock of rank {self.log.rank} ends before line {line + 1} of its log")
        return self.times[found]


def read_ranks(folder: Path) -> dict[int, _Rank]:
    """Every rank's parsed log with its clock."""
    ranks = {}
    for rank, text in dcgan_logs.run_texts(folder).items():
        try:
            marks = json.loads((folder / f".rank-{rank}.clock").read_text())["lines"]
            exited = json.loads((folder / f".rank-{rank}.exit").read_text())["finished"]
        except (OSError, ValueError, KeyError):
            raise NoTiming(f"{folder.name} has no clock or no outcome for rank {rank} (.rank-{rank}.clock, "
                           f".rank-{rank}.exit)") from None
        ranks[rank] = _Rank(rank, text, marks, exited)
    if not ranks:
        raise NoTiming(f"{folder.name} has no output-*.txt")
    return ranks


def timing(folder: Path, run: dict) -> Timing:
    """The model's terms as the run in folder shows them; run is its record in nodes.json."""
    ranks = read_ranks(folder)
    for rank, timed in ranks.items():
        if len(timed.log.iterations) < WARMUP_STEPS + 3:
            raise NoTiming(f"rank {rank} logged {len(timed.log.iterations)} iterations: too few to time "
                           f"(at least {WARMUP_STEPS + 3})")
    per_rank = {rank: _rank_terms(timed) for rank, timed in ranks.items()}
    last = max(timed.arrival(timed.log.iterations[-1].line) for timed in ranks.values())
    slowest = max(per_rank.values(), key=lambda terms: statistics.median(terms["steps"]))
    steps = slowest["steps"]
    first = max(timed.arrival(timed.log.iterations[0].line) for timed in ranks.values())
    return Timing(
        first=first - run["started"],
        warm=max(timed.arrival(timed.log.iterations[WARMUP_STEPS].line) for timed in ranks.values()) - first,
        step=statistics.median(steps), step_low=_quantile(steps, LOW), step_high=_quantile(steps, HIGH),
        step_mean=statistics.mean(steps),
        iteration=slowest["iteration"],
        loader=max(terms["loader"] for terms in per_rank.values()),
        save=max(terms["save"] for terms in per_rank.values()),
        end=run["finished"] - last, exit=max(timed.exited for timed in ranks.values()) - last,
        iterations_per_epoch=max(timed.log.iterations_per_epoch or 0 for timed in ranks.values()),
        steps=len(steps))


def _rank_terms(timed: _Rank) -> dict:
    """One rank's steady steps, and its loader start and save beyond a step (0 when the run shows none)."""
    records = timed.log.iterations
    steps, own, loading, after_save, first_save = [], [], [], [], []
    for number, (before, after) in enumerate(zip(records, records[1:], strict=False), start=1):
        if after.epoch != before.epoch or after.iteration != before.iteration + 1:
            continue  # an epoch's boundary (the loader's start), or a lost line
        gap = timed.arrival(after.line) - timed.arrival(before.line)
        if before.iteration % SAVE_EVERY == 0:
            (after_save if number > WARMUP_STEPS else first_save).append(gap - after.iteration_time)
        elif number > WARMUP_STEPS:
            steps.append(gap)
            own.append(after.iteration_time)
            loading.append(gap - after.iteration_time)
    if not steps:
        raise NoTiming(f"rank {timed.log.rank} logged no two steady iterations in a row past the first "
                       f"{WARMUP_STEPS + 1}")
    batch = statistics.median(loading)
    after_save = after_save or first_save
    loaders = [timed.arrival(record.line) - timed.arrival(timed.log.epoch_start_lines[record.epoch])
               - record.iteration_time - batch
               for record in records if record.iteration == 0 and record.epoch in timed.log.epoch_start_lines]
    return {"steps": steps, "iteration": statistics.mean(own),
            "loader": max(0.0, statistics.mean(loaders)) if loaders else 0.0,
            "save": max(0.0, statistics.mean(after_save) - batch) if after_save else 0.0}


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile, interpolated between the nearest ranks (as numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def predict(terms: Timing, epochs: int, hourly_usd: float | None = None) -> dict:
    """The full run of `epochs` epochs from the terms of its sample: each term's share, its epoch, its
    wall time with the interval, and with an hourly price its cost. Seconds and USD."""
    per_epoch = terms.iterations_per_epoch
    saves = math.ceil(per_epoch / SAVE_EVERY)
    training = terms.warm + (epochs * per_epoch - 1 - WARMUP_STEPS) * terms.step + (epochs - 1) * terms.loader \
        + (epochs * saves - 1) * terms.save  # the first save is in the warm-up
    end = terms.end + terms.exit  # the sample's exit is torchrun's; the app's own comes on top (see above)
    wall = terms.first + training + end
    low = wall * terms.step_low / terms.step
    high = wall * terms.step_high / terms.step
    prediction = {"first_iteration_s": terms.first, "training_s": training, "end_s": end,
                  "epoch_s": per_epoch * terms.step + terms.loader + saves * terms.save,
                  "wall_s": wall, "wall_low_s": low, "wall_high_s": high}
    if hourly_usd is not None:
        prediction.update(cost_usd=hourly_usd * wall / 3600, cost_low_usd=hourly_usd * low / 3600,
                          cost_high_usd=hourly_usd * high / 3600)
    return prediction


def errors(pairs: list[tuple[dict, float]]) -> dict:
    """Predicted against measured wall times: each relative error, the median and the largest of their
    absolute values, and how many measured runs lay inside their interval."""
    each = [(predicted["wall_s"] - measured) / measured for predicted, measured in pairs]
    inside = sum(predicted["wall_low_s"] <= measured <= predicted["wall_high_s"] for predicted, measured in pairs)
    return {"errors": each, "median_abs": statistics.median(abs(e) for e in each) if each else None,
            "largest_abs": max((abs(e) for e in each), default=None), "inside": inside, "of": len(pairs)}
