"""make bench: what each step costs on the local cluster, for 2, 4, 8 and 16 nodes.

Each step runs as `make` runs it (one Python process per step), on its own nodes.json,
subnet and CLAP records, so a cluster of yours is not touched. Each figure is the
median of --repeat rounds. Floors, measured in the same round as the step:
  - setup and results: the same playbook played directly by `ansible-playbook` on the
    inventory CLAP builds, with the same Ansible settings;
  - run: the rank commands `DRY_RUN=1 make run` prints, started at the same moment
    straight inside each host's namespace (no SSH, Ansible, CLAP or watchdog), once before
    `make run` and once after it: the run is compared with the mean of the two.
While `make run` trains (and its floor, alike), the CPU seconds of every process on the hosts
and of `make run` itself are sampled from /proc: the machinery (watchdogs, sshd sessions and Ansible modules
on the hosts; the scripts, CLAP, ansible-playbook and ssh here) against the training's own
(torchrun and the app). Last, `make all` as a user types it, on the smallest node count.
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
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import clap_configs
import cluster
import cluster_state
import config
import dcgan_logs
import output
import role
import run_logs
from local_hosts import LocalHosts
from run import current_run

TICKS = os.sysconf("SC_CLK_TCK")
RANK_MARKERS = ("torch.distributed.run", "dist_dcgan.py")  # the training's processes; the rest is machinery
# A rank's watchdog (`python3 ... - start ... -- sh -c <rank command>`: its source on stdin) names the
# rank's command in its own arguments, yet it is machinery.
WATCHDOG_MARK = "\0-\0start\0"


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[-1:])} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.monotonic() - started


def step(name: str, env: dict[str, str], *args: str) -> float:
    return timed([sys.executable, str(config.ROOT / "scripts" / f"{name}.py"), *args], env)


def floor(settings: config.Settings, state: dict, action: str, run_id: str, work: Path) -> float:
    """The same action played by ansible-playbook directly, on the inventory CLAP builds."""
    cluster.import_clap(settings)
    from clap.executor import AnsiblePlaybookExecutor

    handles = cluster.clap(settings, state)
    ids = cluster_state.node_ids(state) if action != "results" else cluster_state.node_ids(state)[:1]
    inventory = AnsiblePlaybookExecutor.create_inventory(
        {clap_configs.ROLE: handles.node_manager.get_nodes_by_id(ids)}, str(settings.clap_path / "private"),
        node_vars=role.node_vars(state))
    (work / "inventory.json").write_text(json.dumps(inventory))
    (work / "extra.json").write_text(json.dumps(role.role_vars(settings, state, action, run_id)))
    playbook = settings.clap_path / "roles" / "roles" / f"dcgan_{action}.yaml"
    return timed([str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(work / "inventory.json"),
                  "-e", f"@{work / 'extra.json'}", str(playbook)],
                 {**os.environ, **cluster.ansible_env(settings, state)})


def floor_run(settings: config.Settings, state: dict) -> tuple[float, dict[str, float]]:
    """The rank commands of a run, started together straight inside each host's namespace;
    sampled as `make run` is, so the sampling costs the same in both."""
    run_id = f"floor-{len(state['nodes'])}-{time.monotonic_ns()}"
    extra = role.role_vars(settings, state, "run", run_id)
    folder = Path(run_logs.run_folder(settings, run_id))
    folder.mkdir(parents=True)
    namespaces = {host.address: host.namespace for host in hosts_of(settings)}
    commands = {node["rank"]: ["ip", "netns", "exec", namespaces[node["address"]], "sh", "-c",
                               role.rank_command(settings, state, extra, per_node)
                               .replace("<interface to the master>", "eth0")]
                for node, per_node in zip(state["nodes"], role.node_vars(state).values(), strict=True)}
    cpu = CpuDuringTraining(settings, lambda: folder)
    cpu.start()
    started = time.monotonic()
    ranks = []
    for rank, command in commands.items():
        with open(folder / f"output-{rank}.txt", "wb") as log:
            ranks.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
    codes = [rank.wait() for rank in ranks]
    took = time.monotonic() - started
    if any(codes):
        raise SystemExit(f"bench: the floor's ranks exited with {codes}: see {folder}")
    used = cpu.seconds()
    shutil.rmtree(folder)
    return took, used


def running_folder(settings: config.Settings) -> Path | None:
    """The folder of the run `make run` is training, once nodes.json records it."""
    going = current_run(cluster_state.read_state(settings) or {})
    return Path(run_logs.run_folder(settings, going["id"])) if going else None


def hosts_of(settings: config.Settings) -> list:
    return LocalHosts(settings.local_dir, settings.local_subnet).hosts()


class CpuDuringTraining(threading.Thread):
    """CPU seconds between the first iteration of every rank and the last epoch's end, split into
    the training's processes, the rest on the hosts (watchdogs, sshd sessions, Ansible modules) and
    the processes of `make run` on this machine (the scripts, CLAP, ansible-playbook, ssh)."""

    def __init__(self, settings: config.Settings, folder: Callable[[], Path | None]) -> None:
        super().__init__(daemon=True)
        self.settings, self.folder, self.done = settings, folder, threading.Event()
        self.first: dict[int, tuple[str, float]] | None = None
        self.last: dict[int, tuple[str, float]] | None = None

    def run(self) -> None:
        namespaces = {os.stat(f"/run/netns/{host.namespace}").st_ino for host in hosts_of(self.settings)}
        ranks = len(cluster_state.read_state(self.settings)["nodes"])
        while not self.done.wait(0.5):
            folder = self.folder()
            if folder is None:
                continue
            logs = dcgan_logs.parse_run_folder(folder)
            if len(logs) < ranks or not all(log.iterations for log in logs.values()):
                continue  # not every rank trains yet
            if any(len(log.epoch_times) == self.settings.epochs for log in logs.values()):
                continue  # a rank is done: what follows is the end, not training
            sample = processes(namespaces)
            self.first = self.first or sample
            self.last = sample

    def seconds(self) -> dict[str, float]:
        """CPU seconds of each kind of process between the first and the last sample."""
        self.done.set()
        self.join()
        if not self.first or self.first is self.last:
            raise SystemExit("bench: the run trained too briefly to sample its CPU: raise SYNTHETIC_IMAGES.")
        used = dict.fromkeys(KINDS, 0.0)
        for pid, (kind, cpu) in self.last.items():
            used[kind] += cpu - self.first.get(pid, (kind, 0.0))[1]
        return used


KINDS = ("training", "machinery on the hosts", "make run on this machine")


def processes(namespaces: set[int]) -> dict[int, tuple[str, float]]:
    """The processes in those network namespaces and those this bench started: pid -> (their kind,
    CPU seconds so far, with those of their children already reaped, as the short-lived ones are)."""
    found, parents = {}, {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            in_hosts = os.stat(proc / "ns" / "net").st_ino in namespaces
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            command = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        pid = int(proc.name)
        parents[pid] = int(fields[1])
        kind = (KINDS[0] if is_training(command) else KINDS[1]) if in_hosts else KINDS[2]
        found[pid] = (kind, sum(int(value) for value in fields[11:15]) / TICKS)
    return {pid: entry for pid, entry in found.items() if entry[0] != KINDS[2] or started_here(pid, parents)}


def is_training(command: str) -> bool:
    """Is this command line (NUL-separated, as /proc gives it) one of the training's processes?"""
    return any(marker in command for marker in RANK_MARKERS) and WATCHDOG_MARK not in command


