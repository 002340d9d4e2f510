"""Tests for scripts/dcgan_logs.py (the log parser) and scripts/report.py.

Log lines are built with the exact f-strings of the upstream dist_dcgan.py, and
expectations are computed here from the values written, not copied from the
code's output. Real captured logs under tests/data/ are used when present.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(SCRIPTS))

import config  # noqa: E402
import dcgan_logs  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import run_logs  # noqa: E402
from dcgan_logs import parse_log, parse_run_folder, progress_line, summary  # noqa: E402

# --- builders for upstream-format text ---------------------------------------


def iter_line(epoch, num_epochs, i, n, rank, d, g, dx, dgz1, dgz2, t) -> str:
    # Verbatim the upstream print (dist_dcgan.py, inner training loop).
    return (
        f"[epoch: {epoch}/{num_epochs}][iteration: {i}/{n}][rank: {rank}] "
        f"Loss_D: {d:.4f}, Loss_G: {g:.4f}, "
        f"D(x): {dx:.4f}, D(G(z)): {dgz1:.4f} / {dgz2:.4f}, "
        f"iteration time: {t:.4f}s"
    )


def took_line(rank: int, epoch: int, seconds: float) -> str:
    return f"[rank: {rank}] Epoch {epoch} took: {seconds:.4f} seconds"


def header(rank: int, world: int, num_epochs: int) -> list[str]:
    return [
        f"Namespace(dataset='cifar10', dataroot='/data', local_rank=None, "
        f"num_epochs={num_epochs}, download=False, batch_size=32, learning_rate=0.0002, "
        f"image_size=64, test_data=False, seed=0, cuda=False, beta1=0.5, nz=100, "
        f"ngf=64, ndf=64, out_folder='out', max_workers=4)",
        "Using seed: 0",
        "Using GPU: False",
        f"Rank: {rank}. World Size: {world}",
        "Dataset cifar10 loaded",
    ]


def values(rank: int, epoch: int, i: int) -> tuple[float, ...]:
    """Deterministic metrics with at most 4 decimals, so printing loses nothing."""
    k = epoch * 100 + i
    return (
        1.0 + 0.0125 * k + 0.5 * rank,  # Loss_D
        2.0 + 0.0250 * k,  # Loss_G
        0.5 + 0.001 * k,  # D(x)
        0.4 - 0.001 * k,  # D(G(z)) before G step
        0.3 - 0.001 * k,  # D(G(z)) after G step
        0.25 + 0.0625 * (i % 4) + 0.5 * rank,  # iteration time
    )


def build_log(
    rank: int,
    world: int,
    num_epochs: int,
    ipe: int,
    stop: tuple[int, int] | None = None,
    epoch_seconds: dict[int, float] | None = None,
) -> tuple[str, list[tuple[int, int, tuple[float, ...]]], dict[int, float]]:
    """Text of one rank's log up to and including iteration ``stop`` (epoch, i);
    None runs all epochs. Returns (text, records written, epoch times written)."""
    lines = header(rank, world, num_epochs)
    records = []
    took = {}
    for epoch in range(num_epochs):
        lines.append(f"Rank: {rank}, Epoch: {epoch}, Training ...")
        for i in range(ipe):
            v = values(rank, epoch, i)
            lines.append(iter_line(epoch, num_epochs, i, ipe, rank, *v))
            records.append((epoch, i, v))
            if stop == (epoch, i):
                return "\n".join(lines) + "\n", records, took
        seconds = (epoch_seconds or {}).get(epoch, 10.0 + epoch + rank * 0.5)
        lines.append(took_line(rank, epoch, seconds))
        took[epoch] = seconds
    return "\n".join(lines) + "\n", records, took


_AGENT = "E1128 16:40:01.123000 812 torch/distributed/elastic/multiprocessing/api.py:882] "
AGENT_FAILED = _AGENT + "failed (exitcode: 1) local_rank: 0 (pid: 4242) of binary: /usr/bin/python3"

CHILD_TRACEBACK = f"""\
Traceback (most recent call last):
  File "/app/dist_dcgan.py", line 255, in <module>
    main()
  File "/app/dist_dcgan.py", line 152, in main
    torch.distributed.init_process_group(backend="gloo")
  File "/usr/lib/python3/site-packages/torch/distributed/c10d_logger.py", line 81, in wrapper
    return func(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^^^^
RuntimeError: Gloo connectFullMesh failed with [../third_party/gloo/gloo/transport/tcp/pair.cc:144] no error
{AGENT_FAILED}
Traceback (most recent call last):
  File "/usr/bin/torchrun", line 8, in <module>
    sys.exit(main())
  File "/usr/lib/python3/site-packages/torch/distributed/run.py", line 143, in __call__
    return launch_agent(self._config, self._entrypoint, list(args))
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n\
============================================================
/app/dist_dcgan.py FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2025-11-28_16:40:01
  host      : node1
  rank      : 1 (local_rank: 0)
  exitcode  : 1 (pid: 4242)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""

SIGNAL_ONLY = """\
{agent_sigterm}
{agent_failed_signal}
Traceback (most recent call last):
  File "/usr/bin/torchrun", line 8, in <module>
    sys.exit(main())
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n\
============================================================
/app/dist_dcgan.py FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : -9 (pid: 4242) (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
""".format(
    agent_sigterm=_AGENT.replace("E1128", "W1128") + "Sending process 4242 closing signal SIGTERM",
    agent_failed_signal=AGENT_FAILED.replace("exitcode: 1", "exitcode: -9"),
)


def write_png(path: Path, width: int, height: int) -> None:
    """A real RGB PNG (8x4 tiles, like a sample grid) without any imaging library."""
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")  # filter type 0 for this scanline
        for x in range(width):
            tile = (x * 8 // width) + 8 * (y * 4 // height)
            row += bytes(((tile * 37) % 256, (tile * 91) % 256, (x + y) % 256))
        rows.append(bytes(row))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- parse_log ---------------------------------------------------------------


def test_parse_complete_log_counts_times_and_final_values():
    text, records, took = build_log(rank=1, world=2, num_epochs=2, ipe=5)
    log = parse_log(text)
    assert (log.rank, log.world_size, log.num_epochs, log.iterations_per_epoch) == (1, 2, 2, 5)
    assert len(log.iterations) == len(records) == 10
    assert log.epoch_times == pytest.approx(took)
    assert log.finished and log.status == "finished" and log.error is None
    assert log.current_epoch == 1
    assert log.done_iterations == 10 == log.total_iterations
    for rec, (epoch, i, v) in zip(log.iterations, records, strict=True):
        assert (rec.epoch, rec.iteration) == (epoch, i)
        got = (rec.loss_d, rec.loss_g, rec.d_x, rec.d_g_z1, rec.d_g_z2, rec.iteration_time)
        assert got == pytest.approx(v)
    assert log.args["dataset"] == "cifar10" and log.args["num_epochs"] == "2"


def test_parse_in_progress_log_is_running_not_finished():
    text, records, took = build_log(rank=0, world=2, num_epochs=3, ipe=4, stop=(1, 2))
    log = parse_log(text)
    assert len(log.iterations) == len(records) == 4 + 3
    assert list(log.epoch_times) == list(took) == [0]
    assert not log.finished and log.status == "running"
    assert log.current_epoch == 1
    assert log.done_iterations == 1 * 4 + 2 + 1
    assert log.total_iterations == 12


def test_last_epoch_needs_its_took_line_to_be_finished():
    text, _, _ = build_log(rank=0, world=1, num_epochs=2, ipe=3, stop=(1, 2))
    assert not parse_log(text).finished
    assert parse_log(text + took_line(0, 1, 5.0) + "\n").finished


def test_partial_trailing_line_is_ignored_at_every_cut():
    text, records, _ = build_log(rank=0, world=2, num_epochs=2, ipe=3, stop=(0, 1))
    nxt = iter_line(0, 2, 2, 3, 0, *values(0, 0, 2))
    for cut in range(len(nxt)):
        log = parse_log(text + nxt[:cut])
        assert len(log.iterations) == len(records), nxt[:cut]
    assert len(parse_log(text + nxt).iterations) == len(records) + 1  # no final newline

    done, _, _ = build_log(rank=0, world=2, num_epochs=2, ipe=3, stop=(1, 2))
    last = took_line(0, 1, 12.3456)
    for cut in range(len(last)):
        assert not parse_log(done + last[:cut]).finished, last[:cut]
    assert parse_log(done + last).finished


def test_error_is_the_childs_exception_not_torchruns_wrapper():
    text, _, _ = build_log(rank=1, world=2, num_epochs=2, ipe=3, stop=(0, 0))
    log = parse_log(text + CHILD_TRACEBACK)
    assert log.error == (
        "RuntimeError: Gloo connectFullMesh failed with "
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:144] no error"
    )
    assert log.status == "failed" and not log.finished


def test_error_from_signal_when_child_left_no_traceback():
    text, _, _ = build_log(rank=0, world=2, num_epochs=2, ipe=3, stop=(1, 0))
    assert parse_log(text + SIGNAL_ONLY).error == "Signal 9 (SIGKILL) received by PID 4242"


def test_error_wrapper_alone_is_named_with_its_next_line():
    text = "Traceback (most recent call last):\n  File \"x\", line 1\nfoo.ChildFailedError: \n=====\napp.py FAILED\n"
    assert parse_log(text).error == "ChildFailedError: app.py FAILED"


@pytest.mark.parametrize(
    "line",
    [
        "/usr/bin/python3: can't open file '/app/dist_dcgan.py': [Errno 2] No such file or directory",
        "/usr/bin/python3: No module named torch",
        "dist_dcgan.py: error: the following arguments are required: --dataset",
        "Killed",
    ],
)
def test_error_from_fatal_lines_without_traceback(line):
    assert parse_log(f"Using seed: 0\n{line}\n").error == line


def test_last_traceback_wins_and_bare_exception_names_count():
    text = (
        "Traceback (most recent call last):\n  File \"a\", line 1\nValueError: first\n"
        "Traceback (most recent call last):\n  File \"b\", line 2\nKeyboardInterrupt\n"
    )
    assert parse_log(text).error == "KeyboardInterrupt"


def test_warnings_and_noise_are_not_errors():
    text, _, _ = build_log(rank=0, world=2, num_epochs=1, ipe=2)
    noise = (
        "/usr/lib/python3/site-packages/torch/utils/data/dataloader.py:558: UserWarning: "
        "This DataLoader will create 4 worker processes; error: none\n"
        "[W1128 16:27:00.000000 socket.cpp:752] [c10d] The client socket has failed to "
        "connect to [node0]:29500 (errno: 99 - Cannot assign requested address).\n"
    )
    log = parse_log(noise + text)
    assert log.error is None and log.status == "finished"


def test_nan_and_inf_losses_parse():
    line = (
        "[epoch: 0/1][iteration: 0/1][rank: 0] Loss_D: nan, Loss_G: inf, D(x): -inf, "
        "D(G(z)): 0.5000 / 0.5000, iteration time: 1.0000s"
    )
    rec = parse_log(line + "\n").iterations[0]
    assert math.isnan(rec.loss_d) and rec.loss_g == math.inf and rec.d_x == -math.inf


def test_launcher_line_prefix_and_other_ranks_lines():
    text, records, _ = build_log(rank=0, world=2, num_epochs=1, ipe=3)
    prefixed = "".join(f"[default0]:{line}\n" for line in text.splitlines())
    log = parse_log(prefixed + iter_line(0, 1, 0, 3, 1, *values(1, 0, 0)) + "\n")
    assert log.rank == 0 and len(log.iterations) == len(records) and log.finished


def test_restart_keeps_only_the_last_attempt():
    first, _, _ = build_log(rank=0, world=2, num_epochs=2, ipe=3, stop=(1, 1))
    second, records, _ = build_log(rank=0, world=2, num_epochs=2, ipe=3, stop=(0, 0))
    log = parse_log(first + CHILD_TRACEBACK + second)
    assert log.restarts == 1
    assert len(log.iterations) == len(records) == 1
    assert log.error is None and log.status == "running"


def test_waiting_phases():
    assert parse_log("").status == "waiting"
    assert parse_log("").phase == "no output"
    lines = header(0, 2, 2)
    assert parse_log("\n".join(lines[:3]) + "\n").phase == "launched"
    assert parse_log("\n".join(lines[:4]) + "\n").phase == "initialised"
    log = parse_log("\n".join(lines) + "\n")
    assert log.phase == "dataset loaded" and log.num_epochs == 2 and log.rank == 0


def test_parse_run_folder_reads_output_files_only(tmp_path):
    for rank in (0, 1, 10):
        text, _, _ = build_log(rank=rank, world=11, num_epochs=1, ipe=2)
        (tmp_path / f"output-{rank}.txt").write_text(text)
    (tmp_path / "output-2.txt").write_text("")  # launched, nothing printed yet
    (tmp_path / "output-x.txt").write_text("junk")
    (tmp_path / "notes.txt").write_text("junk")
    logs = parse_run_folder(tmp_path)
    assert list(logs) == [0, 1, 2, 10]
    assert logs[2].rank == 2 and logs[2].status == "waiting"
    assert all(logs[r].finished for r in (0, 1, 10))


# --- real captured logs ------------------------------------------------------


def _independent_counts(text: str) -> dict:
    """Expectations by plain string handling, independent of the parser's regexes."""
    lines = [ln for ln in text.splitlines() if ln.startswith("[epoch: ") and ln.endswith("s")]
    took = [ln for ln in text.splitlines() if " took: " in ln and ln.endswith(" seconds")]
    first = lines[0] if lines else ""
    return {
        "iterations": len(lines),
        "epochs_done": len(took),
        "num_epochs": int(first.split("]")[0].split("/")[1]) if first else None,
        "ipe": int(first.split("]")[1].split("/")[1]) if first else None,
        "last_loss_d": float(lines[-1].split("Loss_D: ")[1].split(",")[0]) if lines else None,
        "epoch_seconds": [float(ln.split(" took: ")[1].split()[0]) for ln in took],
    }


@pytest.mark.skipif(
    not (DATA / "upstream" / "output-0.txt").is_file(),
    reason="real captured upstream logs tests/data/upstream/output-*.txt not present yet",
)
def test_real_upstream_logs():
    logs = parse_run_folder(DATA / "upstream")
    assert logs, "no output-*.txt parsed"
    for rank, log in logs.items():
        text = (DATA / "upstream" / f"output-{rank}.txt").read_text()
        exp = _independent_counts(text)
        assert log.rank == rank
        assert len(log.iterations) == exp["iterations"] > 0
        assert len(log.epoch_times) == exp["epochs_done"]
        assert (log.num_epochs, log.iterations_per_epoch) == (exp["num_epochs"], exp["ipe"])
        assert log.iterations[-1].loss_d == pytest.approx(exp["last_loss_d"])
        assert log.finished == (exp["epochs_done"] == exp["num_epochs"])
        assert (log.error is None) == ("Traceback" not in text)
        assert f"rank {rank}" in progress_line(log, None, None)
    data = summary(logs)
    sums = [sum(_independent_counts((DATA / "upstream" / f"output-{r}.txt").read_text())["epoch_seconds"])
            for r in logs]
    assert data["training_seconds"] == pytest.approx(max(sums))


@pytest.mark.skipif(
    not list((DATA / "demo").glob("output-*.txt")),
    reason="real captured demo logs tests/data/demo/output-*.txt not present yet",
)
def test_real_demo_logs():
    logs = parse_run_folder(DATA / "demo")
    for rank, log in logs.items():
        exp = _independent_counts((DATA / "demo" / f"output-{rank}.txt").read_text())
        assert len(log.iterations) == exp["iterations"]
        assert len(log.epoch_times) == exp["epochs_done"]
        assert progress_line(log, None, None).startswith("rank ")


# --- progress_line -----------------------------------------------------------


def _uniform_log(num_epochs: int, ipe: int, stop: tuple[int, int], seconds: float):
    lines = header(0, 2, num_epochs)
    for epoch in range(num_epochs):
        for i in range(ipe):
            lines.append(iter_line(epoch, num_epochs, i, ipe, 0, 1, 1, 0.5, 0.5, 0.5, seconds))
            if (epoch, i) == stop:
                return parse_log("\n".join(lines) + "\n")
        lines.append(took_line(0, epoch, ipe * seconds))
    raise AssertionError("stop not reached")


def test_progress_running_exact_line():
    log = _uniform_log(num_epochs=3, ipe=10, stop=(1, 4), seconds=0.4)
    done, total = 1 * 10 + 5, 30
    rate = 1 / 0.4
    eta = round((total - done) * 0.4)
    bar = "#" * (20 * done // total) + "." * (20 - 20 * done // total)
    expected = f"rank 0  epoch 2/3  iter  5/10  [{bar}]  {rate:.1f} it/s  ETA 0:{eta:02d}"
    assert progress_line(log, now=100.0, last_change=95.0) == expected


def test_progress_rate_uses_recent_iterations_and_bar_width():
    lines = header(0, 1, 1)
    times = [2.0] * 30 + [0.5] * 20
    for i, t in enumerate(times):
        lines.append(iter_line(0, 1, i, 100, 0, 1, 1, 0.5, 0.5, 0.5, t))
    line = progress_line(parse_log("\n".join(lines) + "\n"), None, None, width=10)
    assert "[#####.....]" in line
    assert "2.0 it/s" in line  # the last 20 iterations, not the 2.0 s ones
    assert "ETA 0:25" in line  # 50 left x 0.5 s


def test_progress_finished():
    text, records, took = build_log(rank=1, world=2, num_epochs=2, ipe=3)
    line = progress_line(parse_log(text), now=1000.0, last_change=0.0)
    assert line.startswith("rank 1  finished")
    assert f"{len(records)} iters" in line and "2/2 epochs" in line
    assert "stalled" not in line  # a finished rank does not stall
    total = round(sum(took.values()))
    assert f"trained 0:{total:02d}" in line


def test_progress_failed_shows_error_and_position():
    text, _, _ = build_log(rank=1, world=2, num_epochs=2, ipe=3, stop=(1, 0))
    line = progress_line(parse_log(text + CHILD_TRACEBACK), None, None)
    assert line.startswith("rank 1  failed: RuntimeError: Gloo connectFullMesh failed")
    assert "epoch 2/2  iter 1/3" in line

    long_error = "RuntimeError: " + "x" * 500
    line = progress_line(parse_log(f"Traceback (most recent call last):\n{long_error}\n"), None, None)
    assert len(line) < 200 and line.endswith("...")


def test_progress_stalled_replaces_rate_and_eta():
    log = _uniform_log(num_epochs=2, ipe=10, stop=(0, 3), seconds=1.0)
    line = progress_line(log, now=1090.0, last_change=1000.0, stall_after=60)
    assert line.endswith("stalled 90s") and "ETA" not in line
    assert "stalled" not in progress_line(log, now=1059.0, last_change=1000.0, stall_after=60)
    assert "stalled" not in progress_line(log, now=None, last_change=None)


def test_progress_waiting_and_waiting_stalled():
    log = parse_log("\n".join(header(1, 2, 2)) + "\n")
    assert progress_line(log, None, None) == "rank 1  waiting to start (dataset loaded)"
    stuck = progress_line(log, now=500.0, last_change=200.0)
    assert stuck == "rank 1  waiting to start (dataset loaded)  stalled 300s"


def test_progress_colors_only_on_request():
    finished = parse_log(build_log(rank=0, world=1, num_epochs=1, ipe=2)[0])
    failed = parse_log("Killed\n")
    for log in (finished, failed):
        assert "\033[" not in progress_line(log, None, None)
    assert progress_line(finished, None, None, color=True).startswith("\033[32m")
    assert progress_line(failed, None, None, color=True).startswith("\033[31m")
    assert progress_line(failed, None, None, color=True).endswith("\033[0m")


# --- summary -----------------------------------------------------------------


def _two_rank_run():
    """Rank 0 finished 2 epochs; rank 1 failed in epoch 1 after 2 iterations."""
    t0, rec0, took0 = build_log(0, 2, 2, 4, epoch_seconds={0: 12.5, 1: 11.25})
    t1, rec1, took1 = build_log(1, 2, 2, 4, stop=(1, 1), epoch_seconds={0: 13.75})
    logs = {0: parse_log(t0), 1: parse_log(t1 + CHILD_TRACEBACK)}
    return logs, {0: (rec0, took0), 1: (rec1, took1)}


def test_summary_numbers_from_known_inputs():
    logs, written = _two_rank_run()
    data = summary(logs)
    assert [r["rank"] for r in data["ranks"]] == [0, 1]
    for entry in data["ranks"]:
        records, took = written[entry["rank"]]
        last = records[-1][2]
        assert entry["iterations"] == len(records)
        assert entry["epochs_completed"] == len(took)
        assert entry["seconds_per_epoch"] == {str(e): pytest.approx(s) for e, s in took.items()}
        assert entry["training_seconds"] == pytest.approx(sum(took.values()))
        times = [v[5] for _, _, v in records]
        assert entry["mean_iteration_time"] == pytest.approx(sum(times) / len(times))
        assert entry["final_loss_d"] == pytest.approx(last[0])
        assert entry["final_loss_g"] == pytest.approx(last[1])
        assert entry["final_d_x"] == pytest.approx(last[2])
        assert entry["final_d_g_z1"] == pytest.approx(last[3])
        assert entry["final_d_g_z2"] == pytest.approx(last[4])
    assert data["ranks"][0]["status"] == "finished"
    assert data["ranks"][1]["status"] == "failed"
    assert data["ranks"][1]["error"].startswith("RuntimeError: Gloo connectFullMesh")
    assert data["failed_ranks"] == [1] and not data["all_finished"]
    # 12.5 + 11.25 (rank 0) beats 13.75 (rank 1): the slowest rank's sum.
    assert data["training_seconds"] == pytest.approx(23.75)
    assert (data["world_size"], data["num_epochs"]) == (2, 2)


def test_summary_is_strict_json_even_with_nan():
    text = iter_line(0, 1, 0, 1, 0, math.nan, math.inf, 0.5, 0.5, 0.5, 1.0) + "\n"
    data = summary({0: parse_log(text)})
    json.dumps(data, allow_nan=False)
    entry = data["ranks"][0]
    assert entry["final_loss_d"] is None and entry["final_loss_g"] is None
    assert entry["nonfinite_iterations"] == 1
    assert summary({})["training_seconds"] == 0.0


def test_importing_the_parser_and_report_does_not_load_matplotlib():
    code = (
        f"import sys; sys.path.insert(0, {str(SCRIPTS)!r}); import dcgan_logs, report; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- report.py ---------------------------------------------------------------


def _synthetic_run(folder: Path) -> dict:
    logs, _ = _two_rank_run()
    t0, _, _ = build_log(0, 2, 2, 4, epoch_seconds={0: 12.5, 1: 11.25})
    t1, _, _ = build_log(1, 2, 2, 4, stop=(1, 1), epoch_seconds={0: 13.75})
    (folder / "output-0.txt").write_text(t0)
    (folder / "output-1.txt").write_text(t1 + CHILD_TRACEBACK)
    for name in (
        "fake_samples_rank_0_epoch_0_iter_0.png",
        "fake_samples_rank_1_epoch_1_iter_0.png",
        "fake_samples_rank_0_epoch_1_iter_0.png",
        "real_samples_rank_0_epoch_1_iter_0.png",
    ):
        write_png(folder / name, 66 * 8 + 2, 66 * 4 + 2)
    (folder / "notes.txt").write_text("keep me")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_find_last_samples_prefers_epoch_then_iteration_then_rank(tmp_path):
    for name in (
        "fake_samples_rank_1_epoch_2_iter_0.png",
        "fake_samples_rank_0_epoch_1_iter_300.png",
        "fake_samples_rank_0_epoch_2_iter_0.png",
        "fake_samples_rank_0_epoch_10_iter_0.png.tmp",
    ):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "fake_samples_rank_3_epoch_2_iter_100.png").write_bytes(b"")
    assert report.find_last_samples(tmp_path).name == "fake_samples_rank_3_epoch_2_iter_100.png"
    (tmp_path / "out" / "fake_samples_rank_3_epoch_2_iter_100.png").unlink()
    assert report.find_last_samples(tmp_path).name == "fake_samples_rank_0_epoch_2_iter_0.png"
    assert report.find_last_samples(tmp_path, "real") is None


def test_report_writes_three_files_and_nothing_else(tmp_path, capsys):
    before = _synthetic_run(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and all(n in out[0] for n in ("summary.json", "summary.md", "report.png"))

    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) == set(before) | {"summary.json", "summary.md", "report.png"}
    assert all(after[name] == content for name, content in before.items())

    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["training_seconds"] == pytest.approx(12.5 + 11.25)
    assert data["failed_ranks"] == [1]
    assert data["last_fake_samples"] == "fake_samples_rank_0_epoch_1_iter_0.png"
    r0, r1 = data["ranks"]
    assert (r0["iterations"], r1["iterations"]) == (8, 4 + 2)
    assert r0["seconds_per_epoch"] == {"0": 12.5, "1": 11.25}
    assert r1["final_loss_d"] == pytest.approx(values(1, 1, 1)[0])

    md = (tmp_path / "summary.md").read_text()
    assert "| 0 | finished | 2/2 | 8 |" in md
    assert "| 1 | failed | 1/2 | 6 |" in md
    assert "Gloo connectFullMesh" in md

    png = tmp_path / "report.png"
    width, height = png_size(png)
    assert (width, height) == (1500, 1000)
    assert 30_000 < png.stat().st_size < 2_000_000


def test_report_rerun_overwrites_only_its_own_files(tmp_path):
    _synthetic_run(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    (tmp_path / "output-0.txt").write_text("")  # rank 0's log emptied: still reportable
    assert report.main([str(tmp_path)]) == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["ranks"][0]["status"] == "waiting"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "report.py"), *args], capture_output=True, text=True, timeout=120
    )


