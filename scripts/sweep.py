"""make sweep: the same experiment on every cluster size of SIZES (and, on AWS, every INSTANCE_TYPES).

Per type the cluster grows from the smallest size to the next (setup only on the new
nodes); the run of size k trains on ranks 0..k-1. Every run is fetched as `make results`
does; RESULTS_DIR/sweep-<id>/ gets sweep.json, sweep.md and sweep.png. The id is a hash of
the plan, so `make sweep` again resumes: points done are not run twice, failed ones are.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import statistics
from pathlib import Path

import aws_nodes
import checks
import clap_configs
import cluster_state
import config
import dcgan_logs
import down
import output
import results
import run
import setup
import up
from output import UserError

SHARED_CORES = "All hosts share this machine's {cores} cores: the speed-up shows the orchestration, not the cloud."


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    per_type = {kind: type_settings(kind) for kind in settings.instance_types}
    for typed in per_type.values():
        try:
            clap_configs.check_configs(typed)
        except UserError as error:
            raise UserError(f"INSTANCE_TYPES={','.join(settings.instance_types)}: {error}") from None
        check_size(typed, settings.sizes[-1])
    plan = sweep_plan(settings)
    folder = settings.results_dir / f"sweep-{sweep_id(plan)}"
    record = read_record(folder, plan)
    todo = [(kind, size) for kind in settings.instance_types for size in settings.sizes
            if point(record, kind, size).get("state") != "done"]
    ceiling = cost_ceiling(settings, per_type, todo)
    if settings.dry_run:
        show_plan(settings, record, todo, ceiling, folder)
        return 0
    if ceiling is not None and ceiling > settings.max_sweep_cost:
        raise UserError(f"the sweep's cost ceiling is ${ceiling:.2f} ({len(todo)} runs at RUN_TIMEOUT="
                        f"{settings.run_timeout} s), above MAX_SWEEP_COST={settings.max_sweep_cost:g}: fewer "
                        f"SIZES or INSTANCE_TYPES, a lower RUN_TIMEOUT, or a higher MAX_SWEEP_COST.")
    if todo:
        state = cluster_state.read_state(settings)
        if state and state.get("nodes"):
            raise UserError(f"{settings.nodes_file.name} lists a cluster of {len(state['nodes'])} nodes: "
                            f"`make down` first (the sweep starts its own nodes).")
        checks.preflight(settings)
    folder.mkdir(parents=True, exist_ok=True)
    for number, (kind, size) in enumerate(todo, start=1):
        if number > 1 and todo[number - 2][0] != kind and down.main([]) != 0:
            raise UserError("`make down` failed between two instance types: run `make down`, then `make sweep`.")
        output.say(f"point {number} of {len(todo)}: {size} {kind} nodes")
        record["points"][f"{kind}/{size}"] = run_point(settings, per_type[kind], kind, size, number, len(todo))
        write_outputs(settings, folder, record)
    if todo and down.main([]) != 0:
        raise UserError("`make down` failed at the end of the sweep: run `make down` again.")
    write_outputs(settings, folder, record)
    failed = [key for key, p in record["points"].items() if p["state"] != "done"]
    output.say(f"sweep in {folder}: {len(record['points']) - len(failed)} points done"
               + (f", failed: {', '.join(failed)}; `make sweep` again redoes them." if failed else "."))
    return 1 if failed else 0


def type_settings(kind: str) -> config.Settings:
    return config.load_settings({**os.environ, "INSTANCE_TYPE": kind})


def check_size(settings: config.Settings, size: int) -> None:
    """The largest size is one `make up` can start."""
    if settings.provider == "local" and settings.ssh_hosts:
        room, where = len(settings.ssh_hosts), "SSH_HOSTS lists"
    elif settings.provider == "local":
        room, where = ipaddress.ip_network(settings.local_subnet).num_addresses - 3, "LOCAL_SUBNET has room for"
    else:
        return
    if size > room:
        raise UserError(f"SIZES asks for {size} nodes but {where} {room}: lower SIZES.")


def sweep_plan(settings: config.Settings) -> dict:
    """What makes two sweeps the same experiment."""
    return {"provider": settings.provider, "instance_types": settings.instance_types, "sizes": settings.sizes,
            "epochs": settings.epochs, "app": settings.dcgan_dir, "app_args": settings.app_args,
            "data": settings.cifar_data_dir,
            "synthetic_images": settings.synthetic_images if settings.synthetic_data else None}


def sweep_id(plan: dict) -> str:
    return hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:8]


def read_record(folder: Path, plan: dict) -> dict:
    path = folder / "sweep.json"
    if not path.exists():
        return {"plan": plan, "points": {}}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON): move it away; `make sweep` then runs every point "
                        f"again.") from None


def point(record: dict, kind: str, size: int) -> dict:
    return record["points"].get(f"{kind}/{size}", {})


def cost_ceiling(settings: config.Settings, per_type: dict, todo: list[tuple[str, int]]) -> float | None:
    """On AWS: every point's nodes billed for RUN_TIMEOUT."""
    if settings.provider != "aws":
        return None
    hourly = [aws_nodes.hourly_cost(per_type[kind], size) for kind, size in todo]
    if None in hourly:
        raise UserError("a type of INSTANCE_TYPES has no price in clap_config/prices.yaml: add it there.")
    return sum(hourly) * settings.run_timeout / 3600


