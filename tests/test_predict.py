"""The model that predicts a whole run from a sample (scripts/predict.py), on logs with a clock: made
to a known timeline here, and real ones of this machine (tests/data/clocked/)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import dcgan_logs
import predict

DATA = Path(__file__).parent / "data"
STARTED = 1000.0  # the step's start, on the clock of the simulated logs


def iteration_line(epoch: int, epochs: int, iteration: int, per_epoch: int, rank: int, seconds: float) -> str:
    return (f"[epoch: {epoch}/{epochs}][iteration: {iteration}/{per_epoch}][rank: {rank}] Loss_D: 1.0000, "
            f"Loss_G: 1.0000, D(x): 0.5000, D(G(z)): 0.4000 / 0.3000, iteration time: {seconds:.4f}s")


def simulate(folder: Path, *, epochs: int = 2, per_epoch: int = 150, first: float = 10.0, step: float = 0.5,
             load: float = 0.05, loader: float = 0.2, save: float = 0.3, end: float = 2.0, exit: float = 0.5,
             ranks: int = 1, slower: float = 0.0, stop_after: int | None = None,
             steps: list[float] | None = None, warmup: list[float] | None = None) -> dict:
    """Write the logs, clocks and outcomes of a run that takes exactly these times, as the app and the
    watchdog would: its ranks' processes exit `exit` seconds after the last iteration line, the step
    ends `end` seconds after it. stop_after=K ends it once K iterations past the first are logged (a
    sample). Rank r's steps are slower by r * slower (the ranks wait for each other, but their lines
    tell their own pace). warmup: the paces of the iterations past the first, before `step` (or
    `steps`) takes over. Returns the run's record in nodes.json."""
    folder.mkdir(parents=True, exist_ok=True)
    last = STARTED
    for rank in range(ranks):
        # A progress bar redrawn with "\r" is one line for the watchdog's clock, two for the parser.
        lines, times = [f"Namespace(num_epochs={epochs}, batch_size=32)", "  0%|    | 0/2\r100%|####| 2/2",
                        f"Rank: {rank}. World Size: {ranks}"], [STARTED + 3.0, STARTED + 3.5, STARTED + 4.0]
        now = STARTED + first - step - loader  # the first epoch's `Training` line
        count = 0
        for epoch in range(epochs):
            lines.append(f"Rank: {rank}, Epoch: {epoch}, Training ...")
            times.append(now)
            now += loader
            for iteration in range(per_epoch):
                pace = (warmup[count - 1] if warmup and 1 <= count <= len(warmup)
                        else steps[count % len(steps)] if steps else step) + rank * slower
                now += pace
                lines.append(iteration_line(epoch, epochs, iteration, per_epoch, rank, pace - load))
                times.append(now)
                now += save if iteration % predict.SAVE_EVERY == 0 else 0.0  # before the next line
                count += 1
                if stop_after is not None and count > stop_after:
                    break
            else:
                lines.append(f"[rank: {rank}] Epoch {epoch} took: 12.3400 seconds")
                times.append(now)
                continue
            break
        (folder / f"output-{rank}.txt").write_text("\n".join(lines) + "\n")
        (folder / f".rank-{rank}.clock").write_text(json.dumps({"lines": [[t, n + 1] for n, t in enumerate(times)]}))
        last = max(last, times[-1] if stop_after is not None else now)
    for rank in range(ranks):
        (folder / f".rank-{rank}.exit").write_text(json.dumps({"code": 0, "finished": last + exit}))
    return {"id": folder.name, "started": STARTED, "finished": last + end}


def test_a_run_at_the_samples_pace_is_predicted_to_the_second(tmp_path: Path) -> None:
    """Every term read from a sample is the one the full run has; the formula adds them as the run does
    (iterations, an epoch boundary with its loader, two saves per epoch of 150 iterations, the end)."""
    full = simulate(tmp_path / "full", end=2.5, exit=1.0)  # the app's own exit: as long as torchrun's
    sample = simulate(tmp_path / "sample", stop_after=20, end=2.0, exit=0.5)
    terms = predict.timing(tmp_path / "sample", sample)
    assert terms.first == pytest.approx(10.0)
    assert terms.step == pytest.approx(0.5) and terms.iteration == pytest.approx(0.45)
    assert terms.loader == pytest.approx(0.2) and terms.save == pytest.approx(0.3)
    assert terms.end == pytest.approx(2.0) and terms.exit == pytest.approx(0.5)
    assert terms.iterations_per_epoch == 150
    prediction = predict.predict(terms, epochs=2)
    wall = 10.0 + (2 * 150 - 1) * 0.5 + 0.2 + 2 * 2 * 0.3 + 2.5
    assert full["finished"] - full["started"] == pytest.approx(wall)
    assert prediction["wall_s"] == pytest.approx(wall)
    assert prediction["epoch_s"] == pytest.approx(150 * 0.5 + 0.2 + 2 * 0.3)
    assert prediction["wall_low_s"] == pytest.approx(wall) == prediction["wall_high_s"]  # a steady sample
    measured = predict.timing(tmp_path / "full", full)  # what VALIDATE compares term by term
    assert (measured.first, measured.step, measured.loader, measured.save, measured.end) == pytest.approx(
        (10.0, 0.5, 0.2, 0.3, 2.5))


