"""Shared fixtures: namespace hosts for the role, and an isolated project for the steps.

Nothing here touches the user's own nodes.json, results, CLAP records or
local hosts: every test gets its own state folder, subnet and files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from local_hosts import LocalHosts  # noqa: E402

ROLE_SUBNET = "10.213.250.0/24"
PROJECT_SUBNET = "10.213.251.0/24"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the local cluster makes network namespaces (CI runs as root)")


def clap_checkout() -> Path:
    """The CLAP checkout the tests drive: $CLAP, else the CLAP/ submodule."""
    path = Path(os.environ.get("CLAP") or ROOT / "CLAP")
    if not (path / "app" / "cli" / "modules" / "node.py").exists():
        pytest.skip(f"CLAP is not available at {path}: run `git submodule update --init` or set CLAP=<checkout>")
    return path


def leftovers(subnet_tag: str) -> list[str]:
    """Namespaces, links or sshd processes of a test subnet that still exist."""
    found = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith(f"dcgan-{subnet_tag}-")]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [line.split(":")[1].strip() for line in links.splitlines() if f"dcg{subnet_tag}" in line
              or f"dcgbr{subnet_tag}" in line]
    return found


@pytest.fixture(scope="session")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, ssh_key: Path) -> Iterator[list]:
    """Two namespace hosts, made for a module of tests and removed after it, pass or fail."""
    need_root()
    cluster = LocalHosts(tmp_path_factory.mktemp("hosts"), ROLE_SUBNET)
    try:
        yield cluster.create(2, ssh_key.with_suffix(".pub").read_text())
    finally:
        cluster.destroy()
        assert leftovers("213-250") == []


@pytest.fixture
def project(tmp_path: Path) -> dict[str, str]:
    """Environment for the step scripts with every file of theirs under tmp_path."""
    clap_path = tmp_path / "clap_config"
    shutil.copytree(ROOT / "clap_config", clap_path,
                    ignore=shutil.ignore_patterns("storage", "private"))
    (clap_path / "storage").mkdir()
    (clap_path / "private").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CLAP_"))}
    env.update({
        "ENV_FILE": os.devnull,
        "CLAP_PATH": str(clap_path),
        "NODES_FILE": str(tmp_path / "nodes.json"),
        "RESULTS_DIR": str(tmp_path / "results"),
        "EFS_MOUNT_POINT": str(tmp_path / "efs"),
        "LOCAL_SUBNET": PROJECT_SUBNET,
        "SYNTHETIC_IMAGES": "256",
        "NO_COLOR": "1",
    })
    return env
