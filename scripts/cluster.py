"""CLAP and Ansible as the steps drive them: CLAP's handles with our providers (local, aws) in them, the
environment and the logs of Ansible's runs, and what CLAP's records and the providers know of the nodes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster_state import cluster_tags
from config import ROOT, Settings
from output import UserError, output_to, warn

SSH_SILENCE_S = 15  # seconds without an answer after which Ansible's SSH gives a node up


@dataclass
class Clap:
    config_db: Any
    node_manager: Any
    role_manager: Any


def import_clap(settings: Settings) -> None:
    """Put CLAP on sys.path with CLAP_PATH set first: CLAP reads it at import time."""
    if not (settings.clap / "app" / "cli" / "modules" / "node.py").exists():
        raise UserError(f"CLAP not found at {settings.clap}: run `git submodule update --init`, "
                        f"or set CLAP=/path/to/a/CLAP/checkout.")
    os.environ["CLAP_PATH"] = str(settings.clap_path)
    # paramiko, which CLAP imports, takes invoke only to run an ssh_config's `Match exec`, and does
    # without it until then; CLAP reads no ssh_config. Its import is a seventh of a second per step.
    sys.modules.setdefault("invoke", None)
    for path in (str(settings.clap), str(Path(__file__).parent)):
        if path not in sys.path:
            sys.path.insert(0, path)


def clap(settings: Settings, state: dict | None = None) -> Clap:
    import_clap(settings)
    os.environ.update(ansible_env(settings, state))  # CLAP hands os.environ to Ansible
    from app.cli.modules.node import get_config_db, get_node_manager
    from app.cli.modules.role import get_role_manager

    from local_hosts import LocalHosts
    from local_provider import LocalProvider

    node_manager = get_node_manager()
    node_manager.providers["local"] = LocalProvider(
        LocalHosts(settings.local_dir, settings.local_subnet),
        settings.clap_path / "private", known_hosts_file(settings), settings.ssh_hosts, cluster_tags(state))
    if settings.provider == "aws":
        from aws_provider import AwsProvider

        # Ours in place of CLAP's, which needs boto2 and ansible 6.7.0 (see aws_provider).
        node_manager.providers["aws"] = AwsProvider(settings, state)
    return Clap(get_config_db(), node_manager, get_role_manager())


def known_hosts_file(settings: Settings) -> Path:
    return settings.clap_path / "storage" / "known_hosts"


def control_dir(settings: Settings) -> Path:
    """Ansible's SSH sockets: one folder per CLAP_PATH, short (a socket path has ~100 characters)."""
    digest = hashlib.sha1(str(settings.clap_path).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"dcgan-cp-{digest}"


def cluster_size(settings: Settings, state: dict | None) -> int:
    """How many nodes the cluster has: nodes.json once they exist; NODES only tells `up` how many to start."""
    return len(state["nodes"]) if state and state.get("nodes") else settings.nodes


def ansible_env(settings: Settings, state: dict | None = None) -> dict[str, str]:
    """Ansible settings for the cluster; they reach CLAP's runs through the environment."""
    bin_dir = str(Path(sys.executable).parent)  # ansible-runner runs the `ansible-playbook` on PATH
    return {
        "ANSIBLE_CONFIG": str(ROOT / "clap_config" / "ansible.cfg"),
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_SSH_ARGS": (
            # A node silent for SSH_SILENCE_S is unreachable: a lost node is reported, not waited on.
            f"-o ControlMaster=auto -o ControlPersist=60s -o ServerAliveInterval={SSH_SILENCE_S // 3} "
            "-o ServerAliveCountMax=3 "
            "-o ConnectTimeout=10 "
            f"-o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={known_hosts_file(settings)}"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control_dir(settings)),
        "ANSIBLE_FORKS": str(max(5, cluster_size(settings, state))),
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_SYSTEM_WARNINGS": "False",
        "ANSIBLE_NOCOLOR": "False" if sys.stdout.isatty() else "True",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }


