"""make bench: what each step costs on the local cluster, for 2, 4 and 8 nodes.

Each step runs as `make` runs it (one Python process per step), on its own nodes.json,
subnet and CLAP records, so a cluster of yours is not touched. Each figure is the
median of --repeat rounds. `run` overhead = the step's wall time minus the app's own
training time read from its logs. The floor: the same playbook played directly by
`ansible-playbook` on the inventory CLAP builds, with the same Ansible settings.
Writes bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import dcgan_logs


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[-1:])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def step(name: str, env: dict[str, str], *args: str) -> float:
    return timed([sys.executable, str(common.ROOT / "scripts" / f"{name}.py"), *args], env)


def floor(settings: common.Settings, state: dict, action: str, run_id: str, work: Path) -> float:
    """The same action played by ansible-playbook directly, on the inventory CLAP builds."""
    common.import_clap(settings)
    from clap.executor import AnsiblePlaybookExecutor

    handles = common.clap(settings, state)
    ids = common.node_ids(state) if action != "results" else common.node_ids(state)[:1]
    inventory = AnsiblePlaybookExecutor.create_inventory(
        {common.ROLE: handles.node_manager.get_nodes_by_id(ids)}, str(settings.clap_path / "private"),
        node_vars=common.node_vars(state))
    (work / "inventory.json").write_text(json.dumps(inventory))
    (work / "extra.json").write_text(json.dumps(common.role_vars(settings, state, action, run_id)))
    playbook = settings.clap_path / "roles" / "roles" / f"dcgan_{action}.yaml"
    return timed([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(work / "inventory.json"),
                  "-e", f"@{work / 'extra.json'}", str(playbook)], {**os.environ, **common.ansible_env(settings)})


def one_round(nodes: int, base_env: dict[str, str], work: Path) -> dict[str, float]:
    env = {**base_env, "NODES": str(nodes)}
    settings = common.load_settings(env)
    times = {"up": step("up", env), "setup": step("setup", env), "setup again": step("setup", env)}
    state = common.read_state(settings)
    times["floor: setup again"] = floor(settings, state, "setup", "", work)

    times["run"] = step("run", env)
    state = common.read_state(settings)
    run_id = state["runs"][-1]["id"]
    run_dir = Path(common.run_folder(settings, run_id))
    logs = dcgan_logs.parse_run_folder(run_dir)
    times["training (app's own)"] = dcgan_logs.summary(logs)["training_seconds"]
    times["run overhead"] = times["run"] - times["training (app's own)"]
    samples = sorted(run_dir.glob("*.png"))
    for n in range(200 - len(list(run_dir.iterdir()))):  # as many files as a long run of the real app leaves
        shutil.copy(samples[n % len(samples)], run_dir / f"extra_{n:03d}.png")
    times["results (200 files)"] = step("results", env, "--no-report")  # the same work as the floor's
    times["report"] = step("report", env, str(settings.results_dir / run_id))
    shutil.rmtree(settings.results_dir / run_id)  # the floor fetches the same run to the same place
    times["floor: results"] = floor(settings, state, "results", run_id, work)
    times["status"] = step("status", env)
    times["down"] = step("down", env)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=common.ROOT / "bench" / "results.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: the local cluster needs root.")

    medians: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dcgan-bench-") as tmp:
        work = Path(tmp)
        clap_path = work / "clap_config"
        shutil.copytree(common.ROOT / "clap_config", clap_path, ignore=shutil.ignore_patterns("storage", "private"))
        (clap_path / "storage").mkdir()
        (clap_path / "private").mkdir()
        env = {**os.environ, "ENV_FILE": os.devnull, "CLAP_PATH": str(clap_path),
               "NODES_FILE": str(work / "nodes.json"), "RESULTS_DIR": str(work / "results"),
               "EFS_MOUNT_POINT": str(work / "efs"), "LOCAL_SUBNET": "10.213.240.0/24", "NO_COLOR": "1"}
        for nodes in args.nodes:
            rounds = []
            for number in range(args.repeat):
                print(f"bench: {nodes} nodes, round {number + 1}/{args.repeat}", flush=True)
                try:
                    rounds.append(one_round(nodes, env, work))
                finally:
                    subprocess.run([sys.executable, str(common.ROOT / "scripts" / "down.py")], env=env,
                                   capture_output=True)
            medians[nodes] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(medians, args.repeat))
    print(args.out.read_text())
    return 0


def table(medians: dict[int, dict[str, float]], repeat: int) -> str:
    counts = sorted(medians)
    keys = list(medians[counts[0]])
    lines = [
        f"# Step costs on the local cluster ({os.cpu_count()} cores, {time.strftime('%Y-%m-%d')})",
        "",
        f"Median wall seconds of {repeat} rounds, demo app, 2 epochs on the synthetic set; "
        "`make bench` writes this file. Ratios are within this run.",
        "",
        "| step | " + " | ".join(f"{n} nodes" for n in counts) + f" | {counts[-1]} / {counts[0]} nodes |",
        "|---|" + "---:|" * (len(counts) + 1),
    ]
    for key in keys:
        values = [medians[n][key] for n in counts]
        ratio = f"{values[-1] / values[0]:.2f}x" if values[0] > 0 else "-"
        lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {ratio} |")
    lines += ["", "| scripts + CLAP / direct ansible-playbook | " + " | ".join(f"{n} nodes" for n in counts) + " |",
              "|---|" + "---:|" * len(counts)]
    for action, floor_key in (("setup again", "floor: setup again"), ("results (200 files)", "floor: results")):
        lines.append(f"| {action} | " + " | ".join(
            f"{medians[n][action] / medians[n][floor_key]:.2f}x" for n in counts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    common.main_guard(main)
