"""Shared fixtures: namespace hosts for the role, and an isolated project for the steps.

Nothing here touches the user's own nodes.json, results, CLAP records or
local hosts: every test gets its own state folder, subnet and files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ansible_runner
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import cluster  # noqa: E402
import config  # noqa: E402
import role  # noqa: E402
from ec2_emulator import Ec2Emulator, ec2_emulator  # noqa: E402
from local_hosts import LocalHosts  # noqa: E402

PLAYBOOKS = ROOT / "clap_config" / "roles" / "roles"

WORKER_NET_STEP = 10  # a pytest-xdist worker's octet is the next one ending in the same digit


def worker_net(setting: str, worker: int) -> str:
    """The second octet of the subnets of one test process (pytest-xdist's worker gw<worker>; 0 without it).

    Two test sessions at once (say, two work trees) each take their own, from DCGAN_TEST_NET: one
    octet N gives worker k the octet N + 10 k (DCGAN_TEST_NET=214 with two workers: 214 and 224),
    so sessions whose octets end in different digits never meet; a comma-separated list gives each
    worker its own, in order (DCGAN_TEST_NET=214,234).
    """
    octets = [part.strip() for part in setting.split(",")]
    if not all(part.isdigit() for part in octets):
        raise ValueError(f"DCGAN_TEST_NET={setting!r} must be an octet (like 214) or a comma-separated list "
                         f"of octets, one per test worker (like 214,224).")
    if len(octets) == 1:
        octet = int(octets[0]) + WORKER_NET_STEP * worker
    elif worker < len(octets):
        octet = int(octets[worker])
    else:
        raise ValueError(f"DCGAN_TEST_NET={setting} lists {len(octets)} octets but test worker {worker + 1} needs "
                         f"one: list one per worker (PYTEST_WORKERS), or give one octet.")
    if octet > 255:
        raise ValueError(f"DCGAN_TEST_NET={setting} gives test worker {worker + 1} the octet {octet}, above 255: "
                         f"pick a lower octet, or list one per worker.")
    return str(octet)


TEST_NET_SETTING = os.environ.get("DCGAN_TEST_NET", "213")
TEST_NET = worker_net(TEST_NET_SETTING, int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On pytest-xdist's workers, the tests marked `long`, then those that drive a whole cluster through
    `make` (fixture `env`, a minute or more each), are handed out first: one started last would run
    alone while the other worker has nothing left. Tests that share a module's hosts or emulator
    carry `xdist_group` and go to one worker together, in their order."""
    if hasattr(config, "workerinput"):  # a stable sort: each kind keeps its order
        items.sort(key=lambda item: (item.get_closest_marker("long") is None, "env" not in item.fixturenames))


def pytest_configure(config: pytest.Config) -> None:
    """Refuse, before any test runs, a DCGAN_TEST_NET that leaves a worker without a subnet."""
    workers = len(getattr(config.option, "tx", None) or []) or 1
    for worker in range(workers):
        try:
            worker_net(TEST_NET_SETTING, worker)
        except ValueError as error:
            raise pytest.UsageError(str(error)) from None


def subnet(third: int) -> str:
    return f"10.{TEST_NET}.{third}.0/24"


def subnet_tag(third: int) -> str:
    """How LocalHosts names the namespaces and links of subnet(third)."""
    return f"{TEST_NET}-{third}"


ROLE_SUBNET = subnet(250)
PROJECT_SUBNET = subnet(251)


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the local cluster makes network namespaces (CI runs as root)")


def clap_checkout() -> Path:
    """The CLAP checkout the tests drive: $CLAP, else the CLAP/ submodule."""
    path = Path(os.environ.get("CLAP") or ROOT / "CLAP")
    if not (path / "app" / "cli" / "modules" / "node.py").exists():
        without_clap(f"CLAP is not available at {path}: run `git submodule update --init` or set CLAP=<checkout>")
    return path


def without_clap(reason: str) -> None:
    """Skip a test that needs CLAP; under CI, fail it: a silent skip is how the main path went unguarded."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI runs every CLAP test: `make test` unpacks the pinned archive in ../shared/clap)")
    pytest.skip(reason)


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
        assert leftovers(subnet_tag(250)) == []


@pytest.fixture(scope="module")
def emulator() -> Iterator[Ec2Emulator]:
    """The EC2 emulator on loopback, in a network namespace of its own, for a module of tests."""
    need_root()
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    with ec2_emulator() as emu:
        yield emu


@pytest.fixture
def project(tmp_path: Path) -> dict[str, str]:
    """Environment for the step scripts with every file of theirs under tmp_path."""
    return project_env(tmp_path)


def project_env(folder: Path) -> dict[str, str]:
    """What a checkout of its own has: CLAP_PATH, nodes.json and results under `folder`."""
    clap_path = folder / "clap_config"
    shutil.copytree(ROOT / "clap_config", clap_path,
                    ignore=shutil.ignore_patterns("storage", "private"))
    (clap_path / "storage").mkdir()
    (clap_path / "private").mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "CLAP_"))}
    env.update({
        "ENV_FILE": os.devnull,
        "CLAP_PATH": str(clap_path),
        "NODES_FILE": str(folder / "nodes.json"),
        "RESULTS_DIR": str(folder / "results"),
        "EFS_MOUNT_POINT": str(folder / "efs"),
        "LOCAL_SUBNET": PROJECT_SUBNET,
        "SYNTHETIC_IMAGES": "256",
        "NO_COLOR": "1",
    })
    return env


@contextmanager
def role_cluster(hosts: list, ssh_key: Path, work: Path) -> Iterator[dict]:
    """CLAP's inventory shape over the hosts, a shared 'EFS' folder, a synthetic data set; on exit,
    Ansible's SSH connections to the hosts end and their socket folder in /tmp goes, as `make down` does.

    Host name = node id, group `dcgan`, ansible_host, per-node node_rank and private_ip;
    the role's vars are extra vars, as CLAP passes them.
    """
    efs = work / "efs"
    data = efs / "data" / "cifar10"
    subprocess.run([sys.executable, str(ROOT / "demo" / "make_cifar.py"), "--out", str(data),
                    "--test-images", "256"], check=True, capture_output=True)
    ids = [uuid.uuid4().hex for _ in hosts]
    inventory = {"all": {"children": {"dcgan": {"hosts": {
        node_id: {"ansible_host": host.address, "ansible_user": "root", "ansible_port": 22,
                  "ansible_connection": "ssh", "ansible_ssh_private_key_file": str(ssh_key),
                  "ansible_python_interpreter": role.NODE_PYTHON,
                  "node_rank": rank, "private_ip": host.address}
        for rank, (node_id, host) in enumerate(zip(ids, hosts, strict=True))}}}}}
    settings = config.load_settings({"ENV_FILE": os.devnull, "CLAP_PATH": str(work / "clap")})
    base_vars = {"efs_host": "", "efs_mount_point": str(efs), "user_dir": str(efs / "user"),
                 "cifar_data_dir": str(data), "runner": "native", "dcgan_dir": str(ROOT / "demo"),
                 "dcgan_python": sys.executable, "omp_num_threads": 1}
    try:
        yield {"ids": ids, "hosts": hosts, "inventory": inventory, "vars": base_vars, "work": work,
               "env": {**os.environ, **cluster.ansible_env(settings)}, "user_dir": efs / "user"}
    finally:
        cluster.close_connections(settings)
        assert not cluster.control_dir(settings).exists()


def play(cluster: dict, action: str, wait: bool = True, cancel: object = None,
         **extra: object) -> ansible_runner.Runner:
    """Play one action of the role; wait=False returns (thread, runner) at once."""
    private = cluster["work"] / f"runner-{uuid.uuid4().hex[:8]}"
    private.mkdir()
    kwargs = {"private_data_dir": str(private), "playbook": str(PLAYBOOKS / f"dcgan_{action}.yaml"),
              "inventory": cluster["inventory"], "extravars": {**cluster["vars"], **extra},
              "envvars": cluster["env"], "quiet": True}
    if wait:
        return ansible_runner.run(**kwargs)
    return ansible_runner.run_async(**kwargs, cancel_callback=cancel or (lambda: False))


def failure_messages(result: ansible_runner.Runner) -> str:
    return " ".join(str(e["event_data"]["res"].get("msg", "")) + " " + str(e["event_data"]["res"].get("stderr", ""))
                    for e in result.events if e["event"] in ("runner_on_failed", "runner_on_unreachable"))