def started_here(pid: int, parents: dict[int, int]) -> bool:
    """A descendant of this bench, not the bench itself (its own sampling is not `make run`'s)."""
    ancestor = parents.get(pid)
    while ancestor is not None and ancestor != os.getpid():
        ancestor = parents.get(ancestor)
    return ancestor is not None


def one_round(nodes: int, base_env: dict[str, str], work: Path) -> dict[str, float]:
    """Every step once. The floor of `run` is measured both before and after `make run`, and the run is
    compared with their mean: neither gains from its place (a warmer cache, a machine that another
    tenant's load makes slower or faster as the round goes on)."""
    env = {**base_env, "NODES": str(nodes)}
    settings = config.load_settings(env)
    times = {"up": step("up", env), "setup": step("setup", env)}
    state = cluster_state.read_state(settings)
    floor_before, floor_cpu_before = floor_run(settings, state)
    # Then as a user goes on: setup again and `make run` right after it (SSH connections still open).
    times["setup again"] = step("setup", env)
    times["floor: setup again"] = floor(settings, state, "setup", "", work)
    cpu = CpuDuringTraining(settings, lambda: running_folder(settings))
    cpu.start()
    times["run"] = step("run", env)
    used = cpu.seconds()
    floor_after, floor_cpu_after = floor_run(settings, state)
    times["floor: run, before"], times["floor: run, after"] = floor_before, floor_after
    times["floor: run"] = (floor_before + floor_after) / 2
    times["run / floor"] = times["run"] / times["floor: run"]
    times["floor: CPU s during training: training"] = (floor_cpu_before[KINDS[0]] + floor_cpu_after[KINDS[0]]) / 2
    for kind in KINDS:
        times[f"CPU s during training: {kind}"] = used[kind]
    times["machinery on the hosts / training CPU %"] = 100 * used[KINDS[1]] / used[KINDS[0]]
    times["all machinery / training CPU %"] = 100 * (used[KINDS[1]] + used[KINDS[2]]) / used[KINDS[0]]
    state = cluster_state.read_state(settings)
    run_id = state["runs"][-1]["id"]
    run_dir = Path(run_logs.run_folder(settings, run_id))
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
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=config.ROOT / "bench" / "results.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: the local cluster needs root.")

    medians: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="dcgan-bench-") as tmp:
        work = Path(tmp)
        clap_path = work / "clap_config"
        shutil.copytree(config.ROOT / "clap_config", clap_path, ignore=shutil.ignore_patterns("storage", "private"))
        (clap_path / "storage").mkdir()
        (clap_path / "private").mkdir()
        env = {**os.environ, "ENV_FILE": os.devnull, "CLAP_PATH": str(clap_path),
               "NODES_FILE": str(work / "nodes.json"), "RESULTS_DIR": str(work / "results"),
               "EFS_MOUNT_POINT": str(work / "efs"), "LOCAL_SUBNET": "10.213.240.0/24", "NO_COLOR": "1"}
        for nodes in args.nodes:
            rounds = []
            for number in range(args.repeat):
                print(f"bench: {nodes} nodes, round {number + 1}/{args.repeat}", flush=True)
                with cleaned_up(env):
                    rounds.append(one_round(nodes, env, work))
                print(f"  run {rounds[-1]['run']:.2f} s, its floor {rounds[-1]['floor: run, before']:.2f} s "
                      f"before and {rounds[-1]['floor: run, after']:.2f} s after: {rounds[-1]['run / floor']:.2f}",
                      flush=True)
            medians[nodes] = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        whole = make_all(min(args.nodes), args.repeat, env)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table(medians, args.repeat) + whole)
    print(args.out.read_text())
    return 0