def show_plan(settings: config.Settings, record: dict, todo: list[tuple[str, int]], ceiling: float | None,
              folder: Path) -> None:
    print(f"DRY RUN: sweep {folder.name}: {settings.epochs} epochs per run, {len(todo)} of "
          f"{len(settings.sizes) * len(settings.instance_types)} points to run")
    nodes = 0
    for number, (kind, size) in enumerate(todo, start=1):
        nodes = 0 if number > 1 and todo[number - 2][0] != kind else nodes
        print(f"  point {number} of {len(todo)}: {kind}, {size} nodes (ranks 0..{size - 1}); "
              f"starts {max(0, size - nodes)} nodes")
        nodes = max(nodes, size)
    for key, done in record["points"].items():
        if done.get("state") == "done":
            print(f"  done before: {key} (run {done['run_id']})")
    if ceiling is not None:
        verdict = "within" if ceiling <= settings.max_sweep_cost else "ABOVE: `make sweep` refuses it, over"
        print(f"  cost ceiling ${ceiling:.2f} (every run at RUN_TIMEOUT={settings.run_timeout} s), {verdict} "
              f"MAX_SWEEP_COST={settings.max_sweep_cost:g}")
    print("  then `make down`. Nothing was started or written.")


def run_point(settings: config.Settings, typed: config.Settings, kind: str, size: int, number: int,
              points: int) -> dict:
    """up (grow), setup, run on ranks 0..size-1, results: the point's record, done or failed."""
    os.environ.update({"INSTANCE_TYPE": kind, "NODES": str(size)})
    for step in (up, setup):
        if step.main([]) != 0:
            raise UserError(f"`make {step.__name__}` failed for {size} {kind} nodes: fix it, then `make sweep`.")
    state = cluster_state.read_state(settings)
    state["sweep"] = {"point": number, "of": points, "type": kind, "size": size}
    cluster_state.write_state(settings, state)
    outcome = {"type": kind, "size": size, "state": "done"}
    try:
        status = run.main(["--nodes", str(size)])
        if status == 130:
            raise KeyboardInterrupt  # Ctrl-C stops the sweep; `make down`, then `make sweep` resumes
        if status != 0:
            outcome.update(state="failed", reason=f"`make run` ended with status {status}")
    except UserError as error:
        output.warn(str(error))
        outcome.update(state="failed", reason=str(error))
    state = cluster_state.read_state(settings)
    last = state["runs"][-1]
    outcome.update(run_id=last["id"], wall_seconds=last.get("finished", 0) - last["started"])
    try:
        fetched = results.main(["--run-id", last["id"]]) == 0
    except UserError as error:  # recorded like a failed run: the other points still run
        output.warn(str(error))
        fetched = False
    if fetched:
        outcome.update(measure(settings.results_dir / last["id"]))
    else:
        outcome.update(state="failed", reason=outcome.get("reason") or f"run {last['id']} was not fetched")
    hourly = aws_nodes.hourly_cost(typed, size) if settings.provider == "aws" else None
    if hourly is not None:
        outcome["cost_usd"] = hourly * outcome["wall_seconds"] / 3600
    return outcome


def measure(folder: Path) -> dict:
    """Epoch times of the slowest rank (the run waits for it) and the images trained per second."""
    logs = dcgan_logs.parse_run_folder(folder)
    if not logs or not all(log.epoch_times for log in logs.values()):
        return {}
    first = max(log.epoch_times[min(log.epoch_times)] for log in logs.values())
    later = [statistics.mean(t for e, t in log.epoch_times.items() if e > 0) for log in logs.values()
             if len(log.epoch_times) > 1]
    epoch = max(later) if later else first
    images = sum((log.iterations_per_epoch or 0) * int(log.args.get("batch_size", 0)) for log in logs.values())
    return {"first_epoch_s": first, "epoch_s": epoch, "images_per_s": images / epoch if epoch else None}


