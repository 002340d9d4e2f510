"""Parse the per-rank logs of the upstream Distributed-DCGAN app (dist_dcgan.py).

One parser shared by the live progress display, the report and the benchmark, so
that they cannot disagree about what a log says. Library only: no CLI here.

Each rank's stdout+stderr lands in ``output-<rank>.txt``. The app prints, per
iteration and per epoch (epochs and iterations are 0-based in the log; the
first line below is one line in the log)::

    [epoch: 0/2][iteration: 5/32][rank: 1] Loss_D: 1.2345, Loss_G: 0.9876,
        D(x): 0.5000, D(G(z)): 0.4000 / 0.3000, iteration time: 2.4512s
    [rank: 1] Epoch 0 took: 80.1234 seconds

plus a few start-up lines, and on failure Python tracebacks and torchrun's
elastic-agent messages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

# Python's f"{x:.4f}" prints nan, inf and -inf when a GAN diverges: accept them.
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+|nan|inf)"

# Anchored at the end so that a half-written last line (the file is read while
# the app writes it) can never match: a prefix of a full line never ends in
# "s" / " seconds" unless it is the full line. Not anchored at the start, so that
# launcher prefixes such as torchrun's "[default0]:" are tolerated.
_ITER_RE = re.compile(
    r"\[epoch: (\d+)/(\d+)\]\[iteration: (\d+)/(\d+)\]\[rank: (\d+)\] "
    rf"Loss_D: ({_NUM}), Loss_G: ({_NUM}), D\(x\): ({_NUM}), "
    rf"D\(G\(z\)\): ({_NUM}) / ({_NUM}), iteration time: ({_NUM})s\s*$"
)
_TOOK_RE = re.compile(rf"\[rank: (\d+)\] Epoch (\d+) took: ({_NUM}) seconds\s*$")
_WORLD_RE = re.compile(r"Rank: (\d+)\. World Size: (\d+)\s*$")
_EPOCH_START_RE = re.compile(r"Rank: (\d+), Epoch: (\d+), Training \.\.\.\s*$")
_NAMESPACE_RE = re.compile(r"^Namespace\((.*)\)\s*$")
_NS_ARG_RE = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^,]+)")
_DATASET_RE = re.compile(r"^Dataset \S+ loaded\s*$")

# Launchers may prefix every line ("[default0]:", "[rank1]:"); strip it before
# looking at a line's start.
_LINE_PREFIX_RE = re.compile(r"^\[(?:default|rank)?\d+\]:")
_TRACEBACK = "Traceback (most recent call last):"
_EXC_LINE_RE = re.compile(r"^([A-Za-z_][\w.]*)(?::\s*(.*))?$")
# torchrun wraps the child's failure in this; the child's own exception (printed
# earlier in the same file) is the meaningful one.
_WRAPPER_EXCEPTIONS = {"ChildFailedError"}
_SIGNAL_MSG_RE = re.compile(r"traceback\s*:\s*(Signal \d+ \(\w+\) received by PID \d+)")
_AGENT_FAILED_RE = re.compile(r"(failed \(exitcode: -?\d+\).*)$")
# Fatal lines that come without a Python traceback: the shell, the kernel's OOM
# killer, a missing interpreter/module/script, argparse errors.
_FATAL_RE = re.compile(
    r"(?:^Killed\b|\bKilled$|Segmentation fault|core dumped|^Bus error|^Aborted\b"
    r"|^Terminated\b|No module named|can't open file|command not found"
    r"|^srun: error|(?:^|[\s:])error: )",
    re.IGNORECASE,
)

STATUS_WAITING = "waiting"
STATUS_RUNNING = "running"
STATUS_FINISHED = "finished"
STATUS_FAILED = "failed"

_ANSI = {
    STATUS_FINISHED: "\033[32m",
    STATUS_FAILED: "\033[31m",
    "stalled": "\033[33m",
    STATUS_WAITING: "\033[2m",
}
_ANSI_RESET = "\033[0m"
# Recent iterations only, so that the rate follows a change of speed (e.g. a
# slower node joining) instead of averaging over the whole run.
_RATE_WINDOW = 20
_ERROR_MAX_CHARS = 100


@dataclass
class IterationRecord:
    epoch: int
    iteration: int
    loss_d: float
    loss_g: float
    d_x: float
    d_g_z1: float
    d_g_z2: float
    iteration_time: float
    line: int = -1  # its index among the log's lines: a clock of the log (predict.py) says when it came


@dataclass
class RankLog:
    rank: int | None = None
    world_size: int | None = None
    num_epochs: int | None = None
    iterations_per_epoch: int | None = None
    iterations: list[IterationRecord] = field(default_factory=list)
    epoch_times: dict[int, float] = field(default_factory=dict)
    finished: bool = False
    error: str | None = None
    # Highest epoch announced by "Rank: R, Epoch: E, Training ...", which comes
    # before that epoch's first iteration line.
    epoch_started: int | None = None
    # Index among the log's lines of each epoch's "Rank: R, Epoch: E, Training ..." line.
    epoch_start_lines: dict[int, int] = field(default_factory=dict)
    # Start-up milestone reached before training ("launched", "initialised",
    # "dataset loaded"), to say what a rank that has not started is waiting on.
    phase: str = "no output"
    args: dict[str, str] = field(default_factory=dict)
    # torchrun --max-restarts reruns the app into the same file; only the last
    # attempt is kept.
    restarts: int = 0

    @property
    def status(self) -> str:
        if self.finished:
            return STATUS_FINISHED
        if self.error is not None:
            return STATUS_FAILED
        if self.iterations or self.epoch_times:
            return STATUS_RUNNING
        return STATUS_WAITING

    @property
    def last(self) -> IterationRecord | None:
        return self.iterations[-1] if self.iterations else None

    @property
    def current_epoch(self) -> int | None:
        """0-based epoch in progress (or last one run)."""
        candidates = [e for e in (self.epoch_started,) if e is not None]
        if self.last is not None:
            candidates.append(self.last.epoch)
        if self.epoch_times:
            candidates.append(max(self.epoch_times))
        return max(candidates) if candidates else None

    @property
    def total_iterations(self) -> int | None:
        if self.num_epochs is None or self.iterations_per_epoch is None:
            return None
        return self.num_epochs * self.iterations_per_epoch

    @property
    def done_iterations(self) -> int:
        """Iterations completed over all epochs, from the position reached.

        From the position rather than by counting lines, so that a lost or
        garbled line does not skew progress.
        """
        ipe = self.iterations_per_epoch
        if ipe is None:
            return 0
        done = 0
        if self.last is not None:
            done = self.last.epoch * ipe + self.last.iteration + 1
        if self.epoch_times:
            done = max(done, (max(self.epoch_times) + 1) * ipe)
        total = self.total_iterations
        return min(done, total) if total is not None else done


def _parse_namespace(body: str) -> dict[str, str]:
    args = {}
    for match in _NS_ARG_RE.finditer(body):
        value = match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        args[match.group(1)] = value
    return args


def _short_exception(exc_type: str, message: str) -> str:
    # "torch.distributed.elastic....SignalException" -> "SignalException": the
    # module path is noise on a one-line status.
    name = exc_type.rsplit(".", 1)[-1]
    return f"{name}: {message}" if message else name


def _find_error(lines: list[str]) -> str | None:
    """Return the most meaningful error line of a log, or None.

    Priority: the child's own exception (last traceback that is not torchrun's
    ChildFailedError wrapper), then what torchrun says about the failed child
    (signal, exit code), then fatal lines printed without a traceback.
    """
    exceptions: list[str] = []
    agent: list[str] = []
    signals: list[str] = []
    fatal: list[str] = []
    in_traceback = False
    # An exception printed with an empty message ("ChildFailedError: ") is
    # explained by the next meaningful line: (type, list to put it in).
    pending: tuple[str, list[str]] | None = None

    for raw in lines:
        line = _LINE_PREFIX_RE.sub("", raw.rstrip())
        stripped = line.strip()
        if pending is not None and stripped:
            if not re.search(r"[A-Za-z0-9]", stripped):
                continue  # "=====" border lines
            exc_type, target = pending
            # Replaces the bare name recorded when the exception line was seen.
            target[-1] = _short_exception(exc_type, stripped)
            pending = None
        if stripped.startswith(_TRACEBACK):
            in_traceback = True
            continue
        if in_traceback:
            if not stripped or line[0].isspace():
                continue  # frame, source line or 3.11 "^^^^" marker
            match = _EXC_LINE_RE.match(stripped)
            if match is None:
                continue  # stray interleaved stdout line inside the traceback
            in_traceback = False
            exc_type, message = match.group(1), (match.group(2) or "").strip()
            wrapper = exc_type.rsplit(".", 1)[-1] in _WRAPPER_EXCEPTIONS
            target = agent if wrapper else exceptions
            target.append(_short_exception(exc_type, message))
            if not message:
                pending = (exc_type, target)
            continue
        if (match := _SIGNAL_MSG_RE.search(stripped)) is not None:
            signals.append(match.group(1))
        elif (match := _AGENT_FAILED_RE.search(stripped)) is not None:
            agent.append(match.group(1))
        elif "warning" not in stripped.lower() and _FATAL_RE.search(stripped):
            fatal.append(stripped)

    for group in (exceptions, signals, agent, fatal):
        if group:
            return group[-1]
    return None


def parse_log(text: str) -> RankLog:
    """Parse one rank's log text (possibly still being written)."""
    log = RankLog()
    lines = text.splitlines()
    attempt_start = 0
    for index, raw in enumerate(lines):
        line = _LINE_PREFIX_RE.sub("", raw)

        if (match := _NAMESPACE_RE.match(line.strip())) is not None:
            if log.phase != "no output":
                # A second start-up in the same file: torchrun restarted the
                # app. Only the last attempt describes the current state.
                log = RankLog(restarts=log.restarts + 1)
                attempt_start = index
            log.args = _parse_namespace(match.group(1))
            if (epochs := log.args.get("num_epochs", "")).isdigit():
                log.num_epochs = int(epochs)
            log.phase = "launched"
            continue

        if (match := _ITER_RE.search(line)) is not None:
            rank = int(match.group(5))
            if log.rank is not None and rank != log.rank:
                continue  # another rank's line in a shared file: not ours
            log.rank = rank
            epoch, num_epochs, iteration, ipe = (int(match.group(i)) for i in range(1, 5))
            values = [float(match.group(i)) for i in range(6, 12)]
            log.num_epochs = num_epochs
            log.iterations_per_epoch = ipe
            log.iterations.append(IterationRecord(epoch, iteration, *values, line=index))
            log.phase = "training"
            continue

        if (match := _TOOK_RE.search(line)) is not None:
            rank = int(match.group(1))
            if log.rank is not None and rank != log.rank:
                continue
            log.rank = rank
            log.epoch_times[int(match.group(2))] = float(match.group(3))
            continue

        if (match := _EPOCH_START_RE.search(line)) is not None:
            rank = int(match.group(1))
            if log.rank is None or rank == log.rank:
                log.rank = rank
                epoch = int(match.group(2))
                log.epoch_started = max(epoch, log.epoch_started or 0)
                log.epoch_start_lines[epoch] = index
                if log.phase != "training":
                    log.phase = "epoch started"
            continue

        if (match := _WORLD_RE.search(line)) is not None:
            log.rank = int(match.group(1))
            log.world_size = int(match.group(2))
            if log.phase in ("no output", "launched"):
                log.phase = "initialised"
            continue

        if _DATASET_RE.match(line.strip()) and log.phase in ("no output", "launched", "initialised"):
            log.phase = "dataset loaded"
            continue

        if line.strip() and log.phase == "no output":
            log.phase = "launched"

    if log.num_epochs is not None:
        log.finished = (log.num_epochs - 1) in log.epoch_times
    log.error = _find_error(lines[attempt_start:])
    return log


