#!/usr/bin/env python3
"""Run one rank of a distributed job, detached, bounded, and aware of its peers.

The `run` action starts one rank per node through this script. It survives the
SSH connection that started it, so a dropped laptop does not stop training,
and it ends its rank by itself when:
  - the wall-clock bound (--timeout) passes,
  - a peer rank exits with an error,
  - a peer stops beating its heartbeat for --peer-timeout seconds
    (its node died or lost its network): gloo alone would block ~30 min, or
  - its rank's log has not grown for --stall-timeout seconds (a hung rank:
    a deadlock, a stopped process, a dead NFS mount), naming its last line, or
  - (--sample-iterations K, a sweep's sample) every rank has done K iterations
    past its first: the outcome is then "sampled", not a failure.

Ranks talk through files in the run folder, which is on the shared filesystem:
  .rank-R.ready the watchdog of rank R is up: every rank starts once all are (see START_TOGETHER_S)
  .rank-R.json  who runs rank R (node, PIDs, command)
  .rank-R.beat  a counter the watchdog bumps every --beat seconds
  .rank-R.exit  the outcome: {"code": N, "reason": "..."}
  .rank-R.clock (--clock) when each line of the rank's log arrived: the app prints no clock
  .rank-R.sampled (--sample-iterations) rank R has done its sample's iterations

It finds the interface that reaches the master and gives the rank, through its
environment, GLOO_SOCKET_IFNAME, OMP_NUM_THREADS and PYTHONUNBUFFERED.
`wait` blocks until the rank's outcome is written: the `run` playbook holds one
SSH session per node on it, so nothing is polled over the network while training.

Stdlib only, Python 3.8+: it runs with the node's system Python, fed on stdin
(`python3 -I -S - start ...`), so nothing has to be copied to the node first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

EXIT_TIMEOUT = 124  # like coreutils' timeout
EXIT_PEER_LOST = 125
EXIT_STALLED = 126
EXIT_STOPPED = 143
PROBE_EVERY_S = 5.0  # how often a rank checks that the master's address answers
# A stalled rank whose processes all sleep may only be waiting for a hung peer: it gives
# that peer's watchdog this many beats to end it first, so the outcome names the right rank.
STALL_GRACE_BEATS = 3
WAIT_RECHECK_S = 30.0  # a waiting `wait` looks again at least this often, whatever wakes it
# Ranks wait up to this long for every watchdog to be up, then start together: a rank started
# early would spend its start-up (seconds of CPU importing torch) slowing the others' starts, on
# nodes that share cores. A peer still missing then is left to the usual watch (--peer-timeout).
START_TOGETHER_S = 10.0
READY = re.compile(r"\.rank-(\d+)\.ready")
SAMPLED = re.compile(r"\.rank-(\d+)\.sampled")
ITERATION_LINE = re.compile(rb"\]\[iteration: \d+/\d+\]\[rank: \d+\] .*iteration time: ")  # one per iteration
IN_MODIFY = 0x2  # inotify: the file was written
CLOCK_POLL_S = 0.05  # without inotify, the clock looks at the log this often


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _write_beat(path: Path, count: int) -> None:
    """Overwrite the counter in place, padded to a fixed width: truncating a file costs a journal
    update (a third of a millisecond on ext4), and a beat is written every second on every node."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"%20d" % count)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Rank:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.info = run_dir / f".rank-{rank}.json"
        self.beat = run_dir / f".rank-{rank}.beat"
        self.exit = run_dir / f".rank-{rank}.exit"
        self.clock = run_dir / f".rank-{rank}.clock"


def start(args: argparse.Namespace) -> int:
    """Start the rank (or find it started: a re-attach) and, with --wait, wait for its outcome."""
    started = _start(args)
    return wait(args) if started == 0 and args.wait else started