def close_connections(settings: Settings) -> None:
    """End Ansible's persistent SSH connections to the cluster (they outlive the step), and their folder."""
    for socket_path in control_dir(settings).glob("*"):
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "dcgan-node"],
                       capture_output=True, check=False, timeout=10)
        socket_path.unlink(missing_ok=True)  # its master removes it only after answering: a race with the rmdir
    with suppress(OSError):  # already gone, or a socket of a connection that would not end
        control_dir(settings).rmdir()


def instance_info(settings: Settings, config_db: Any) -> Any:
    """The instance template, with the login filled from the user's settings."""
    info = config_db.instance_descriptors.get(settings.instance_type)
    if info is None:
        raise UserError(f"CLAP dropped INSTANCE_TYPE={settings.instance_type} while loading "
                        f"{settings.clap_path / 'configs'} (its login or provider is invalid): see the log above.")
    if settings.provider == "aws":
        info.login.keypair_name = settings.keypair_name
    if info.instance.flavor == "ssh":
        info.login.user = settings.ssh_user
    return info


def step_log(settings: Settings, step: str) -> Path:
    """Where the whole output of a step goes: a log kept with the cluster's state."""
    path = settings.clap_path / "storage" / "logs" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def ansible_log(settings: Settings, step: str) -> Iterator[Path]:
    """Ansible's whole output of a step goes to its log (the screen gets one line per step; VERBOSE=1
    streams it too): Ansible's own ANSIBLE_LOG_PATH, read by each run."""
    path = step_log(settings, step)
    before = os.environ.get("ANSIBLE_LOG_PATH")
    os.environ["ANSIBLE_LOG_PATH"] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("ANSIBLE_LOG_PATH", None)
        else:
            os.environ["ANSIBLE_LOG_PATH"] = before


@contextmanager
def clap_quietly(settings: Settings, step: str, doing: str, then: str) -> Iterator[Path | None]:
    """CLAP's AWS provider prints the whole play of its own playbooks (start, tag, stop): unless
    VERBOSE=1, all that CLAP prints goes to the step's log (yielded; None when it streams). A failure
    inside is one sentence that names the output."""
    log = None if settings.verbose else step_log(settings, step)
    with output_to(log):
        try:
            yield log
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as error:
            traceback.print_exc()  # into the log
            raise UserError(f"CLAP could not {doing}: {error or type(error).__name__} (whole output: "
                            f"{log or 'above'}); {then}.") from error


def nodes_alive(handles: Clap, ids: list[str]) -> dict[str, bool]:
    """Ask each node's provider (no SSH): is the machine there and running?"""
    from clap.node import NodeStatus

    known = [node for node in handles.node_manager.get_all_nodes() if node.node_id in ids]  # CLAP forgot: gone
    alive = dict.fromkeys(ids, False)
    for provider, nodes in handles.node_manager.group_nodes_by_provider(known).items():
        for node in handles.node_manager.providers[provider].update_instance_info(nodes):
            alive[node.node_id] = node.status in (NodeStatus.STARTED, NodeStatus.REACHABLE)
    return alive


def project_nodes(handles: Clap, state: dict | None) -> list[str]:
    """Nodes in CLAP's records made by this project: those of this cluster, or all when it is unknown."""
    wanted = cluster_tags(state)
    return [node.node_id for node in handles.node_manager.get_all_nodes()
            if all(node.tags.get(key) == value for key, value in wanted.items())]


def stop_local_orphans(settings: Settings, handles: Clap) -> int:
    """Namespace hosts that no CLAP record names (their `up` died before CLAP wrote one)."""
    provider = handles.node_manager.providers["local"]
    recorded = {node.cloud_instance_id for node in handles.node_manager.get_all_nodes()}
    orphans = [host.name for host in provider.hosts.hosts() if host.name not in recorded]
    if orphans:
        warn(f"removing {len(orphans)} local hosts no record names: {', '.join(orphans)}")
        provider.hosts.destroy(orphans)
    return len(orphans)


def ensure_local_key(settings: Settings) -> None:
    """The login key of the namespace hosts, made once, private (0600)."""
    key = settings.clap_path / "private" / "local_key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dcgan-local-cluster",
                        "-f", str(key)], check=True)
    key.chmod(0o600)