_OUTPUT_RE = re.compile(r"^output-(\d+)\.txt$")


def run_texts(folder: Path) -> dict[int, str]:
    """The text of every ``output-<rank>.txt`` in ``folder``, keyed by the file's rank; its line ends as
    written (a "\r" is not made a "\n": the parser splits at both, a log's clock counts the "\n"s)."""
    texts = {}
    for path in Path(folder).glob("output-*.txt"):
        match = _OUTPUT_RE.match(path.name)
        if match is not None:
            texts[int(match.group(1))] = path.read_bytes().decode("utf-8", errors="replace")
    return dict(sorted(texts.items()))


def parse_run_folder(folder: Path) -> dict[int, RankLog]:
    """Parse every ``output-<rank>.txt`` in ``folder``, keyed by the file's rank."""
    logs: dict[int, RankLog] = {}
    for rank, text in run_texts(folder).items():
        log = parse_log(text)
        if log.rank is None:
            # Nothing in the file says its rank yet: the orchestrator's name does.
            log.rank = rank
        logs[rank] = log
    return logs


def format_duration(seconds: float) -> str:
    """0:12, 12:03, 1:02:03 — compact enough for a one-line status."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def seconds_per_iteration(log: RankLog) -> float | None:
    """Mean of the recent upstream iteration times, or None before the first one.

    The upstream timer excludes data loading and the every-100-iterations sample
    saving, so an ETA from it is slightly optimistic.
    """
    times = [r.iteration_time for r in log.iterations[-_RATE_WINDOW:] if math.isfinite(r.iteration_time)]
    if not times:
        return None
    mean = sum(times) / len(times)
    return mean if mean > 0 else None


def _format_rate(its: float) -> str:
    if its >= 10:
        return f"{its:.0f} it/s"
    if its >= 1:
        return f"{its:.1f} it/s"
    return f"{its:.2f} it/s"


def _bar(fraction: float, width: int) -> str:
    filled = min(width, max(0, int(fraction * width)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _position(log: RankLog) -> str:
    """'epoch 2/2  iter 17/32', 1-based so that the last one reads N/N."""
    epochs = log.num_epochs
    ipe = log.iterations_per_epoch
    epoch = log.current_epoch
    epoch_txt = f"epoch {(epoch or 0) + 1}/{epochs if epochs is not None else '?'}"
    if ipe is None:
        return epoch_txt
    last = log.last
    in_epoch = last.iteration + 1 if last is not None and last.epoch == epoch else 0
    if epoch is not None and epoch in log.epoch_times:
        in_epoch = ipe
    return f"{epoch_txt}  iter {in_epoch:>{len(str(ipe))}}/{ipe}"


def progress_line(
    log: RankLog,
    now: float | None,
    last_change: float | None,
    width: int = 20,
    *,
    color: bool = False,
    stall_after: float = 60.0,
    stall_bound: float | None = None,
) -> str:
    """One status line for one rank.

    ``now`` and ``last_change`` (same clock, e.g. time.time() and the time the
    caller last saw this log grow) enable the 'stalled Ns' flag once no new
    output has arrived for ``stall_after`` seconds (or half ``stall_bound``, the
    silence that ends the run, if that is sooner); pass None to disable it.
    ``color`` adds ANSI colours; the caller decides (e.g. from isatty).
    """
    rank_txt = f"rank {log.rank if log.rank is not None else '?'}"
    if log.world_size is not None:
        rank_txt = f"rank {log.rank:>{len(str(log.world_size - 1))}}"
    status = log.status
    stalled_txt = None
    if stall_bound:
        stall_after = min(stall_after, stall_bound / 2)
    if now is not None and last_change is not None and now - last_change >= stall_after:
        stalled_txt = f"stalled {now - last_change:.0f}s"
        if stall_bound:
            stalled_txt += f" (the run ends at {stall_bound:.0f}s)"

    if status == STATUS_FINISHED:
        total = sum(log.epoch_times.values())
        text = (
            f"{rank_txt}  finished  {len(log.epoch_times)}/{log.num_epochs} epochs  "
            f"{len(log.iterations)} iters  trained {format_duration(total)}"
        )
        kind = STATUS_FINISHED
    elif status == STATUS_FAILED:
        error = log.error or ""
        if len(error) > _ERROR_MAX_CHARS:
            error = error[: _ERROR_MAX_CHARS - 3] + "..."
        where = f"  (at {_position(log)})" if log.iterations else ""
        text = f"{rank_txt}  failed: {error}{where}"
        kind = STATUS_FAILED
    elif status == STATUS_WAITING:
        text = f"{rank_txt}  waiting to start ({log.phase})"
        kind = STATUS_WAITING
        if stalled_txt is not None:
            text += f"  {stalled_txt}"
            kind = "stalled"
    else:
        parts = [rank_txt, _position(log)]
        total = log.total_iterations
        done = log.done_iterations
        if total:
            parts.append(_bar(done / total, width))
        kind = STATUS_RUNNING
        if stalled_txt is not None:
            parts.append(stalled_txt)
            kind = "stalled"
        else:
            spi = seconds_per_iteration(log)
            if spi is not None:
                parts.append(_format_rate(1.0 / spi))
                if total:
                    parts.append(f"ETA {format_duration((total - done) * spi)}")
        text = "  ".join(parts)

    if color and kind in _ANSI:
        return f"{_ANSI[kind]}{text}{_ANSI_RESET}"
    return text


def _finite_or_none(value: float | None) -> float | None:
    # Strict JSON has no NaN/Infinity; a diverged loss becomes null and is
    # counted in nonfinite_iterations instead.
    if value is None or not math.isfinite(value):
        return None
    return value


def summary(logs: dict[int, RankLog]) -> dict:
    """JSON-ready summary of a run (string keys, no NaN).

    ``training_seconds`` is the app's own training time: the max over ranks of
    the sum of that rank's epoch times. The slowest rank bounds the run, and
    subtracting this from wall-clock time gives the orchestration overhead.
    """
    ranks = []
    for rank, log in sorted(logs.items()):
        last = log.last
        times = [r.iteration_time for r in log.iterations if math.isfinite(r.iteration_time)]
        nonfinite = sum(
            1
            for r in log.iterations
            if not all(math.isfinite(v) for v in (r.loss_d, r.loss_g, r.d_x, r.d_g_z1, r.d_g_z2))
        )
        ranks.append(
            {
                "rank": rank,
                "status": log.status,
                "error": log.error,
                "world_size": log.world_size,
                "num_epochs": log.num_epochs,
                "iterations_per_epoch": log.iterations_per_epoch,
                "epochs_completed": len(log.epoch_times),
                "iterations": len(log.iterations),
                "seconds_per_epoch": {str(e): s for e, s in sorted(log.epoch_times.items())},
                "training_seconds": sum(log.epoch_times.values()),
                "mean_iteration_time": sum(times) / len(times) if times else None,
                "final_loss_d": _finite_or_none(last.loss_d if last else None),
                "final_loss_g": _finite_or_none(last.loss_g if last else None),
                "final_d_x": _finite_or_none(last.d_x if last else None),
                "final_d_g_z1": _finite_or_none(last.d_g_z1 if last else None),
                "final_d_g_z2": _finite_or_none(last.d_g_z2 if last else None),
                "nonfinite_iterations": nonfinite,
                "restarts": log.restarts,
            }
        )
    return {
        "ranks": ranks,
        "world_size": next((r["world_size"] for r in ranks if r["world_size"]), None),
        "num_epochs": next((r["num_epochs"] for r in ranks if r["num_epochs"]), None),
        "all_finished": bool(ranks) and all(r["status"] == STATUS_FINISHED for r in ranks),
        "failed_ranks": [r["rank"] for r in ranks if r["status"] == STATUS_FAILED],
        "training_seconds": max((r["training_seconds"] for r in ranks), default=0.0),
    }