def _start(args: argparse.Namespace) -> int:
    me = Rank(args.run_dir, args.rank)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    if me.info.exists():
        print(f"rank {args.rank} of this run was already started: re-attached")
        return 0
    if args.node_state and stop(argparse.Namespace(node_state=args.node_state, keep_run_dir=args.run_dir)) != 0:
        return 1  # a leftover rank would hold the port, and the new run would fail on it
    bound = min(START_TOGETHER_S, args.peer_timeout)
    missing = _wait_for_peers(args.run_dir, args.rank, args.world, bound)
    if missing:
        print(f"rank {args.rank} starts without ranks {', '.join(map(str, missing))}: not up after {bound:.0f} s")
    first = os.fork()
    if first:  # the caller (an Ansible task) returns once the rank is recorded
        os.waitpid(first, 0)
        deadline = time.monotonic() + 30
        while not me.info.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not me.info.exists():
            print(f"rank {args.rank} did not start: see {args.log}", file=sys.stderr)
            return 1
        print(f"rank {args.rank} started: {_read_json(me.info)}")
        return 0
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os._exit(_watch(args, me))


def _wait_for_peers(run_dir: Path, rank: int, world: int, bound: float) -> list[int]:
    """Say this rank is up, then wait until every rank is, at most bound seconds; the ranks still missing.
    The folder is listed rather than each file looked up: an NFS client may cache a missing name."""
    (run_dir / f".rank-{rank}.ready").touch()
    deadline = time.monotonic() + bound
    while True:
        ready = {int(found.group(1)) for found in map(READY.fullmatch, os.listdir(run_dir)) if found}
        missing = sorted(set(range(world)) - ready)
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.05)


def rank_environment(master: str, threads: int) -> dict:
    """What the rank needs from its node: the interface to the master, and its threads."""
    env = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads if threads > 0 else os.cpu_count() or 1)}
    interface = interface_to(master) if master else None
    if interface:
        env["GLOO_SOCKET_IFNAME"] = interface
    return env


def interface_to(address: str) -> str | None:
    """The interface this node reaches address through; on the master itself, the one holding it."""
    route = subprocess.run(["ip", "-4", "-o", "route", "get", address], capture_output=True, text=True)
    found = re.search(r" dev (\S+)", route.stdout)
    if found and found.group(1) != "lo":
        return found.group(1)
    addresses = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    for line in addresses.splitlines():  # "2: eth0    inet 10.0.0.2/24 ..."
        fields = line.split()
        if len(fields) > 3 and fields[3].split("/")[0] == address:
            return fields[1]
    return None


def _watch(args: argparse.Namespace, me: Rank) -> int:
    env = {**os.environ, **rank_environment(args.master, args.threads)}
    with open(args.log, "ab") as log:
        child = subprocess.Popen(args.command, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=env)
    _write_json(me.info, {"node": args.node, "watchdog_pid": os.getpid(), "pid": child.pid,
                          "started": time.time(), "command": args.command})
    if args.node_state:
        args.node_state.parent.mkdir(parents=True, exist_ok=True)
        _write_json(args.node_state, {"run_dir": str(args.run_dir), "rank": args.rank,
                                      "watchdog_pid": os.getpid()})
    stopping: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append("stopped on request"))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    watch = Watch(args, me, child.pid)
    clock = LogClock(args.log, me.clock) if args.clock or args.sample_iterations else None
    sample = Sample(args, clock) if args.sample_iterations and clock else None
    outcome = None
    beat_due = time.monotonic()
    with _exit_of(child.pid, clock.wakeup if clock else None) as sleep:
        while outcome is None:
            if clock:
                clock.read()
            status = child.poll()
            if sample and sample.done():  # a peer stopped first may have broken this rank's last iteration
                outcome = (0, f"sampled: every rank did {args.sample_iterations} iterations past its first")
            elif status is not None:
                outcome = (status, "finished" if status == 0 else f"the app exited with code {status}")
            elif stopping:
                outcome = (EXIT_STOPPED, stopping[0])
            else:
                if time.monotonic() >= beat_due:  # a clock wakes the loop at every line; beats stay a beat apart
                    outcome = watch.check()
                    beat_due = time.monotonic() + args.beat
                if outcome is None:
                    # wakes at once when the rank ends, and with a clock when its log is written
                    bound = CLOCK_POLL_S if clock and clock.wakeup is None else args.beat
                    sleep(max(0.0, min(beat_due - time.monotonic(), bound)))
    if child.poll() is None:
        _stop_child(child, args.stop_command)
    if clock:
        clock.read()
        clock.save()
    code, reason = outcome
    _write_json(me.exit, {"code": code, "reason": reason, "finished": time.time(),
                          "seconds": round(time.monotonic() - watch.started, 1)})
    return 0