@contextmanager
def cleaned_up(env: dict[str, str]) -> Iterator[None]:
    """Whatever happens inside, no node of the bench is left running."""
    try:
        yield
    finally:
        subprocess.run([sys.executable, str(config.ROOT / "scripts" / "down.py")], env=env, capture_output=True)
        settings = config.load_settings(env)
        LocalHosts(settings.local_dir, settings.local_subnet).destroy()  # what a failed `down` left


def make_all(nodes: int, repeat: int, env: dict[str, str]) -> str:
    """`make all` as a user types it, on the synthetic set the rounds made (the venv and data warm)."""
    seconds = []
    for number in range(repeat):
        print(f"bench: make all on {nodes} nodes, {number + 1}/{repeat}", flush=True)
        with cleaned_up(env):
            seconds.append(timed(["make", "-s", "-C", str(config.ROOT), "all"], {**env, "NODES": str(nodes)}))
    return (f"\n`make all` on {nodes} nodes (up, setup, run, results, down): median {statistics.median(seconds):.2f} s "
            f"of {repeat} ({', '.join(f'{s:.2f}' for s in seconds)}).\n")


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
        ratio = f"{values[-1] / values[0]:.2f}x" if values[0] > 0 and "/" not in key else "-"
        lines.append(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {ratio} |")
    lines += ["", "| scripts + CLAP / direct ansible-playbook | " + " | ".join(f"{n} nodes" for n in counts) + " |",
              "|---|" + "---:|" * len(counts)]
    for action, floor_key in (("setup again", "floor: setup again"), ("results (200 files)", "floor: results")):
        lines.append(f"| {action} | " + " | ".join(
            f"{medians[n][action] / medians[n][floor_key]:.2f}x" for n in counts) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    output.main_guard(main)
