"""A sample, as the rank's watchdog runs it: every rank is stopped once all have done K iterations
past their first, and the log's clock says when each line came. The ranks here are small scripts
that print the app's iteration lines; no namespace, no torch."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from test_run_cost import WATCHDOG, voluntary_switches

APP = textwrap.dedent("""
    import sys, time
    rank, pace, fail_after = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    print("Namespace(num_epochs=2)", flush=True)
    print(f"Rank: {rank}, Epoch: 0, Training ...", flush=True)
    for i in range(100000):
        time.sleep(pace)
        if i == fail_after:
            sys.exit(3)
        print(f"[epoch: 0/2][iteration: {i}/100000][rank: {rank}] Loss_D: 1.0, Loss_G: 1.0, D(x): 0.5, "
              f"D(G(z)): 0.4 / 0.3, iteration time: {pace:.4f}s", flush=True)
""")


def start(run_dir: Path, world: int, paces: list[float], *, sample: int = 0, clock: int = 1,
          fail_after: list[int] | None = None) -> list[dict]:
    """A watchdog per rank, started together (each waits up to 10 s for the others before its rank starts)."""
    (run_dir.parent / "app.py").write_text(APP)
    starts = [subprocess.Popen(
        [sys.executable, "-I", "-S", str(WATCHDOG), "start", f"--run-dir={run_dir}", f"--rank={rank}",
         f"--world={world}", f"--log={run_dir / f'output-{rank}.txt'}", "--peer-timeout=20", f"--clock={clock}",
         f"--sample-iterations={sample}", "--", sys.executable, str(run_dir.parent / "app.py"), str(rank),
         str(paces[rank]), str((fail_after or [-1] * world)[rank])], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for rank in range(world)]
    for started in starts:
        _, err = started.communicate(timeout=60)
        assert started.returncode == 0, err
    return [json.loads((run_dir / f".rank-{rank}.json").read_text()) for rank in range(world)]


def outcomes(run_dir: Path, world: int, within: float = 30) -> list[dict]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all((run_dir / f".rank-{rank}.exit").exists() for rank in range(world)):
            return [json.loads((run_dir / f".rank-{rank}.exit").read_text()) for rank in range(world)]
        time.sleep(0.05)
    raise AssertionError(f"no outcome within {within} s: {sorted(p.name for p in run_dir.iterdir())}")


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_sample_stops_every_rank_after_k_iterations_past_the_first_of_the_slowest(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    infos = start(run_dir, 2, [0.05, 0.5], sample=5)  # rank 1 is slower: 1 s for two more lines, on a loaded machine
    done = outcomes(run_dir, 2)
    assert [o["code"] for o in done] == [0, 0]
    assert [o["reason"] for o in done] == ["sampled: every rank did 5 iterations past its first"] * 2
    slow = (run_dir / "output-1.txt").read_text()
    assert "[iteration: 5/" in slow and "[iteration: 7/" not in slow  # stopped at once, not a beat later
    assert "[iteration: 5/" in (run_dir / "output-0.txt").read_text()  # the fast rank went on meanwhile
    assert {p.name for p in run_dir.glob(".rank-*.sampled")} == {".rank-0.sampled", ".rank-1.sampled"}
    for info in infos:
        assert gone(info["pid"]) and gone(info["watchdog_pid"])


def test_a_rank_that_fails_before_the_sample_is_done_fails_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    start(run_dir, 2, [0.05, 0.05], sample=20, fail_after=[-1, 2])
    done = outcomes(run_dir, 2)
    assert done[1]["code"] == 3 and done[1]["reason"] == "the app exited with code 3"
    assert done[0]["code"] != 0 and done[0]["reason"] == "rank 1 failed: the app exited with code 3"
    assert not (run_dir / ".rank-1.sampled").exists()


def test_the_clock_notes_each_line_when_it_comes_and_wakes_for_nothing_else(tmp_path: Path) -> None:
    """inotify wakes the watchdog when the log is written: the lines' times are the app's pace, and a
    silent log costs no wake-ups beyond the beat (polling would cost 20 a second)."""
    run_dir = tmp_path / "run"
    info = start(run_dir, 1, [0.3], fail_after=[12])[0]
    time.sleep(1.0)  # past the start: the app prints a line every 0.3 s
    before = voluntary_switches(info["watchdog_pid"])
    time.sleep(1.5)
    woken = voluntary_switches(info["watchdog_pid"]) - before
    assert woken <= 2 + 2 * 1.5 / 0.3, woken  # the beats, and a wake or two per line
    outcomes(run_dir, 1)
    marks = json.loads((run_dir / ".rank-0.clock").read_text())["lines"]
    lines = (run_dir / "output-0.txt").read_text().splitlines()
    assert marks[-1][1] == len(lines) == 2 + 12
    iterations = [t for t, count in marks if count > 2]
    gaps = [after - before for before, after in zip(iterations, iterations[1:], strict=False)]
    # Each line noted when it came: the app's pace, give or take a wake-up's delay. Under CI's load one
    # wake came 0.23 s late (a gap of 0.075 s, then a long one), so single gaps only bound a stall; the
    # median and the whole span hold the pace, as the jitter of one line cancels in the next gap.
    span = iterations[-1] - iterations[0]
    assert 0.28 < statistics.median(gaps) < 0.32 and abs(span - 0.3 * len(gaps)) < 0.3, gaps
    assert all(0 < gap < 0.75 for gap in gaps), gaps


def test_without_a_clock_or_a_sample_the_watchdog_keeps_no_clock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    start(run_dir, 1, [0.05], clock=0, fail_after=[3])
    assert outcomes(run_dir, 1)[0]["code"] == 3
    assert not (run_dir / ".rank-0.clock").exists() and not (run_dir / ".rank-0.sampled").exists()
