"""The dcgan role: the variables each of its actions gets, playing an action on the nodes, what a
failed play says, and what an action would do (DRY_RUN=1)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from aws_nodes import lifetime_minutes
from clap_configs import ROLE, read_yaml
from cluster import Clap, ansible_log
from cluster_state import node_ids, short_id
from config import Settings

NODE_PYTHON = "/usr/bin/python3"
# ansible-runner takes over Ctrl-C while a playbook runs: it cancels it and reports this code.
PLAYBOOK_CANCELED = 254


def node_vars(state: dict) -> dict[str, dict]:
    return {
        node["id"]: {"node_rank": node["rank"], "private_ip": node["private_address"],
                     "ansible_python_interpreter": NODE_PYTHON}
        for node in state["nodes"]
    }


def role_vars(settings: Settings, state: dict, action: str, run_id: str = "") -> dict[str, Any]:
    """The extra vars of one action of the dcgan role, from the settings."""
    shared = {"user_dir": settings.user_dir, "efs_mount_point": settings.efs_mount_point,
              "runner": settings.runner, "dcgan_dir": settings.dcgan_dir,
              "cifar_data_dir": settings.cifar_data_dir, "dcgan_python": settings.dcgan_python}
    if action == "setup":
        # EFS_HOST of the user's (mounted as EFS_FSTYPE says), else the filesystem the provider made with the
        # nodes (and how to mount it).
        efs = {"efs_host": settings.efs_host, "efs_fstype": settings.efs_fstype,
               **({"efs_mount_options": settings.efs_mount_options} if settings.efs_mount_options else {})} \
            if settings.efs_host else state.get("efs", {"efs_host": ""})
        return {**shared, **efs,
                # MAX_HOURS: on EC2 a node's own shutdown terminates it; a cloud-like local node plays it too.
                "shutdown_after_minutes": lifetime_minutes(settings, state)
                if settings.provider == "aws" or settings.cloud_like else 0}
    if action == "run":
        threads = max(1, (os.cpu_count() or 1) // len(state["nodes"])) if settings.provider == "local" else 0
        run = next((run for run in state.get("runs", []) if run["id"] == run_id), {})  # a sweep's say what they are
        return {**shared, "master_hostname": state["nodes"][0]["id"], "run_id": run_id,
                "epochs": settings.epochs, "master_port": settings.master_port,
                "run_timeout": settings.run_timeout, "stall_timeout": settings.stall_timeout,
                "app_args": shlex.split(settings.app_args),  # as a shell would; the role quotes each
                "omp_num_threads": threads, "log_clock": run.get("clock", False),
                "sample_iterations": run.get("sample_iterations", 0)}
    if action == "results":
        return {"user_dir": settings.user_dir, "results_dir": str(settings.results_dir), "run_id": run_id}
    raise ValueError(action)


def play(settings: Settings, handles: Clap, state: dict, action: str, run_id: str = "") -> Any:
    """One action of the dcgan role on the nodes of `state`; the result names its log (log_file)."""
    with ansible_log(settings, action) as log:
        result = handles.role_manager.perform_action(
            ROLE, action, node_ids(state), node_vars=node_vars(state),
            extra_args=role_vars(settings, state, action, run_id), quiet=not settings.verbose)
    result.log_file = log
    return result


def logged_failure(log: Path) -> str:
    """The first failure a step's log holds: CLAP's add_role keeps its playbook's result to itself."""
    for line in log.read_text(errors="replace").splitlines():
        where, found, reported = line.partition(": FAILED! => ")
        if not found:
            continue
        try:
            res = json.loads(reported)
        except ValueError:
            continue
        words = (res.get("stderr") or res.get("msg") or "").strip().splitlines()
        return f"node {short_id(where.rpartition('[')[2])}: {words[-1] if words else 'failed'} (whole output: {log})"
    return f"its message is in {log}"


def playbook_failure(result: Any, state: dict) -> str:
    """Which nodes failed a playbook of `play`, the first message each gave, and the log."""
    if result.ret_code == PLAYBOOK_CANCELED:
        return "interrupted (Ctrl-C)"
    ranks = {node["id"]: node["rank"] for node in state["nodes"]}
    failures = []
    for host, ok in sorted(result.hosts.items(), key=lambda item: ranks.get(item[0], -1)):
        if ok:
            continue
        message = "unreachable"
        for event in result.events.get(host, []):
            if event.get("event") in ("runner_on_failed", "runner_on_unreachable"):
                res = event.get("event_data", {}).get("res", {})
                # A command's own words (stderr) say more than Ansible's "non-zero return code".
                message = (res.get("stderr") or res.get("msg") or "").strip().splitlines()
                message = message[-1] if message else event["event"]
                break
        failures.append(f"node {short_id(host)} (rank {ranks.get(host, '?')}): {message}")
    what = "; ".join(failures) or f"ansible-playbook exited with {result.ret_code}"
    return f"{what} (whole output: {result.log_file})"


def unreachable_only(result: Any) -> list[str]:
    """The nodes a play lost contact with, when that is all that went wrong (none failed a task)."""
    failed = [host for host, ok in result.hosts.items() if not ok]
    events = {host: {event.get("event") for event in result.events.get(host, [])} for host in failed}
    if not failed or any("runner_on_failed" in kinds or "runner_on_unreachable" not in kinds
                         for kinds in events.values()):
        return []
    return failed


def show_plan(settings: Settings, state: dict, action: str, run_id: str = "") -> None:
    """What a role action would do: playbook, hosts, variables and, for `run`, each rank's command."""
    extra = role_vars(settings, state, action, run_id)
    per_node = node_vars(state)
    print(f"DRY RUN: would play {settings.clap_path / 'roles' / 'roles' / f'dcgan_{action}.yaml'}")
    for node in state["nodes"]:
        print(f"  on rank {node['rank']}: node {short_id(node['id'])} at {node['address']}  "
              f"{json.dumps(per_node[node['id']])}")
    print(f"  with {json.dumps(extra, indent=None)}")
    if action == "run":
        for node in state["nodes"]:
            print(f"  rank {node['rank']} runs: {rank_command(settings, state, extra, per_node[node['id']])}")
    print("Nothing was started, changed or written.")


def rank_command(settings: Settings, state: dict, extra: dict, per_node: dict) -> str:
    """A rank's command line, rendered by Ansible's own templating from the role's definitions."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    defaults_file = settings.clap_path / "roles" / "roles" / "dcgan_defaults.yaml"
    read_yaml(defaults_file)  # a broken file is named with its line
    loader = DataLoader()
    # Ansible 2.19 renders only templates it trusts: those of the role's own files, as a play loads them.
    defaults = loader.load_from_file(str(defaults_file), trusted_as_template=True)
    master = state["nodes"][0]
    facts = {"ansible_play_hosts_all": node_ids(state), "dcgan_master_addr": master["private_address"]}
    templar = Templar(loader=loader, variables={**defaults, **extra, **per_node, **facts})
    # What the rank's watchdog puts in its environment on the node (rank_watchdog.rank_environment).
    environment = (f"env GLOO_SOCKET_IFNAME=<interface to the master> "
                   f"OMP_NUM_THREADS={extra.get('omp_num_threads') or '<the node cores>'} PYTHONUNBUFFERED=1")
    return f"{environment} {templar.template(trust_as_template('{{ dcgan_rank_command }}'))}"