def test_cli_end_to_end(tmp_path):
    _synthetic_run(tmp_path)
    result = _run_cli(str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "report.png" in result.stdout
    assert png_size(tmp_path / "report.png") == (1500, 1000)


def test_cli_folder_without_logs_fails_clearly(tmp_path):
    (tmp_path / "fake_samples_rank_0_epoch_0_iter_0.png").write_bytes(b"")
    result = _run_cli(str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "output-<rank>.txt" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake_samples_rank_0_epoch_0_iter_0.png"]

    missing = tmp_path / "nope"
    result = _run_cli(str(missing))
    assert result.returncode == 1 and str(missing) in result.stderr and "not a directory" in result.stderr
    assert not missing.exists()


def test_cli_help():
    result = _run_cli("--help")
    assert result.returncode == 0 and "RUN_FOLDER" in result.stdout


def test_module_constants_match_written_names():
    assert (report.SUMMARY_JSON, report.SUMMARY_MD, report.REPORT_PNG) == (
        "summary.json",
        "summary.md",
        "report.png",
    )
    assert dcgan_logs.format_duration(3723) == "1:02:03"
    assert dcgan_logs.format_duration(59.6) == "1:00"


def test_report_before_any_iteration_and_with_a_half_written_png(tmp_path):
    (tmp_path / "output-0.txt").write_text("\n".join(header(0, 2, 2)) + "\n")
    (tmp_path / "output-1.txt").write_text("")
    write_png(tmp_path / "fake_samples_rank_0_epoch_0_iter_0.png", 64, 32)
    png = tmp_path / "fake_samples_rank_0_epoch_0_iter_0.png"
    png.write_bytes(png.read_bytes()[:60])  # the app is still writing it
    assert report.main([str(tmp_path)]) == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    assert [r["status"] for r in data["ranks"]] == ["waiting", "waiting"]
    assert data["training_seconds"] == 0.0 and not data["all_finished"]
    assert png_size(tmp_path / "report.png") == (1500, 1000)


def test_the_closing_progress_report_is_not_a_repeat(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run that ends right after a periodic report shows its final lines once, not twice;
    a closing report with news in it is shown."""
    settings = config.load_settings({"ENV_FILE": os.devnull, "EFS_MOUNT_POINT": str(tmp_path),
                                     "CLAP_PATH": str(tmp_path / "clap")})
    folder = Path(run_logs.run_folder(settings, "r1"))
    folder.mkdir(parents=True)
    log = folder / "output-0.txt"
    log.write_text(build_log(0, 1, 2, 4, stop=(1, 1))[0])
    progress = run.Progress(settings, {"nodes": [{"rank": 0}]}, "r1", None, every=3600)
    progress.start()
    progress.report()
    log.write_text(build_log(0, 1, 2, 4)[0])
    progress.report()
    progress.finish()
    reports = [line for line in capsys.readouterr().out.splitlines() if "rank 0" in line]
    assert len(reports) == 2 and "finished" in reports[1], reports


@pytest.mark.parametrize(("sample", "shown"), [
    (20, "rank 0  sampled: stopped after 20 iterations past its first"),
    (0, "rank 0  failed: SignalException"),  # a whole run that was stopped so did fail
])
def test_a_samples_stopped_ranks_show_as_sampled_not_failed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           sample: int, shown: str) -> None:
    """A sample's ranks end in the stop's traceback (tests/data/clocked/sample, a real one): while the run
    is a sample of 20 iterations past the first, its progress says sampled."""
    settings = config.load_settings({"ENV_FILE": os.devnull, "EFS_MOUNT_POINT": str(tmp_path),
                                     "CLAP_PATH": str(tmp_path / "clap")})
    folder = Path(run_logs.run_folder(settings, "r1"))
    folder.mkdir(parents=True)
    (folder / "output-0.txt").write_bytes((DATA / "clocked" / "sample" / "output-0.txt").read_bytes())
    run.Progress(settings, {"nodes": [{"rank": 0}]}, "r1", None, every=3600, sample=sample).report()
    assert shown in capsys.readouterr().out
