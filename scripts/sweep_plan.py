"""What a sweep is before it runs: its points (every size of SIZES for every type of INSTANCE_TYPES),
its id (a hash of the plan, so `make sweep` again finds its record), which parts each point still
needs (a sample, a full run), what the rest may cost on AWS, and the DRY_RUN=1 print of it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from pathlib import Path

import aws_nodes
import config
import sweep_report
from output import UserError

# T-type instances (t2, t3, t3a, t4g) run on CPU credits: fast while the credits last, slow after.
BURSTABLE = re.compile(r"t\d+[a-z]*\.")

def points_to_run(settings: config.Settings, record: dict) -> list[tuple[str, int]]:
    return [(kind, size) for kind in settings.instance_types for size in settings.sizes
            if parts_to_run(settings, point(record, kind, size))]


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


def plan(settings: config.Settings) -> dict:
    """What makes two sweeps the same experiment. VALIDATE adds full runs to a sampled sweep (the same
    sweep), DEADLINE and BUDGET only read it."""
    plan = {"provider": settings.provider, "instance_types": settings.instance_types, "sizes": settings.sizes,
            "epochs": settings.epochs, "app": settings.dcgan_dir, "app_args": settings.app_args,
            "data": settings.cifar_data_dir,
            "synthetic_images": settings.synthetic_images if settings.synthetic_data else None}
    if settings.sample_iterations:  # absent otherwise: a full sweep keeps the id it had before samples existed
        plan["sample_iterations"] = settings.sample_iterations
    return plan


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
    """A point's record: the full run's figures at the top (state, run_id, wall_seconds, ...), the
    sample's under "sample"."""
    return record["points"].get(f"{kind}/{size}", {})


def parts_to_run(settings: config.Settings, done: dict) -> list[str]:
    """What a point still needs: its sample (SAMPLE_ITERATIONS), its full run (no sample, or VALIDATE)."""
    parts = []
    if settings.sample_iterations and done.get("sample", {}).get("state") != "done":
        parts.append("sample")
    if (not settings.sample_iterations or settings.validate) and done.get("state") != "done":
        parts.append("full")
    return parts


def runs_to_do(settings: config.Settings, record: dict, todo: list[tuple[str, int]]) -> int:
    return sum(len(parts_to_run(settings, point(record, kind, size))) for kind, size in todo)


def cost_ceiling(settings: config.Settings, per_type: dict, record: dict,
                 todo: list[tuple[str, int]]) -> float | None:
    """On AWS: every run still to do (a sample too) billed for RUN_TIMEOUT."""
    if settings.provider != "aws":
        return None
    hourly = [(aws_nodes.hourly_cost(per_type[kind], size), len(parts_to_run(settings, point(record, kind, size))))
              for kind, size in todo]
    if any(price is None for price, _ in hourly):
        raise UserError("a type of INSTANCE_TYPES has no price in clap_config/prices.yaml: add it there.")
    return sum(price * runs for price, runs in hourly) * settings.run_timeout / 3600


def show_plan(settings: config.Settings, record: dict, todo: list[tuple[str, int]], ceiling: float | None,
              folder: Path, burstable: list[str]) -> None:
    sample = f"a sample of {settings.sample_iterations} iterations past the first per point" \
        + (", and each in full (VALIDATE)" if settings.validate else "") if settings.sample_iterations else ""
    print(f"DRY RUN: sweep {folder.name}: {settings.epochs} epochs per run{', ' + sample if sample else ''}, "
          f"{len(todo)} of {len(settings.sizes) * len(settings.instance_types)} points to run")
    nodes = 0
    for number, (kind, size) in enumerate(todo, start=1):
        nodes = 0 if number > 1 and todo[number - 2][0] != kind else nodes
        parts = parts_to_run(settings, point(record, kind, size))
        print(f"  point {number} of {len(todo)}: {kind}, {size} nodes (ranks 0..{size - 1}); "
              f"starts {max(0, size - nodes)} nodes" + ("" if parts == ["full"] else f"; runs: {' then '.join(parts)}"))
        nodes = max(nodes, size)
    for key, done in record["points"].items():
        if not parts_to_run(settings, done):
            runs = [run_id for run_id in (done.get("sample", {}).get("run_id"), done.get("run_id")) if run_id]
            print(f"  done before: {key} (run {', '.join(runs)})")
    if ceiling is not None:
        verdict = "within" if ceiling <= settings.max_sweep_cost else "ABOVE: `make sweep` refuses it, over"
        print(f"  cost ceiling ${ceiling:.2f} (every run at RUN_TIMEOUT={settings.run_timeout} s), {verdict} "
              f"MAX_SWEEP_COST={settings.max_sweep_cost:g}")
    if burstable:
        print(f"  {sweep_report.burstable_note(burstable)}")
    print("  then `make down`. Nothing was started or written.")