def derived(record: dict) -> list[dict]:
    """Every point, with speed-up and efficiency against the smallest size of its type, and cost per epoch."""
    rows = sorted(record["points"].values(), key=lambda p: (p["type"], p["size"]))
    for row in rows:
        base = next((p for p in rows if p["type"] == row["type"] and p.get("epoch_s")), None)
        if row.get("epoch_s") and base:
            row["speedup"] = base["epoch_s"] / row["epoch_s"]
            row["efficiency"] = row["speedup"] * base["size"] / row["size"]
        if row.get("cost_usd") is not None and row.get("epoch_s") and row.get("wall_seconds"):
            row["cost_per_epoch_usd"] = row["cost_usd"] * row["epoch_s"] / row["wall_seconds"]
    return rows


def write_outputs(settings: config.Settings, folder: Path, record: dict) -> None:
    rows = derived(record)
    (folder / "sweep.json").write_text(json.dumps(record, indent=2))
    note = SHARED_CORES.format(cores=os.cpu_count()) if settings.provider == "local" and not settings.ssh_hosts \
        else ""
    (folder / "sweep.md").write_text(table(record["plan"], rows, note))
    plot(rows, note, folder / "sweep.png")


def table(plan: dict, rows: list[dict], note: str) -> str:
    def num(value: float | None, form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [f"# Sweep: {plan['epochs']} epochs, sizes {', '.join(map(str, plan['sizes']))}", ""]
    lines += [note, ""] if note else []
    lines += ["| type | nodes | state | run | first epoch s | epoch s | images/s | speed-up | efficiency "
              "| wall s | cost $ | $ per epoch |", "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['type']} | {row['size']} | {row['state']} | {row.get('run_id', '-')} | "
                     f"{num(row.get('first_epoch_s'), '.2f')} | {num(row.get('epoch_s'), '.2f')} | "
                     f"{num(row.get('images_per_s'), '.1f')} | {num(row.get('speedup'), '.2f')} | "
                     f"{num(row.get('efficiency'), '.0%')} | {num(row.get('wall_seconds'), '.1f')} | "
                     f"{num(row.get('cost_usd'), '.4f')} | {num(row.get('cost_per_epoch_usd'), '.5f')} |")
    failed = [row for row in rows if row["state"] != "done"]
    lines += [""] + [f"- {row['type']}/{row['size']} failed: {row.get('reason', '?')}" for row in failed]
    return "\n".join(lines).rstrip() + "\n"


def cheapest_for_speed(rows: list[dict]) -> list[dict]:
    """Points no other point beats on both cost per epoch and time per epoch."""
    priced = [r for r in rows if r.get("cost_per_epoch_usd") is not None and r.get("epoch_s")]
    return [r for r in priced if not any(o is not r and o["cost_per_epoch_usd"] <= r["cost_per_epoch_usd"]
                                         and o["epoch_s"] <= r["epoch_s"] for o in priced)]


def plot(rows: list[dict], note: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (times, speedups, costs) = plt.subplots(1, 3, figsize=(15, 4.5))
    for kind in sorted({r["type"] for r in rows}):
        measured = [r for r in rows if r["type"] == kind and r.get("speedup")]
        sizes = [r["size"] for r in measured]
        times.plot(sizes, [r["epoch_s"] for r in measured], "o-", label=kind)
        speedups.plot(sizes, [r["speedup"] for r in measured], "o-", label=kind)
        if sizes:
            speedups.plot(sizes, [s / sizes[0] for s in sizes], "k--", label=f"ideal ({kind})")
        priced = [r for r in measured if r.get("cost_per_epoch_usd") is not None]
        if priced:
            costs.plot([r["epoch_s"] for r in priced], [r["cost_per_epoch_usd"] for r in priced], "o", label=kind)
        for r in priced:
            costs.annotate(str(r["size"]), (r["epoch_s"], r["cost_per_epoch_usd"]))
    best = cheapest_for_speed(rows)
    if best:
        costs.plot([r["epoch_s"] for r in best], [r["cost_per_epoch_usd"] for r in best], "r*", markersize=14,
                   label="cheapest for its speed")
    else:
        costs.text(0.5, 0.5, "no cost on the local cluster", ha="center", transform=costs.transAxes)
    for axes, title, xlabel, ylabel in (
            (times, "time per epoch", "nodes", "seconds"), (speedups, "speed-up", "nodes", "x smallest size"),
            (costs, "cost per epoch vs time per epoch", "seconds per epoch", "USD per epoch")):
        axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
        axes.grid(alpha=0.3)
        if xlabel == "nodes":
            axes.xaxis.get_major_locator().set_params(integer=True)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    if note:
        figure.suptitle(note, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


if __name__ == "__main__":
    output.main_guard(main)
