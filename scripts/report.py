"""Summarise a Distributed-DCGAN run folder: summary.json, summary.md, report.png.

Usage: python scripts/report.py RUN_FOLDER

Reads the per-rank logs ``output-<rank>.txt`` (via dcgan_logs, the one parser)
and the sample grids ``fake_samples_rank_R_epoch_E_iter_I.png`` the app saved,
and writes only its own three files into RUN_FOLDER.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from dcgan_logs import RankLog, format_duration, parse_run_folder, summary

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
REPORT_PNG = "report.png"
# What the steps that draw a report say when it fails: the report only reads the run's files.
NO_REPORT = "no report for {folder}; its files are there all the same."

_SAMPLES_RE = re.compile(r"^(fake|real)_samples_rank_(\d+)_epoch_(\d+)_iter_(\d+)\.png$")
# Above this many points a raw GAN loss curve is mostly noise: draw it faint and
# overlay a moving average.
_SMOOTH_ABOVE = 60


def find_last_samples(folder: Path, kind: str = "fake") -> Path | None:
    """Latest ``<kind>_samples`` grid under ``folder``: highest epoch, then
    iteration, then lowest rank (rank 0 is the usual reference)."""
    best: tuple[int, int, int] | None = None
    best_path = None
    # rglob: the app's --out_folder may be a sub-folder of the run folder.
    for path in Path(folder).rglob(f"{kind}_samples_rank_*_epoch_*_iter_*.png"):
        match = _SAMPLES_RE.match(path.name)
        if match is None or not path.is_file():
            continue
        key = (int(match.group(3)), int(match.group(4)), -int(match.group(2)))
        if best is None or key > best:
            best, best_path = key, path
    return best_path


def _matching_real(fake: Path) -> Path | None:
    real = fake.with_name(fake.name.replace("fake_samples_", "real_samples_", 1))
    return real if real.is_file() else None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _state_words(data: dict, finished: str, failed: str, unfinished: str) -> str:
    if data["all_finished"]:
        return finished
    if data["failed_ranks"]:
        return failed + ", ".join(str(r) for r in data["failed_ranks"])
    return unfinished


def render_summary_md(data: dict, folder_name: str) -> str:
    """Readable Markdown: run facts, then one table row per rank, then errors."""
    ranks = data["ranks"]
    state = _state_words(data, "all ranks finished", "failed ranks: ",
                         "not finished (still running, or stopped without an error)")
    lines = [
        f"# DCGAN run report: {folder_name}",
        "",
        (
            f"- Ranks logged: {len(ranks)} (world size {data['world_size'] or '?'}), "
            f"epochs: {data['num_epochs'] or '?'}"
        ),
        f"- Status: {state}",
        f"- Training time (slowest rank, sum of its epoch times): {data['training_seconds']:.2f} s",
    ]
    if data.get("last_fake_samples"):
        lines.append(f"- Last generated samples: `{data['last_fake_samples']}`")
    lines += [
        "",
        (
            "| rank | status | epochs done | iterations | seconds per epoch"
            " | mean iteration time (s) | Loss_D | Loss_G | D(x)"
            " | D(G(z)) before / after G step |"
        ),
        "| ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in ranks:
        epochs = f"{r['epochs_completed']}/{r['num_epochs'] if r['num_epochs'] is not None else '?'}"
        per_epoch = ", ".join(f"{s:.2f}" for s in r["seconds_per_epoch"].values()) or "-"
        dgz = (
            "-"
            if r["final_d_g_z1"] is None and r["final_d_g_z2"] is None
            else f"{_fmt(r['final_d_g_z1'])} / {_fmt(r['final_d_g_z2'])}"
        )
        lines.append(
            f"| {r['rank']} | {r['status']} | {epochs} | {r['iterations']} | {per_epoch} "
            f"| {_fmt(r['mean_iteration_time'])} | {_fmt(r['final_loss_d'])} "
            f"| {_fmt(r['final_loss_g'])} | {_fmt(r['final_d_x'])} | {dgz} |"
        )
    errors = [r for r in ranks if r["error"]]
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- rank {r['rank']} ({r['status']}): `{_md_cell(r['error'])}`" for r in errors]
    notes = [r for r in ranks if r["nonfinite_iterations"]]
    if notes:
        lines += ["", "## Non-finite values", ""]
        lines += [
            f"- rank {r['rank']}: {r['nonfinite_iterations']} iterations with nan/inf losses"
            for r in notes
        ]
    return "\n".join(lines) + "\n"


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    acc = 0.0
    count = 0
    queue: list[float] = []
    for v in values:
        # nan (a diverged step) would poison the running sum: skip it.
        if math.isfinite(v):
            queue.append(v)
            acc += v
            count += 1
        else:
            queue.append(math.nan)
        if len(queue) > window:
            old = queue.pop(0)
            if math.isfinite(old):
                acc -= old
                count -= 1
        out.append(acc / count if count else math.nan)
    return out


def _global_x(log: RankLog) -> list[int]:
    ipe = log.iterations_per_epoch
    if ipe is None:
        return list(range(len(log.iterations)))
    return [r.epoch * ipe + r.iteration for r in log.iterations]


def _finite(values: list[float]) -> list[float]:
    # inf would wreck the autoscaled axis; nan is simply a gap in the line.
    return [v if math.isfinite(v) else math.nan for v in values]


_LOSS_COLORS = {"Loss_D": "tab:blue", "Loss_G": "tab:red"}
# Colour tells the loss apart (what a reader compares first); the line style
# tells the ranks apart, which DDP keeps close to each other anyway.
_RANK_STYLES = ["-", "--", ":", "-."]


def _draw_losses(ax, logs: dict[int, RankLog]) -> None:
    any_data = False
    ipe = None
    for index, (rank, log) in enumerate(logs.items()):
        if not log.iterations:
            continue
        any_data = True
        ipe = ipe or log.iterations_per_epoch
        x = _global_x(log)
        style = _RANK_STYLES[index % len(_RANK_STYLES)]
        failed = " (failed)" if log.status == "failed" else ""
        for attr, name in (("loss_d", "Loss_D"), ("loss_g", "Loss_G")):
            color = _LOSS_COLORS[name]
            y = _finite([getattr(r, attr) for r in log.iterations])
            label = f"{name} rank {rank}{failed}"
            if len(y) > _SMOOTH_ABOVE:
                window = max(5, len(y) // 40)
                ax.plot(x, y, "-", color=color, alpha=0.12, linewidth=0.6)
                ax.plot(x, _moving_average(y, window), style, color=color, linewidth=1.8,
                        label=f"{label}, moving avg of {window}")
            else:
                ax.plot(x, y, style, color=color, linewidth=1.5, marker=".", markersize=5, label=label)
    ax.set_title("Losses (blue: Loss_D, red: Loss_G; line style: rank)")
    ax.set_xlabel("global iteration (epoch × iterations per epoch + iteration)")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if not any_data:
        ax.text(0.5, 0.5, "no iterations logged yet", ha="center", va="center", transform=ax.transAxes)
        return
    epochs = max((log.num_epochs or 0) for log in logs.values())
    if ipe:
        for e in range(1, epochs):
            ax.axvline(e * ipe, color="grey", linestyle=":", linewidth=1)
            ax.text(e * ipe, 1.0, f" epoch {e + 1}", transform=ax.get_xaxis_transform(),
                    va="top", ha="left", fontsize=8, color="grey")
    ax.legend(fontsize=8, ncol=2 if len(logs) > 2 else 1, loc="best")


def _draw_iteration_times(ax, logs: dict[int, RankLog]) -> None:
    from matplotlib import colormaps

    colors = colormaps["Set2"]
    epochs = sorted({r.epoch for log in logs.values() for r in log.iterations})
    ax.set_title("Iteration time by epoch (bars: mean ± std)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("seconds per iteration")
    ax.grid(True, axis="y", alpha=0.3)
    if not epochs:
        ax.text(0.5, 0.5, "no iterations logged yet", ha="center", va="center", transform=ax.transAxes)
        return
    ranks = list(logs)
    width = 0.8 / max(1, len(ranks))
    wall_labelled = False
    top = 0.0
    for index, rank in enumerate(ranks):
        log = logs[rank]
        xs, means, stds = [], [], []
        for e in epochs:
            times = [r.iteration_time for r in log.iterations if r.epoch == e and math.isfinite(r.iteration_time)]
            if not times:
                continue
            mean = sum(times) / len(times)
            std = math.sqrt(sum((t - mean) ** 2 for t in times) / len(times))
            xs.append(e + 1 + (index - (len(ranks) - 1) / 2) * width)
            means.append(mean)
            stds.append(std)
            top = max(top, mean + std)
            if e in log.epoch_times and log.iterations_per_epoch:
                # The app's wall time per iteration includes data loading and
                # sample saving that the iteration timer leaves out.
                wall = log.epoch_times[e] / log.iterations_per_epoch
                top = max(top, wall)
                ax.plot(xs[-1], wall, "D", color="black", markersize=5,
                        label=None if wall_labelled else "epoch time ÷ iterations (incl. data loading)")
                wall_labelled = True
        if xs:
            ax.bar(xs, means, width=width * 0.9, yerr=stds, capsize=3, color=colors(index % 8),
                   alpha=0.9, label=f"rank {rank}")
    ax.set_xticks([e + 1 for e in epochs])
    ax.set_xticklabels([str(e + 1) for e in epochs])
    # Headroom above the tallest bar or marker keeps the legend off the data.
    ax.set_ylim(0, top * 1.4 if top > 0 else 1)
    ax.legend(fontsize=8, loc="upper center", ncol=min(4, len(ranks) + 1))


def _draw_image(ax, path: Path | None, title: str, missing: str) -> None:
    ax.set_axis_off()
    if path is None:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_title(title)
        return
    from matplotlib import image as mpimg

    try:
        ax.imshow(mpimg.imread(path), interpolation="nearest")
        ax.set_title(f"{title}\n{path.name}", fontsize=10)
    except (OSError, ValueError, SyntaxError) as exc:
        # A grid still being written by the app is truncated: say so, don't crash.
        ax.text(0.5, 0.5, f"cannot read {path.name}: {exc}", ha="center", va="center",
                transform=ax.transAxes, color="red", wrap=True)
        ax.set_title(title)


def draw_report(logs: dict[int, RankLog], data: dict, folder: Path, out_path: Path) -> None:
    """Write the report figure to ``out_path`` (PNG, Agg, no display needed)."""
    # Lazy: matplotlib costs ~0.5 s to import, and dcgan_logs users (the live
    # progress display) never draw.
    from matplotlib.figure import Figure

    fake = find_last_samples(folder, "fake")
    real = _matching_real(fake) if fake is not None else find_last_samples(folder, "real")

    # Margins fixed by hand: a layout engine would measure every label first (a third of the drawing time).
    fig = Figure(figsize=(15, 10), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.5, 1], height_ratios=[1, 1], left=0.05, right=0.985,
                            bottom=0.02, top=0.9, wspace=0.14, hspace=0.3)
    _draw_losses(fig.add_subplot(grid[0, 0]), logs)
    _draw_iteration_times(fig.add_subplot(grid[0, 1]), logs)
    _draw_image(fig.add_subplot(grid[1, 0]), fake, "Last generated samples (fixed noise)",
                "no fake_samples_*.png found")
    _draw_image(fig.add_subplot(grid[1, 1]), real, "Real samples of the same step",
                "no real_samples_*.png found")

    state = _state_words(data, "finished", "FAILED rank(s) ", "not finished")
    done = min((r["epochs_completed"] for r in data["ranks"]), default=0)
    title = (
        f"DCGAN run {folder.resolve().name}: {len(data['ranks'])} rank(s), "
        f"{done}/{data['num_epochs'] or '?'} epochs, {state}; "
        f"training time {format_duration(data['training_seconds'])} "
        f"({data['training_seconds']:.1f} s, slowest rank)"
    )
    # The first failure's cause on the picture itself: a report.png shared alone
    # should still say why the run failed.
    failed = [r for r in data["ranks"] if r["status"] == "failed" and r["error"]]
    if failed:
        error = failed[0]["error"]
        error = error if len(error) <= 110 else error[:107] + "..."
        title += f"\nrank {failed[0]['rank']}: {error}"
    fig.suptitle(
        title,
        fontsize=14,
        color="firebrick" if data["failed_ranks"] else "black",
    )
    fig.savefig(out_path, format="png")


def newest_run() -> Path:
    import config

    runs = sorted(config.load_settings().results_dir.glob("run-*"))
    if not runs:
        raise SystemExit("report: no fetched run in RESULTS_DIR: `make results` fetches one, or give RUN=<folder>.")
    return runs[-1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description=(
            "Summarise a Distributed-DCGAN run folder: reads output-<rank>.txt and the "
            f"sample PNGs, writes {SUMMARY_JSON}, {SUMMARY_MD} and {REPORT_PNG} into it "
            "(and touches nothing else)."
        ),
    )
    parser.add_argument("run_folder", metavar="RUN_FOLDER", type=Path, nargs="?",
                        help="folder holding the ranks' output-<rank>.txt logs (default: the newest run "
                             "in RESULTS_DIR)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder: Path = args.run_folder or newest_run()
    if not folder.is_dir():
        print(f"report: {folder}: not a directory (expected a run folder with output-<rank>.txt logs)",
              file=sys.stderr)
        return 1
    logs = parse_run_folder(folder)
    if not logs:
        print(f"report: {folder}: no output-<rank>.txt rank logs found, nothing to report", file=sys.stderr)
        return 1

    data = summary(logs)
    fake = find_last_samples(folder, "fake")
    data["last_fake_samples"] = fake.relative_to(folder).as_posix() if fake is not None else None

    json_path, md_path, png_path = folder / SUMMARY_JSON, folder / SUMMARY_MD, folder / REPORT_PNG
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(render_summary_md(data, folder.resolve().name), encoding="utf-8")
    draw_report(logs, data, folder, png_path)
    print(f"report: wrote {json_path}, {md_path}, {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