def test_the_slowest_rank_sets_the_pace(tmp_path: Path) -> None:
    run = simulate(tmp_path, ranks=3, slower=0.1, stop_after=20)
    terms = predict.timing(tmp_path, run)
    assert terms.step == pytest.approx(0.7)
    assert terms.first == pytest.approx(10.0 + 2 * 0.1)  # the last rank to start training


def test_the_interval_spans_the_samples_faster_to_slower_iterations(tmp_path: Path) -> None:
    paces = [0.4, 0.5, 0.6, 0.5]
    run = simulate(tmp_path, stop_after=40, steps=paces)
    terms = predict.timing(tmp_path, run)
    assert terms.step == pytest.approx(0.5, abs=0.01)
    assert terms.step_low == pytest.approx(0.4) and terms.step_high == pytest.approx(0.6)
    prediction = predict.predict(terms, epochs=2, hourly_usd=0.0464)
    assert prediction["wall_low_s"] == pytest.approx(prediction["wall_s"] * 0.4 / terms.step)
    assert prediction["wall_high_s"] == pytest.approx(prediction["wall_s"] * 0.6 / terms.step)
    assert prediction["cost_usd"] == pytest.approx(0.0464 * prediction["wall_s"] / 3600)
    assert prediction["cost_low_usd"] < prediction["cost_usd"] < prediction["cost_high_usd"]


def test_a_burst_in_a_few_steps_of_the_sample_does_not_move_the_prediction(tmp_path: Path) -> None:
    """Another tenant's burst slows three of the sample's 17 steady steps fourfold: the pace is their
    median, so the prediction is the steady run's to the second (their mean would add 17 %)."""
    full = simulate(tmp_path / "full", end=2.5)  # the app's own exit, which a sample does not show
    sample = simulate(tmp_path / "sample", stop_after=20, steps=[0.5] * 10 + [2.0] * 3 + [0.5] * 30)
    terms = predict.timing(tmp_path / "sample", sample)
    assert terms.step == pytest.approx(0.5) and terms.step_mean > 0.7
    prediction = predict.predict(terms, epochs=2)
    assert prediction["wall_s"] == pytest.approx(full["finished"] - full["started"])
    assert prediction["wall_high_s"] > prediction["wall_s"]  # the burst still widens the interval


def test_the_slower_first_iterations_are_timed_whole_not_taken_for_the_pace(tmp_path: Path) -> None:
    """The iterations just past the first are slower (the first save, caches, the loader's first
    batches): a sample of a run that starts so predicts it to the second, from its later pace."""
    warmup = [2.0, 1.5, 1.0]
    full = simulate(tmp_path / "full", warmup=warmup, end=2.5)
    sample = simulate(tmp_path / "sample", stop_after=20, warmup=warmup)
    terms = predict.timing(tmp_path / "sample", sample)
    assert terms.step == pytest.approx(0.5)
    assert terms.warm == pytest.approx(sum(warmup) + 0.3)  # with the first save
    assert predict.predict(terms, epochs=2)["wall_s"] == pytest.approx(full["finished"] - full["started"])


@pytest.mark.parametrize(("per_epoch", "saves"), [(99, 1), (100, 1), (101, 2), (250, 3)])
def test_an_epoch_saves_at_its_first_iteration_and_every_100th(tmp_path: Path, per_epoch: int, saves: int) -> None:
    full = simulate(tmp_path / "full", epochs=1, per_epoch=per_epoch, end=2.5)
    sample = simulate(tmp_path / "sample", epochs=1, per_epoch=per_epoch, stop_after=20)
    prediction = predict.predict(predict.timing(tmp_path / "sample", sample), epochs=1)
    assert prediction["epoch_s"] == pytest.approx(per_epoch * 0.5 + 0.2 + saves * 0.3)
    assert prediction["wall_s"] == pytest.approx(full["finished"] - full["started"])