class LogClock:
    """When each line of the rank's log arrived: the app prints no clock, and a sweep predicts a run
    (and measures a full one) from these times. It reads the log when inotify says it was written
    (so it notes a line within a few milliseconds, and wakes for nothing else), else every
    CLOCK_POLL_S; it also counts the app's iteration lines, for a sample."""

    def __init__(self, log: Path, path: Path) -> None:
        self.log, self.path = log, path
        self.offset, self.partial = 0, b""
        self.lines = self.iterations = 0
        self.marks: list[list[float]] = []  # [time, complete lines of the log by then]
        self.wakeup = _writes_of(log)

    def read(self) -> None:
        now = time.time()
        if self.wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wakeup, 4096):
                    pass
        try:
            with open(self.log, "rb") as text:
                text.seek(self.offset)
                chunk = text.read()
        except OSError:
            return
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if lines:
            self.lines += len(lines)
            self.iterations += sum(1 for line in lines if ITERATION_LINE.search(line))
            self.marks.append([round(now, 3), self.lines])

    def save(self) -> None:
        _write_json(self.path, {"lines": self.marks})
        if self.wakeup is not None:
            os.close(self.wakeup)


def _writes_of(path: Path) -> int | None:
    """A descriptor that turns readable when path is written (Linux inotify), or None without inotify."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        found = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    except (ImportError, OSError, AttributeError):
        return None
    if found < 0:
        return None
    if libc.inotify_add_watch(found, os.fsencode(path), IN_MODIFY) < 0:
        os.close(found)
        return None
    return found


class Sample:
    """A sweep's sample: the rank trains until every rank has done --sample-iterations iterations past
    its first (each watchdog says so for its own rank with .rank-R.sampled), then it is stopped."""

    def __init__(self, args: argparse.Namespace, clock: LogClock) -> None:
        self.args, self.clock = args, clock
        self.marked = self.complete = False

    def done(self) -> bool:
        if not self.marked and self.clock.iterations > self.args.sample_iterations:
            (self.args.run_dir / f".rank-{self.args.rank}.sampled").touch()
            self.marked = True
        if self.marked and not self.complete:  # listed, not looked up: an NFS client may cache a missing name
            ranks = {found.group(1) for found in map(SAMPLED.fullmatch, os.listdir(self.args.run_dir)) if found}
            self.complete = len(ranks) >= self.args.world
        return self.complete


class Watch:
    """The reasons to end a healthy-looking rank: its bound, a failed or silent peer, a lost network,
    no progress."""

    def __init__(self, args: argparse.Namespace, me: Rank, rank_pid: int) -> None:
        self.args, self.me, self.rank_pid = args, me, rank_pid
        self.started = time.monotonic()
        self.beats = 0
        self.peers = [Rank(args.run_dir, r) for r in range(args.world) if r != args.rank]
        self.last_seen = {p.rank: (None, self.started) for p in self.peers}  # beat value, when it changed
        self.reached = self.probed = self.started  # when the master's address last answered / was asked
        self.log_size, self.progressed = -1, self.started  # the rank's log, and when it last grew
        self.stalled_beats = 0

    def check(self) -> tuple[int, str] | None:
        self.beats += 1
        _write_beat(self.me.beat, self.beats)
        now = time.monotonic()
        if now - self.started > self.args.timeout:
            return EXIT_TIMEOUT, f"the run passed its bound of {self.args.timeout:.0f} s"
        for peer in self.peers:
            lost = self._peer_lost(peer, now)
            if lost:
                return EXIT_PEER_LOST, lost
        if self.args.probe and now - self.probed >= PROBE_EVERY_S:
            self.probed = now
            if _answers(self.args.probe):
                self.reached = now
            elif now - self.reached > self.args.peer_timeout:
                return EXIT_PEER_LOST, f"the master {self.args.probe} is unreachable for {self.args.peer_timeout:.0f} s"
        return self._stalled(now)

    def _stalled(self, now: float) -> tuple[int, str] | None:
        """No progress (the rank's log has not grown) for --stall-timeout seconds."""
        if not self.args.stall_timeout:
            return None
        with contextlib.suppress(OSError):
            size = self.args.log.stat().st_size
            if size != self.log_size:
                self.log_size, self.progressed, self.stalled_beats = size, now, 0
        if now - self.progressed <= self.args.stall_timeout:
            return None
        self.stalled_beats += 1
        if not _held(self.rank_pid) and self.stalled_beats <= STALL_GRACE_BEATS:
            return None  # asleep, maybe waiting on a hung peer: let its own watchdog name it first
        return EXIT_STALLED, (f"no progress for {self.args.stall_timeout:.0f} s since "
                              f"{_last_line(self.args.log) or 'its start (no output at all)'}")

    def _peer_lost(self, peer: Rank, now: float) -> str | None:
        outcome = _read_json(peer.exit)
        if outcome is not None:
            return None if outcome.get("code") == 0 else f"rank {peer.rank} failed: {outcome.get('reason')}"
        try:
            value = peer.beat.read_bytes()
        except FileNotFoundError:
            value = None
        if value != self.last_seen[peer.rank][0]:
            self.last_seen[peer.rank] = (value, now)
        elif now - self.last_seen[peer.rank][1] > self.args.peer_timeout:
            silence = "never started" if value is None else "stopped answering"
            return f"rank {peer.rank} {silence} for {self.args.peer_timeout:.0f} s (node down or unreachable)"
        return None


def _rank_processes(root: int) -> dict[int, str]:
    """The rank's processes and their states: root and its descendants (torchrun starts the app
    in a session of its own, so the process group alone misses it)."""
    processes = {}  # pid -> (state, parent)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            processes[int(stat.parent.name)] = (fields[0], int(fields[1]))
    rank, grown = {root}, True
    while grown:
        children = {pid for pid, (_, parent) in processes.items() if parent in rank} - rank
        rank |= children
        grown = bool(children)
    return {pid: processes[pid][0] for pid in rank if pid in processes}


def _held(root: int) -> bool:
    """Is a process of the rank stopped (T) or stuck in uninterruptible I/O (D), as on a dead NFS mount?"""
    return any(state in ("T", "D") for state in _rank_processes(root).values())


def _last_line(log: Path) -> str:
    """The log's last non-empty line, quoted and cut short."""
    try:
        with open(log, "rb") as text:
            text.seek(max(0, log.stat().st_size - 4096))
            lines = [line.strip() for line in text.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return repr(lines[-1][:160]) if lines else ""


def _answers(address: str) -> bool:
    """Does the host answer at all? A refused connection is an answer: the host is there."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return True


def _stop_child(child: subprocess.Popen, stop_command: str | None) -> None:
    if stop_command:  # a container outlives its `docker run` client
        subprocess.run(stop_command, shell=True, check=False, timeout=60)
    doomed = set(_rank_processes(child.pid))  # before any dies: orphans are reparented out of reach
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        doomed |= set(_rank_processes(child.pid))
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)  # a stopped process must run to take its SIGTERM
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            child.poll()  # reaps it: a zombie counts as gone
            if not any(_alive(pid) for pid in doomed):
                return
            time.sleep(0.1)


def wait(args: argparse.Namespace) -> int:
    me = Rank(args.run_dir, args.rank)
    info = _read_json(me.info)
    if info is None:
        print(f"rank {args.rank} was never started in {args.run_dir}", file=sys.stderr)
        return 2
    with _exit_of(info["watchdog_pid"]) as sleep:
        while not me.exit.exists():
            if not _alive(info["watchdog_pid"]) and not me.exit.exists():
                print(f"the watchdog of rank {args.rank} died (its node was restarted?)", file=sys.stderr)
                return 1
            sleep(WAIT_RECHECK_S)
    outcome = _read_json(me.exit) or {"code": 1, "reason": "unreadable outcome"}
    stream = sys.stdout if outcome["code"] == 0 else sys.stderr
    print(f"rank {args.rank}: {outcome['reason']} after {outcome.get('seconds')} s", file=stream)
    return 0 if outcome["code"] == 0 else 1


@contextlib.contextmanager
def _exit_of(pid: int, wakeup: int | None = None) -> Iterator[Callable[[float], object]]:
    """A sleep of at most the given seconds that ends as soon as pid exits (or the descriptor wakeup
    turns readable): a select on the process's pidfd, so nothing runs meanwhile (Popen.wait with a
    timeout wakes every 50 ms). Without pidfd (Python < 3.9, Linux < 5.3, or pid already gone) it
    sleeps at most half a second."""
    also = [] if wakeup is None else [wakeup]
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        yield lambda seconds: select.select(also, [], [], min(seconds, 0.5)) if also else time.sleep(min(seconds, 0.5))
        return
    try:
        yield lambda seconds: select.select([pidfd, *also], [], [], seconds)
    finally:
        os.close(pidfd)


def stop(args: argparse.Namespace) -> int:
    """End the rank this node ran last, if it is still going (a leftover keeps the port)."""
    state = _read_json(args.node_state)
    if state is None or not _alive(state["watchdog_pid"]):
        print("nothing to stop")
        return 0
    if args.keep_run_dir and Path(state["run_dir"]) == args.keep_run_dir:
        print(f"rank {state['rank']} of this run is still going: kept")
        return 0
    os.kill(state["watchdog_pid"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(state["watchdog_pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(state["watchdog_pid"]):
        print(f"rank {state['rank']} of {state['run_dir']} did not stop", file=sys.stderr)
        return 1
    print(f"stopped rank {state['rank']} of {state['run_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    p_start = sub.add_parser("start", help="start a rank, detached")
    p_start.add_argument("--run-dir", type=Path, required=True)
    p_start.add_argument("--rank", type=int, required=True)
    p_start.add_argument("--world", type=int, required=True)
    p_start.add_argument("--log", type=Path, required=True)
    p_start.add_argument("--node", default="")
    p_start.add_argument("--node-state", type=Path,
                         help="where this node records its current rank; an earlier one still going is stopped")
    p_start.add_argument("--timeout", type=float, default=3600, help="wall-clock bound, seconds")
    p_start.add_argument("--peer-timeout", type=float, default=60, help="silence that means a peer is lost")
    p_start.add_argument("--stall-timeout", type=float, default=0,
                         help="seconds without the log growing that mean the rank is hung; 0: never")
    p_start.add_argument("--beat", type=float, default=1.0, help="heartbeat period, seconds")
    p_start.add_argument("--master", default="", help="the master's address (its interface is given to gloo)")
    p_start.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the rank; 0: the node's cores")
    p_start.add_argument("--probe", help="HOST:PORT of the master; a rank that cannot reach it is ended")
    p_start.add_argument("--stop-command", help="shell command that also stops the rank (containers)")
    p_start.add_argument("--clock", type=int, default=0, help="1: note when each line of the log arrives")
    p_start.add_argument("--sample-iterations", type=int, default=0,
                         help="stop the rank once every rank has done this many iterations past its first; 0: never")
    p_start.add_argument("--wait", action="store_true", help="then wait for the outcome, as `wait` does")
    p_start.add_argument("command", nargs=argparse.REMAINDER, help="-- the rank's command")
    p_wait = sub.add_parser("wait", help="wait for a rank's outcome; exit 0 when it finished well")
    p_wait.add_argument("--run-dir", type=Path, required=True)
    p_wait.add_argument("--rank", type=int, required=True)
    p_stop = sub.add_parser("stop", help="stop the rank this node ran last")
    p_stop.add_argument("--node-state", type=Path, required=True)
    p_stop.add_argument("--keep-run-dir", type=Path, help="a run folder whose rank is kept (re-attach)")
    args = parser.parse_args(argv)
    if args.action == "start":
        args.command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not args.command:
            parser.error("start needs the rank's command after --")
    return {"start": start, "wait": wait, "stop": stop}[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
