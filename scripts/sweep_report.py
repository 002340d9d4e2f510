"""What `make sweep` writes beside sweep.json: sweep.md and sweep.png, and the point to pick for a
DEADLINE or a BUDGET.

Measured points (full runs) and predicted ones (from a sample, scripts/predict.py) are kept apart:
tables of their own in sweep.md, filled against hollow markers and solid against dashed lines in
sweep.png.
"""

from __future__ import annotations

import os
from pathlib import Path

import config
import predict

SHARED_CORES = "All hosts share this machine's {cores} cores: the speed-up shows the orchestration, not the cloud."


def write(settings: config.Settings, folder: Path, record: dict, burstable: list[str]) -> None:
    rows, predicted = derived(record), predicted_rows(record)
    notes = []
    if settings.provider == "local" and not settings.ssh_hosts:
        notes.append(SHARED_CORES.format(cores=os.cpu_count()))
    if burstable:
        notes.append(burstable_note(burstable))
    pick = recommendation(settings, record)
    text = table(record["plan"], rows, " ".join(notes)) + predicted_table(record["plan"], predicted) \
        + validation(record) + (f"\n{pick['line']}\n" if pick else "")
    (folder / "sweep.md").write_text(text)
    plot(rows, "\n".join(notes), folder / "sweep.png", predicted, pick)


def burstable_note(kinds: list[str]) -> str:
    return (f"{', '.join(kinds)} {'is a burstable type' if len(kinds) == 1 else 'are burstable types'} (T-type): "
            f"it runs on CPU credits, fast while they last and throttled once they are spent, so a sample's first "
            f"minutes can be faster than a long run: do not trust its predictions beyond the credits.")


def derived(record: dict) -> list[dict]:
    """Every point run in full, with speed-up and efficiency against the smallest size of its type,
    and cost per epoch (kept in its record)."""
    rows = sorted((p for p in record["points"].values() if "state" in p), key=lambda p: (p["type"], p["size"]))
    for row in rows:
        base = next((p for p in rows if p["type"] == row["type"] and p.get("epoch_s")), None)
        if row.get("epoch_s") and base:
            row["speedup"] = base["epoch_s"] / row["epoch_s"]
            row["efficiency"] = row["speedup"] * base["size"] / row["size"]
        if row.get("cost_usd") is not None and row.get("epoch_s") and row.get("wall_seconds"):
            row["cost_per_epoch_usd"] = row["cost_usd"] * row["epoch_s"] / row["wall_seconds"]
    return rows


def predicted_rows(record: dict) -> list[dict]:
    """Every sampled point: its sample, and what the sample predicts of the full run (with a speed-up
    against the smallest predicted size of its type)."""
    rows = []
    for p in sorted(record["points"].values(), key=lambda p: (p["type"], p["size"])):
        if "sample" in p:
            rows.append({"type": p["type"], "size": p["size"], **p["sample"], **p["sample"].get("prediction", {})})
    for row in rows:
        base = next((r for r in rows if r["type"] == row["type"] and r.get("epoch_s")), None)
        if row.get("epoch_s") and base:
            row["speedup"] = base["epoch_s"] / row["epoch_s"]
    return rows