@pytest.mark.parametrize(("change", "message"), [
    (lambda folder: (folder / ".rank-0.clock").unlink(), "has no clock or no outcome for rank 0"),
    (lambda folder: (folder / ".rank-0.exit").unlink(), "has no clock or no outcome for rank 0"),
    (lambda folder: (folder / "output-0.txt").write_text("Namespace(num_epochs=2)\n"),
     "rank 0 logged 0 iterations: too few to time (at least 6)"),
    (lambda folder: (folder / ".rank-0.clock").write_text('{"lines": [[1010.0, 3]]}'),
     "the clock of rank 0 ends before line"),
])
def test_a_run_that_shows_too_little_says_what_is_missing(tmp_path: Path, change: object, message: str) -> None:
    run = simulate(tmp_path, stop_after=20)
    change(tmp_path)
    with pytest.raises(predict.NoTiming, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict.timing(tmp_path, run)


def test_logs_of_a_run_without_a_clock_are_no_sample() -> None:
    """The upstream and demo logs kept in tests/data were made before the watchdog kept a clock."""
    with pytest.raises(predict.NoTiming, match="has no clock or no outcome for rank 0"):
        predict.timing(DATA / "upstream", {"started": 0, "finished": 1})


def test_the_parser_says_on_which_line_each_iteration_and_epoch_start_is() -> None:
    text = (DATA / "upstream" / "output-0.txt").read_text()
    lines = text.splitlines()
    log = dcgan_logs.parse_log(text)
    assert len(log.iterations) == 8
    for record in log.iterations:
        assert f"[epoch: {record.epoch}/2][iteration: {record.iteration}/4]" in lines[record.line]
    assert {epoch: lines[line] for epoch, line in log.epoch_start_lines.items()} == {
        0: "Rank: 0, Epoch: 0, Training ...", 1: "Rank: 0, Epoch: 1, Training ..."}


def test_errors_median_largest_and_inside() -> None:
    def predicted(wall: float) -> dict:
        return {"wall_s": wall, "wall_low_s": wall * 0.9, "wall_high_s": wall * 1.1}

    stats = predict.errors([(predicted(110), 100), (predicted(95), 100), (predicted(100), 120)])
    assert stats["errors"] == pytest.approx([0.10, -0.05, -1 / 6])
    assert stats["median_abs"] == pytest.approx(0.10) and stats["largest_abs"] == pytest.approx(1 / 6)
    assert (stats["inside"], stats["of"]) == (2, 3)  # 120 is above 100 * 1.1


def clocked(name: str) -> tuple[Path, dict]:
    folder = DATA / "clocked" / name
    return folder, json.loads((folder / "run.json").read_text())


def test_the_terms_account_for_the_whole_of_a_real_run() -> None:
    """On a real full run of this machine (tests/data/clocked/full), its own terms add up to its wall
    time: the model leaves nothing out (the warm-up as timed, then the mean of the steady steps; the
    epoch boundary and the later saves are what the loader and save terms say)."""
    folder, run = clocked("full")
    terms = predict.timing(folder, run)
    epochs = dcgan_logs.parse_run_folder(folder)[0].num_epochs
    per_epoch = terms.iterations_per_epoch
    training = terms.warm + (epochs * per_epoch - 1 - predict.WARMUP_STEPS) * terms.step_mean \
        + (epochs - 1) * terms.loader + (epochs * math.ceil(per_epoch / predict.SAVE_EVERY) - 1) * terms.save
    assert terms.first + training + terms.end == pytest.approx(run["finished"] - run["started"], rel=0.01)


def test_a_real_sample_predicts_its_full_run_inside_its_interval() -> None:
    """The sample and the full run of one point of a VALIDATE sweep here (4 nodes, demo app; see
    tests/data/clocked/README.md): the same iterations per epoch, the pace within 10 %, and the
    measured wall time inside the predicted interval."""
    sample_folder, sample_run = clocked("sample")
    full_folder, full_run = clocked("full")
    sample, full = predict.timing(sample_folder, sample_run), predict.timing(full_folder, full_run)
    assert sample.iterations_per_epoch == full.iterations_per_epoch == 32
    assert sample.step == pytest.approx(full.step, rel=0.10)
    prediction = predict.predict(sample, epochs=2)
    assert prediction["wall_low_s"] <= full_run["finished"] - full_run["started"] <= prediction["wall_high_s"]