def _num(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def _span(low: float | None, high: float | None, form: str) -> str:
    return "-" if low is None or high is None else f"{low:{form}}-{high:{form}}"


def table(plan: dict, rows: list[dict], note: str) -> str:
    """The title, the note, and the points run in full."""
    lines = [f"# Sweep: {plan['epochs']} epochs, sizes {', '.join(map(str, plan['sizes']))}"
             + (f"; every point predicted from a sample of {plan['sample_iterations']} iterations past the first"
                if plan.get("sample_iterations") else ""), ""]
    lines += [note, ""] if note else []
    if rows and plan.get("sample_iterations"):
        lines += ["## Measured: full runs", ""]
    if rows:
        lines += ["| type | nodes | state | run | first epoch s | epoch s | images/s | speed-up | efficiency "
                  "| wall s | cost $ | $ per epoch |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['type']} | {row['size']} | {row['state']} | {row.get('run_id', '-')} | "
                     f"{_num(row.get('first_epoch_s'), '.2f')} | {_num(row.get('epoch_s'), '.2f')} | "
                     f"{_num(row.get('images_per_s'), '.1f')} | {_num(row.get('speedup'), '.2f')} | "
                     f"{_num(row.get('efficiency'), '.0%')} | {_num(row.get('wall_seconds'), '.1f')} | "
                     f"{_num(row.get('cost_usd'), '.4f')} | {_num(row.get('cost_per_epoch_usd'), '.5f')} |")
    failed = [row for row in rows if row["state"] != "done"]
    lines += [""] + [f"- {row['type']}/{row['size']} failed: {row.get('reason', '?')}" for row in failed]
    return "\n".join(lines).rstrip() + "\n"


def predicted_table(plan: dict, rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["", f"## Predicted from a sample of {plan['sample_iterations']} iterations past the first", "",
             "The sample's own run (sample s, sample $), then what it predicts of the full run: the time to the first "
             "iteration, seconds per iteration (the slowest rank's), per epoch and for the whole run, with the "
             "interval of the sample's faster to slower iterations (scripts/predict.py says how).", "",
             "| type | nodes | state | sample run | sample s | sample $ | first iteration s | s per iteration "
             "| epoch s | speed-up | wall s | interval s | cost $ | interval $ |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for row in rows:
        timing = row.get("timing", {})
        lines.append(f"| {row['type']} | {row['size']} | {row['state']} | {row.get('run_id', '-')} | "
                     f"{_num(row.get('wall_seconds'), '.1f')} | {_num(row.get('sample_cost_usd'), '.4f')} | "
                     f"{_num(row.get('first_iteration_s'), '.1f')} | {_num(timing.get('step'), '.3f')} | "
                     f"{_num(row.get('epoch_s'), '.2f')} | {_num(row.get('speedup'), '.2f')} | "
                     f"{_num(row.get('wall_s'), '.1f')} | {_span(row.get('wall_low_s'), row.get('wall_high_s'), '.1f')}"
                     f" | {_num(row.get('cost_usd'), '.4f')} | "
                     f"{_span(row.get('cost_low_usd'), row.get('cost_high_usd'), '.4f')} |")
    lines.append("")
    for row in rows:
        if row["state"] != "done":
            lines.append(f"- {row['type']}/{row['size']}: the sample failed: {row.get('reason', '?')}")
        elif row.get("whole_run"):
            lines.append(f"- {row['type']}/{row['size']}: the sample was the whole run (it has fewer iterations): "
                         f"measured, not predicted")
    return "\n".join(lines).rstrip() + "\n"


def compared(record: dict) -> list[tuple[dict, dict]]:
    """The points both predicted and measured: (point, its prediction)."""
    return [(p, p["sample"]["prediction"]) for p in sorted(record["points"].values(), key=lambda p: (p["type"],
                                                                                                     p["size"]))
            if p.get("state") == "done" and p.get("wall_seconds") and "prediction" in p.get("sample", {})]


def validation(record: dict) -> str:
    """Predicted against measured, point by point and term by term; the errors of the wall time; and
    what the samples cost against the full runs."""
    pairs = compared(record)
    if not pairs:
        return ""
    lines = ["", "## Predicted against measured", "",
             "Each term as the full run's own clock shows it (predicted / measured); the error is the wall "
             "time's, (predicted - measured) / measured.", "",
             "| type | nodes | wall s predicted | interval s | measured | error | inside | first iteration s "
             "| s per iteration | epoch s | end s | load sample / full |",
             "|---|---:|---:|---|---:|---:|---|---|---|---|---|---|"]
    for p, predicted in pairs:
        measured, timing = p["wall_seconds"], p.get("timing", {})
        sampled = p["sample"]["timing"]
        inside = predicted["wall_low_s"] <= measured <= predicted["wall_high_s"]
        lines.append(f"| {p['type']} | {p['size']} | {predicted['wall_s']:.1f} | "
                     f"{_span(predicted['wall_low_s'], predicted['wall_high_s'], '.1f')} | {measured:.1f} | "
                     f"{(predicted['wall_s'] - measured) / measured:+.1%} | {'yes' if inside else 'NO'} | "
                     f"{predicted['first_iteration_s']:.1f} / {_num(timing.get('first'), '.1f')} | "
                     f"{sampled['step']:.3f} / {_num(timing.get('step'), '.3f')} | "
                     f"{predicted['epoch_s']:.2f} / {_num(p.get('epoch_s'), '.2f')} | "
                     f"{predicted['end_s']:.1f} / {_num(timing.get('end'), '.1f')} | "
                     f"{_span(*_ends(p['sample'].get('load')), '.1f')} / {_span(*_ends(p.get('load')), '.1f')} |")
    lines += ["", error_line(record), "", own_cost([p for p, _ in pairs])]
    return "\n".join(lines).rstrip() + "\n"


def _ends(load: list[float] | None) -> tuple[float | None, float | None]:
    return (min(load), max(load)) if load else (None, None)


def error_line(record: dict) -> str:
    """The prediction's score over the points both predicted and measured, with this machine's load
    meanwhile (local nodes share its cores); empty when there are none."""
    pairs = compared(record)
    if not pairs:
        return ""
    stats = predict.errors([(predicted, p["wall_seconds"]) for p, predicted in pairs])
    worst = max(zip(stats["errors"], pairs, strict=True), key=lambda pair: abs(pair[0]))[1][0]
    loads = [value for p, _ in pairs for run in (p, p["sample"]) for value in run.get("load", [])]
    return (f"Predicted wall time against measured: median absolute error {stats['median_abs']:.1%}, largest "
            f"{stats['largest_abs']:.1%} ({worst['type']}/{worst['size']}); {stats['inside']} of {stats['of']} "
            f"measured runs inside their interval"
            + (f"; this machine's load average (1 min) {min(loads):.1f}-{max(loads):.1f} at the runs' starts and ends"
               if loads else "") + ".")


def own_cost(points: list[dict]) -> str:
    """What the samples cost against the full runs of the same points: the runs alone, and as whole
    sweeps (each point's growth and setup, its run and fetch; the final `make down` left out); on AWS
    in dollars too, at each point's hourly price."""
    samples = [p["sample"] for p in points]
    runs = [sum(sample["wall_seconds"] for sample in samples), sum(p["wall_seconds"] for p in points)]
    sweeps = [[p.get("setup_seconds", 0) + part.get("seconds", 0) for p, part in zip(points, parts, strict=True)]
              for parts in (samples, points)]  # per point, for the samples and for the full runs
    text = (f"The samples' own cost: their runs took {runs[0]:.1f} s against {runs[1]:.1f} s for the same points' "
            f"full runs ({runs[0] / runs[1]:.0%}); as whole sweeps (each point's nodes started and set up, its "
            f"run and fetch) {sum(sweeps[0]):.1f} s against {sum(sweeps[1]):.1f} s "
            f"({sum(sweeps[0]) / sum(sweeps[1]):.0%})")
    if all("hourly_usd" in p for p in points):
        dollars = [sum(p["hourly_usd"] * seconds for p, seconds in zip(points, each, strict=True)) / 3600
                   for each in sweeps]
        text += f", ${dollars[0]:.4f} against ${dollars[1]:.4f} on AWS"
    text += "."
    timed = [p for p in points if "first" in p.get("timing", {})]
    if timed:  # why the share is what it is: the part of a run that no sample can leave out
        fixed = sum(p["timing"]["first"] + p["timing"]["end"] for p in timed)
        total = sum(p["wall_seconds"] for p in timed)
        text += (f" A sample pays its run's start (to the first iteration) and end in full: in the full runs they "
                 f"took {fixed:.1f} s of {total:.1f} s ({fixed / total:.0%}), so sampling saves most on runs that "
                 f"are long against their start.")
    return text


def figures(record: dict) -> list[dict]:
    """Per point the figures a choice rests on: measured where it ran in full, else predicted (its
    worst case the top of its interval)."""
    found = []
    for key, p in sorted(record["points"].items()):
        prediction = p.get("sample", {}).get("prediction")
        if p.get("state") == "done" and p.get("wall_seconds"):
            wall, top, cost, cost_top, how = p["wall_seconds"], p["wall_seconds"], p.get("cost_usd"), \
                p.get("cost_usd"), "measured"
        elif prediction and p["sample"]["state"] == "done":
            wall, top, cost, cost_top, how = prediction["wall_s"], prediction["wall_high_s"], \
                prediction.get("cost_usd"), prediction.get("cost_high_usd"), "predicted"
        else:
            continue
        found.append({"key": key, "type": p["type"], "size": p["size"], "wall": wall, "top": top, "cost": cost,
                      "cost_top": cost_top, "how": how, "node_hours": p["size"] * wall / 3600})
    return found


def recommendation(settings: config.Settings, record: dict) -> dict | None:
    """DEADLINE: the cheapest point whose run meets it; BUDGET: the fastest whose run fits it; both: the
    cheapest that meets the one within the other. Cheapest by cost on AWS; locally, where runs cost
    nothing, by nodes x hours. A predicted point is held to the top of its interval."""
    if settings.deadline_minutes is None and settings.budget_usd is None:
        return None
    local = settings.provider != "aws"
    asked = " ".join(([f"DEADLINE={settings.deadline_minutes:g} min"] if settings.deadline_minutes is not None
                      else []) + ([f"BUDGET=${settings.budget_usd:g}"] if settings.budget_usd is not None else []))
    candidates = figures(record)
    if not candidates:
        return {"line": f"{asked}: no point has a measured or predicted figure yet.", "key": None}
    fits = [f for f in candidates
            if (settings.deadline_minutes is None or f["top"] <= settings.deadline_minutes * 60)
            and (settings.budget_usd is None or local or (f["cost_top"] or 0) <= settings.budget_usd)]
    cheapest = settings.deadline_minutes is not None

    def rank(f: dict) -> tuple[float, float]:
        return (f["node_hours"] if local else f["cost"] or 0, f["wall"]) if cheapest else (f["wall"], f["cost"] or 0)

    wanted = ("the cheapest that meets it" + (" within the budget" if settings.budget_usd is not None else "")
              if cheapest else "the fastest that fits it")
    basis = ("ranked by nodes x hours, as local runs cost nothing" if local and cheapest
             else "local runs cost nothing, so every point fits" if local else "ranked by cost")
    if not fits:
        fastest = min(candidates, key=lambda f: f["wall"])
        return {"line": f"{asked}: no point fits; the fastest, {fastest['size']} {fastest['type']} nodes, takes "
                        f"{_described(fastest, local)}.", "key": None}
    best = min(fits, key=rank)
    return {"line": f"{asked}: {best['size']} {best['type']} nodes, {wanted}: {_described(best, local)} ({basis}; "
                    f"measured figures where a point ran in full, else predicted, held to the top of the interval).",
            "key": best["key"], "type": best["type"], "size": best["size"], "wall": best["wall"]}


def _described(figure: dict, local: bool) -> str:
    wall = f"{figure['wall'] / 60:.1f} min {figure['how']}" + (
        f" (up to {figure['top'] / 60:.1f})" if figure["how"] == "predicted" else "")
    price = f"{figure['node_hours']:.3f} node-hours" if local else f"${figure['cost'] or 0:.4f}"
    return f"{wall}, {price}"


def cheapest_for_speed(rows: list[dict]) -> list[dict]:
    """Points no other point beats on both cost per epoch and time per epoch."""
    priced = [r for r in rows if r.get("cost_per_epoch_usd") is not None and r.get("epoch_s")]
    return [r for r in priced if not any(o is not r and o["cost_per_epoch_usd"] <= r["cost_per_epoch_usd"]
                                         and o["epoch_s"] <= r["epoch_s"] for o in priced)]


def plot(rows: list[dict], note: str, path: Path, predicted: list[dict] | None = None,
         pick: dict | None = None) -> None:
    """Time per epoch, speed-up, cost per epoch against time per epoch, and the run's wall time: measured
    points filled on solid lines, predicted ones hollow on dashed lines (the wall time with its interval);
    the point a DEADLINE or BUDGET picks ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = [r for r in predicted or [] if r.get("wall_s")]
    figure, (times, speedups, costs, walls) = plt.subplots(1, 4, figsize=(20, 4.5))
    for kind in sorted({r["type"] for r in rows} | {r["type"] for r in predicted}):
        measured = [r for r in rows if r["type"] == kind and r.get("speedup")]
        sizes = [r["size"] for r in measured]
        times.plot(sizes, [r["epoch_s"] for r in measured], "o-", label=kind)
        speedups.plot(sizes, [r["speedup"] for r in measured], "o-", label=kind)
        walls.plot(sizes, [r["wall_seconds"] for r in measured], "o-", label=f"{kind} measured")
        guessed = [r for r in predicted if r["type"] == kind]
        guessed_sizes = [r["size"] for r in guessed]
        if guessed:
            hollow = {"markerfacecolor": "none", "linestyle": "--", "marker": "o"}
            times.plot(guessed_sizes, [r["epoch_s"] for r in guessed], label=f"{kind} predicted", **hollow)
            speedups.plot(guessed_sizes, [r.get("speedup") for r in guessed], label=f"{kind} predicted", **hollow)
            walls.errorbar(guessed_sizes, [r["wall_s"] for r in guessed], capsize=4, label=f"{kind} predicted",
                           yerr=[[r["wall_s"] - r["wall_low_s"] for r in guessed],
                                 [r["wall_high_s"] - r["wall_s"] for r in guessed]], **hollow)
        every = sorted(set(sizes) | set(guessed_sizes))
        if every:
            speedups.plot(every, [s / every[0] for s in every], "k:", label=f"ideal ({kind})")
        priced = [r for r in measured if r.get("cost_per_epoch_usd") is not None]
        if priced:
            costs.plot([r["epoch_s"] for r in priced], [r["cost_per_epoch_usd"] for r in priced], "o", label=kind)
        for r in priced:
            costs.annotate(str(r["size"]), (r["epoch_s"], r["cost_per_epoch_usd"]))
        priced = [r for r in guessed if r.get("cost_usd") is not None]
        if priced:
            costs.plot([r["epoch_s"] for r in priced], [r["cost_usd"] * r["epoch_s"] / r["wall_s"] for r in priced],
                       "o", markerfacecolor="none", label=f"{kind} predicted")
    best = cheapest_for_speed(rows)
    if best:
        costs.plot([r["epoch_s"] for r in best], [r["cost_per_epoch_usd"] for r in best], "r*", markersize=14,
                   label="cheapest for its speed")
    elif not any(r.get("cost_usd") is not None for r in predicted):
        costs.text(0.5, 0.5, "no cost on the local cluster", ha="center", transform=costs.transAxes)
    if pick and pick.get("key"):
        walls.plot([pick["size"]], [pick["wall"]], "o", markersize=22, markerfacecolor="none", markeredgecolor="red",
                   markeredgewidth=2, label="the pick: " + pick["line"].split(":")[0])
    for axes, title, xlabel, ylabel in (
            (times, "time per epoch", "nodes", "seconds"), (speedups, "speed-up", "nodes", "x smallest size"),
            (costs, "cost per epoch vs time per epoch", "seconds per epoch", "USD per epoch"),
            (walls, "run's wall time", "nodes", "seconds")):
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
        axes.grid(alpha=0.3)
        if xlabel == "nodes":
            axes.xaxis.get_major_locator().set_params(integer=True)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    if note:
        figure.suptitle(note, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.05 * (note.count("\n") + 1)) if note else None)
    figure.savefig(path, dpi=90)
    plt.close(figure)
