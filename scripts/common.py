"""What every step shares: settings, nodes.json, CLAP handles and the user's messages.

One path for every setting: its default in vars.sh, then .env, then the
environment (which `make NAME=value` sets); validated here, once, with the
sentence the user sees.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STATE_FORMAT = 1
PROJECT = "dcgan-clap"
ROLE = "dcgan"
NODE_PYTHON = "/usr/bin/python3"
# ansible-runner takes over Ctrl-C while a playbook runs: it cancels it and reports this code.
PLAYBOOK_CANCELED = 254
PROGRESS_EVERY_S = 10  # seconds between two progress reports of a run

PROVIDER_DEFAULTS = {
    "local": {
        "INSTANCE_TYPE": "type-local",
        "RUNNER": "native",
        "EFS_MOUNT_POINT": str(ROOT / ".cluster" / "efs"),
        "USER_DIR": "{EFS_MOUNT_POINT}/dcgan",
        "DCGAN_DIR": str(ROOT / "demo"),
        "CIFAR_DATA_DIR": "{EFS_MOUNT_POINT}/data/cifar10",
        "DCGAN_PYTHON": sys.executable,
    },
    "aws": {
        "INSTANCE_TYPE": "type-t2.medium",
        "RUNNER": "docker",
        "EFS_MOUNT_POINT": "/home/ubuntu/efs",
        "USER_DIR": "{EFS_MOUNT_POINT}/dcgan",
        "DCGAN_DIR": "{USER_DIR}/Distributed-DCGAN",
        "CIFAR_DATA_DIR": "{EFS_MOUNT_POINT}/data/cifar10",
        "DCGAN_PYTHON": "python3",
    },
}


class UserError(Exception):
    """A mistake the user can fix; its message is the one sentence they see."""


# -- output ------------------------------------------------------------------
def _paint(code: str, text: str, stream: Any) -> str:
    return f"\033[{code}m{text}\033[0m" if stream.isatty() and not os.environ.get("NO_COLOR") else text


def say(text: str) -> None:
    print(_paint("32", "==> ", sys.stdout) + text, flush=True)


def warn(text: str) -> None:
    print(_paint("33", "warning: ", sys.stderr) + text, file=sys.stderr, flush=True)


def fail(text: str) -> None:
    print(_paint("31", "error: ", sys.stderr) + text, file=sys.stderr, flush=True)


def main_guard(main: Any) -> None:
    """Run a step's main(); a UserError is one line and exit 1, Ctrl-C exit 130."""
    try:
        sys.exit(main())
    except UserError as error:
        fail(str(error))
        sys.exit(1)
    except KeyboardInterrupt:
        fail("interrupted; what was started is recorded: `make status` shows it, `make down` stops it.")
        sys.exit(130)


# -- settings ----------------------------------------------------------------
def _read_assignments(path: Path) -> dict[str, str]:
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise UserError(f"{path}:{number}: expected NAME=value, got '{line}'.")
        try:
            values[name.strip()] = " ".join(shlex.split(value, comments=True))
        except ValueError as error:
            raise UserError(f"{path}:{number}: {error} in '{line}': close the quote.") from None
    return values


@dataclass(frozen=True)
class Settings:
    provider: str
    nodes: int
    instance_type: str
    epochs: int
    results_dir: Path
    nodes_file: Path
    runner: str
    efs_host: str
    efs_mount_point: str
    user_dir: str
    dcgan_dir: str
    cifar_data_dir: str
    dcgan_python: str
    app_args: str
    synthetic_images: int
    connection_tries: int
    boot_timeout: int
    run_timeout: int
    stall_timeout: int
    master_port: int
    keypair_name: str
    max_hours: float
    ssh_hosts: list[str]
    ssh_user: str
    local_subnet: str
    clap_path: Path
    clap: Path
    dry_run: bool
    run_id: str
    verbose: bool
    sizes: list[int]
    instance_types: list[str]
    max_sweep_cost: float
    user_set: frozenset[str] = field(default_factory=frozenset)  # the names the user set

    @property
    def synthetic_data(self) -> bool:
        """The local default with no data of the user's: we make a synthetic set."""
        return self.provider == "local" and "CIFAR_DATA_DIR" not in self.user_set

    @property
    def local_dir(self) -> Path:
        """Where the local provider keeps its hosts' records."""
        return self.clap_path / "storage" / "local"


def _whole(raw: dict[str, str], name: str, minimum: int, example: str) -> int:
    value = raw[name].strip()
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a whole number: set it like {name}={example}.") from None
    if number < minimum:
        raise UserError(f"{name}={number} must be at least {minimum}: set it like {name}={example}.")
    return number


def _stall_timeout(raw: dict[str, str]) -> int:
    seconds = _whole(raw, "STALL_TIMEOUT", 0, "300")
    if 0 < seconds < PROGRESS_EVERY_S:
        raise UserError(f"STALL_TIMEOUT={seconds} is shorter than the progress report interval "
                        f"({PROGRESS_EVERY_S} s): set it like STALL_TIMEOUT=300, or STALL_TIMEOUT=0 to turn it off.")
    return seconds


def _hours(value: str) -> float:
    try:
        hours = float(value)
    except ValueError:
        hours = -1
    if not 0 < hours <= 168:
        raise UserError(f"MAX_HOURS={value!r} must be a number of hours above 0 and at most 168: "
                        f"set it like MAX_HOURS=3.")
    return hours


def _app_args(value: str) -> str:
    try:
        shlex.split(value)
    except ValueError as error:
        raise UserError(f"APP_ARGS={value!r} does not split into arguments ({error}): close the quote.") from None
    return value


def _sizes(value: str) -> list[int]:
    sizes = []
    for part in value.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise UserError(f"SIZES={value!r} must list whole numbers of nodes above 0, comma-separated: "
                            f"set it like SIZES=1,2,4.")
        sizes.append(int(part))
    return sorted(set(sizes))


def _dollars(value: str) -> float:
    try:
        dollars = float(value)
    except ValueError:
        dollars = -1
    if not 0 <= dollars < float("inf"):
        raise UserError(f"MAX_SWEEP_COST={value!r} must be a number of US dollars: set it like MAX_SWEEP_COST=5.")
    return dollars


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    environ = dict(os.environ if environ is None else environ)
    raw = _read_assignments(ROOT / "vars.sh")
    env_file = Path(environ.get("ENV_FILE") or ROOT / ".env")
    user: dict[str, str] = _read_assignments(env_file) if env_file.exists() else {}
    user.update({name: environ[name] for name in raw if name in environ})
    user = {name: value for name, value in user.items() if name in raw}
    raw.update(user)
    user_set = frozenset(name for name, value in user.items() if value.strip())

    provider = raw["PROVIDER"].strip()
    if provider not in PROVIDER_DEFAULTS:
        raise UserError(f"PROVIDER={provider!r} is unknown: use PROVIDER=local or PROVIDER=aws.")
    for name, default in PROVIDER_DEFAULTS[provider].items():
        if not raw[name].strip():
            raw[name] = default
    if provider == "local" and raw["SSH_HOSTS"].strip() and "INSTANCE_TYPE" not in user_set:
        raw["INSTANCE_TYPE"] = "type-ssh"
    for name in ("EFS_MOUNT_POINT", "USER_DIR", "DCGAN_DIR", "CIFAR_DATA_DIR"):
        raw[name] = raw[name].format(**raw)
    if raw["RUNNER"] not in ("native", "docker"):
        raise UserError(f"RUNNER={raw['RUNNER']!r} is unknown: use RUNNER=native or RUNNER=docker.")

    def local_path(name: str) -> str:
        # On the local cluster the nodes share this machine's filesystem: resolve here.
        return str(Path(raw[name]).resolve()) if provider == "local" else raw[name]

    clap_path = (ROOT / raw["CLAP_PATH"]).resolve()
    return Settings(
        provider=provider,
        nodes=_whole(raw, "NODES", 1, "2"),
        instance_type=raw["INSTANCE_TYPE"],
        epochs=_whole(raw, "EPOCHS", 1, "2"),
        results_dir=Path(raw["RESULTS_DIR"]).resolve(),
        nodes_file=Path(raw["NODES_FILE"]).resolve(),
        runner=raw["RUNNER"],
        efs_host=raw["EFS_HOST"],
        efs_mount_point=local_path("EFS_MOUNT_POINT"),
        user_dir=local_path("USER_DIR"),
        dcgan_dir=local_path("DCGAN_DIR"),
        cifar_data_dir=local_path("CIFAR_DATA_DIR"),
        dcgan_python=raw["DCGAN_PYTHON"],
        app_args=_app_args(raw["APP_ARGS"]),
        synthetic_images=_whole(raw, "SYNTHETIC_IMAGES", 32, "512"),
        connection_tries=_whole(raw, "CONNECTION_TRIES", 0, "3"),
        boot_timeout=_whole(raw, "BOOT_TIMEOUT", 10, "300"),
        run_timeout=_whole(raw, "RUN_TIMEOUT", 30, "3600"),
        stall_timeout=_stall_timeout(raw),
        master_port=_whole(raw, "MASTER_PORT", 1024, "29500"),
        keypair_name=raw["KEYPAIR_NAME"],
        max_hours=_hours(raw["MAX_HOURS"]),
        ssh_hosts=[h.strip() for h in raw["SSH_HOSTS"].split(",") if h.strip()],
        ssh_user=raw["SSH_USER"],
        local_subnet=raw["LOCAL_SUBNET"],
        clap_path=clap_path,
        clap=Path(environ.get("CLAP") or ROOT / "CLAP").resolve(),
        dry_run=raw["DRY_RUN"].strip() not in ("", "0"),
        run_id=raw["RUN_ID"].strip(),
        verbose=raw["VERBOSE"].strip() not in ("", "0"),
        sizes=_sizes(raw["SIZES"]),
        instance_types=[t.strip() for t in raw["INSTANCE_TYPES"].split(",") if t.strip()] or [raw["INSTANCE_TYPE"]],
        max_sweep_cost=_dollars(raw["MAX_SWEEP_COST"]),
        user_set=user_set,
    )


# -- configuration files -------------------------------------------------------
def read_yaml(path: Path) -> dict:
    """A CLAP config or role file, with the line of a syntax error named."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: restore it from git (git checkout -- {path}).") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", error)
        raise UserError(f"{path}{where} is not valid YAML ({problem}): fix that line.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of names to settings: fix its content.")
    return data


def check_configs(settings: Settings) -> dict:
    """Every CLAP file parses, and INSTANCE_TYPE names a template of PROVIDER. Returns the template."""
    configs = settings.clap_path / "configs"
    providers = read_yaml(configs / "providers.yaml")
    read_yaml(configs / "logins.yaml")
    instances = read_yaml(configs / "instances.yaml")
    read_yaml(settings.clap_path / "roles" / "actions.d" / f"{ROLE}.yml")
    template = instances.get(settings.instance_type)
    if template is None:
        choices = ", ".join(sorted(instances))
        raise UserError(f"INSTANCE_TYPE={settings.instance_type!r} is not in {configs / 'instances.yaml'}: "
                        f"use one of {choices}.")
    kind = providers.get(template.get("provider"), {}).get("provider")
    if kind != settings.provider:
        raise UserError(f"INSTANCE_TYPE={settings.instance_type} belongs to provider {kind!r}, not "
                        f"PROVIDER={settings.provider}: pick a template of {settings.provider}.")
    return template


# -- nodes.json ------------------------------------------------------------------
def read_state(settings: Settings) -> dict | None:
    path = settings.nodes_file
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON): `make status` and `make down` still find the nodes "
                        f"through CLAP's records; after `make down`, delete {path.name}.") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} has format {state.get('format') if isinstance(state, dict) else '?'}, "
                        f"this version reads format {STATE_FORMAT}: stop its nodes with the version that "
                        f"made it (or `make down`, which also finds them through CLAP), then delete it.")
    return state


def write_state(settings: Settings, state: dict | None) -> None:
    """Replace nodes.json atomically (a crash leaves the old or the new file, never half)."""
    path = settings.nodes_file
    if state is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as out:
        json.dump(state, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@contextmanager
def exclusive(settings: Settings, step: str) -> Iterator[None]:
    """One step at a time on a nodes.json: a second command refuses, naming the first."""
    lock_path = settings.nodes_file.with_name(f".{settings.nodes_file.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another command"
            raise UserError(f"{holder} is using {settings.nodes_file.name}: wait for it to end "
                            f"(or stop it), then run `make {step}` again.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"`make {step}` (PID {os.getpid()})")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def need_nodes(settings: Settings, step: str) -> dict:
    state = read_state(settings)
    if not state or not state.get("nodes"):
        raise UserError(f"no nodes in {settings.nodes_file.name}: run `make up` before `make {step}`.")
    check_provider(settings, state)
    return state


def check_provider(settings: Settings, state: dict | None) -> None:
    if state and state.get("provider") != settings.provider:
        raise UserError(f"{settings.nodes_file.name} holds a PROVIDER={state.get('provider')} cluster but "
                        f"PROVIDER={settings.provider}: set PROVIDER={state.get('provider')} (in .env or on "
                        f"the command line) to work on it.")


@contextmanager
def recording(settings: Settings, state: dict, step: str) -> Iterator[dict]:
    """Record a step as running, then done or failed, with its times, in nodes.json."""
    started = time.time()
    state.setdefault("steps", {})[step] = {"state": "running", "started": started}
    write_state(settings, state)
    outcome = "failed"
    try:
        yield state
        outcome = "done"
    finally:
        finished = time.time()
        state["steps"][step] = {"state": outcome, "started": started, "finished": finished,
                                "seconds": round(finished - started, 2)}
        write_state(settings, state)


def node_ids(state: dict) -> list[str]:
    return [node["id"] for node in state["nodes"]]


# -- CLAP ------------------------------------------------------------------------
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
    if settings.provider == "aws":
        # Ansible's AWS modules prefer these to CLAP's key files: keep to the files.
        for name in AWS_ENV_OVERRIDES:
            os.environ.pop(name, None)
    from app.cli.modules.node import get_config_db, get_node_manager
    from app.cli.modules.role import get_role_manager

    from local_hosts import LocalHosts
    from local_provider import LocalProvider

    node_manager = get_node_manager()
    node_manager.providers["local"] = LocalProvider(
        LocalHosts(settings.local_dir, settings.local_subnet), settings.clap_path / "private",
        known_hosts_file(settings), settings.ssh_hosts, cluster_tags(state))
    return Clap(get_config_db(), node_manager, get_role_manager())


def cluster_tags(state: dict | None) -> dict[str, str]:
    return {"project": PROJECT, "cluster": state["cluster_id"]} if state else {"project": PROJECT}


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
            # A node silent for 15 s is unreachable: a failed run is reported, not waited on.
            "-o ControlMaster=auto -o ControlPersist=60s -o ServerAliveInterval=5 -o ServerAliveCountMax=3 "
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
        return {**shared, "efs_host": settings.efs_host,
                "shutdown_after_minutes": lifetime_minutes(settings, state) if settings.provider == "aws" else 0}
    if action == "run":
        threads = max(1, (os.cpu_count() or 1) // len(state["nodes"])) if settings.provider == "local" else 0
        return {**shared, "master_hostname": state["nodes"][0]["id"], "run_id": run_id,
                "epochs": settings.epochs, "master_port": settings.master_port,
                "run_timeout": settings.run_timeout, "stall_timeout": settings.stall_timeout,
                "app_args": shlex.split(settings.app_args),  # as a shell would; the role quotes each
                "omp_num_threads": threads}
    if action == "results":
        return {"user_dir": settings.user_dir, "results_dir": str(settings.results_dir), "run_id": run_id}
    raise ValueError(action)


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


@contextmanager
def output_to(log: Path | None) -> Iterator[None]:
    """This process's stdout and stderr, and its children's, appended to log (None: left alone)."""
    if log is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    screen = os.dup(1), os.dup(2)
    with open(log, "ab") as sink:  # the descriptors, not sys.stdout: Ansible's children write to them too
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), screen, strict=True):
            os.dup2(saved, fd)
            os.close(saved)


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


# -- the local provider's login key, and the AWS instance template ----------------------
def ensure_local_key(settings: Settings) -> None:
    """The login key of the namespace hosts, made once, private (0600)."""
    key = settings.clap_path / "private" / "local_key"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dcgan-local-cluster",
                        "-f", str(key)], check=True)
    key.chmod(0o600)


def aws_template(settings: Settings) -> tuple[dict, dict, dict]:
    """The instance template of INSTANCE_TYPE, its provider and its login entries."""
    configs = settings.clap_path / "configs"
    template = read_yaml(configs / "instances.yaml")[settings.instance_type]
    return (template, read_yaml(configs / "providers.yaml")[template["provider"]],
            read_yaml(configs / "logins.yaml")[template["login"]])


# -- the nodes, as their providers and CLAP's records know them --------------------
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


# -- a run's logs ------------------------------------------------------------------
def run_folder(settings: Settings, run_id: str) -> str:
    return f"{settings.user_dir}/runs/{run_id}"


def read_run_logs(settings: Settings, state: dict, run_id: str, handles: Clap | None = None) -> dict[int, str]:
    """Every rank's output-<rank>.txt of a run, as it is now."""
    return RunLogs(settings, state, run_id, handles).read()


class RunLogs:
    """Every rank's output-<rank>.txt of a run, read where the shared filesystem is, and each
    read brings only what was written since the last: the cost does not grow with the run.

    On the local cluster that is this machine; elsewhere one SSH command on rank 0
    (no Ansible: this is polled while training runs).
    """

    def __init__(self, settings: Settings, state: dict, run_id: str, handles: Clap | None = None) -> None:
        self.settings, self.state, self.handles = settings, state, handles
        self.folder = run_folder(settings, run_id)
        self.texts: dict[int, str] = {}
        self.sizes: dict[int, int] = {}  # bytes read of each rank's log

    def read(self) -> dict[int, str]:
        if self.settings.provider == "local" and not self.settings.ssh_hosts:
            new = self._read_here()
        else:
            new = self._read_on_master()
        for rank, (size, text) in new.items():
            self.sizes[rank] = size
            self.texts[rank] = self.texts.get(rank, "") + text
        return dict(self.texts)

    def _read_here(self) -> dict[int, tuple[int, str]]:
        new = {}
        for rank in range(len(self.state["nodes"])):
            try:
                with open(Path(self.folder, f"output-{rank}.txt"), "rb") as log:
                    log.seek(self.sizes.get(rank, 0))
                    chunk = log.read()
            except FileNotFoundError:
                continue
            new[rank] = (self.sizes.get(rank, 0) + len(chunk), chunk.decode(errors="replace"))
        return new

    def _read_on_master(self) -> dict[int, tuple[int, str]]:
        self.handles = self.handles or clap(self.settings, self.state)
        from clap.executor import SSHCommandExecutor

        master = self.handles.node_manager.get_nodes_by_id(node_ids(self.state)[:1])
        # Per rank a header with the log's size, then its bytes from where the last read stopped.
        reads = "; ".join(
            f"f=output-{rank}.txt; [ -f $f ] && s=$(stat -c %s $f) && printf '\\n==> {rank} %s <==\\n' $s && "
            f"tail -c +{self.sizes.get(rank, 0) + 1} $f | head -c $((s - {self.sizes.get(rank, 0)}))"
            for rank in range(len(self.state["nodes"])))
        command = f"cd {shlex.quote(self.folder)} 2>/dev/null || exit 0; {reads}; true"
        result = SSHCommandExecutor(command, master, str(self.settings.clap_path / "private"),
                                    connection_timeout=10, execution_timeout=30).run()[master[0].node_id]
        if not result.ok:
            raise UserError(f"cannot read the logs on rank 0 ({result.error}): is the node up? `make status`.")
        parts = re.split(r"\n==> (\d+) (\d+) <==\n", "".join(result.stdout_lines or []))
        return {int(rank): (int(size), text) for rank, size, text in zip(parts[1::3], parts[2::3], parts[3::3],
                                                                          strict=True)}


# -- AWS: our tags, the lifetime cap, the bill -------------------------------------
AWS_ENV_OVERRIDES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                     "AWS_DEFAULT_PROFILE")


@contextmanager
def aws_errors(then: str = "") -> Iterator[None]:
    """Any failed EC2 call inside becomes the one sentence the user sees, plus what `then` says."""
    import aws

    try:
        yield
    except aws.ClientError as error:
        message = aws.refusal(error)
    except aws.BotoCoreError as error:
        message = f"an EC2 call failed ({error})"
    except aws.AwsError as error:
        message = str(error)
    else:
        return
    raise UserError(f"{message}{'; ' + then if then else ''}.")


def aws_client(settings: Settings) -> Any:
    import aws

    with aws_errors():
        return aws.ec2_client_from_clap_config(settings.clap_path, aws_template(settings)[0]["provider"])


def adopt_instances(settings: Settings, state: dict, cloud_ids: list[str]) -> None:
    """Tag the instances as ours (so `status`/`down` find them without any record) and make
    them terminate, not stop, when they shut down (MAX_HOURS)."""
    import aws

    client = aws_client(settings)
    with aws_errors("the nodes are recorded: `make down` terminates them"):
        aws.tag_instances(client, cloud_ids, PROJECT, state["cluster_id"])
        for cloud_id in cloud_ids:
            client.modify_instance_attribute(InstanceId=cloud_id, Attribute="instanceInitiatedShutdownBehavior",
                                             Value="terminate")


def lifetime_minutes(settings: Settings, state: dict) -> int:
    """Minutes until MAX_HOURS after `up` began (at least 1): when each node shuts itself down."""
    return max(1, int(settings.max_hours * 60 - (time.time() - state["created"]) / 60))


def lifetime_command(minutes: int) -> str:
    """A node's own shutdown, in `minutes`; on EC2 adopt_instances makes a shutdown terminate."""
    return f"sudo -n shutdown -h +{minutes}"


AWS_SSH_EVERY_S = 10  # seconds between two SSH attempts on a booting EC2 node


def wait_for_ssh(settings: Settings, handles: Clap, state: dict, ids: list[str]) -> list[str]:
    """The nodes that never answered SSH.

    On AWS a fresh Ubuntu takes minutes to boot: try until BOOT_TIMEOUT, and make each node's
    answer the command that schedules its lifetime cap, so the cap holds from `up` on, even for
    a cluster whose setup never runs. Elsewhere CONNECTION_TRIES tries, 5 s apart.
    """
    if settings.provider != "aws":
        alive = handles.node_manager.is_alive(ids, retries=settings.connection_tries, wait_timeout=5)
        return [node_id for node_id in ids if not alive.get(node_id)]
    say(f"waiting up to BOOT_TIMEOUT={settings.boot_timeout} s for the nodes to answer SSH (a fresh node boots "
        f"for minutes); each answer schedules its shutdown MAX_HOURS={settings.max_hours:g} h after `up`")
    deadline = time.monotonic() + settings.boot_timeout
    waiting = list(ids)
    while True:
        answer = lifetime_command(lifetime_minutes(settings, state))
        alive = handles.node_manager.is_alive(waiting, retries=1, test_command=answer)
        waiting = [node_id for node_id in waiting if not alive.get(node_id)]
        if not waiting or time.monotonic() + AWS_SSH_EVERY_S > deadline:
            return waiting
        time.sleep(AWS_SSH_EVERY_S)


def terminate_nodes(settings: Settings, handles: Clap, state: dict, ids: list[str]) -> None:
    """Terminate these nodes now and drop them from nodes.json and CLAP's records."""
    import aws

    cloud_ids = [node["cloud_id"] for node in state["nodes"] if node["id"] in ids]
    with aws_errors("they stay in nodes.json: `make down` terminates them"):
        aws.terminate_and_wait(aws_client(settings), cloud_ids, timeout=600)
    for node_id in ids:
        handles.node_manager.remove_node(node_id)
    state["nodes"] = [node for node in state["nodes"] if node["id"] not in ids]
    for rank, node in enumerate(state["nodes"]):
        node["rank"] = rank
    write_state(settings, state)


def hourly_cost(settings: Settings, count: int) -> float | None:
    import aws

    template, provider, _ = aws_template(settings)
    try:
        return aws.hourly_cost(template["flavor"], provider["region"], count)
    except aws.AwsError as error:
        warn(str(error))
        return None


def sweep_instances(settings: Settings, state: dict | None) -> list[str]:
    """Terminate every instance tagged with this cluster (or project, when the cluster is unknown)
    and wait until each is really terminated. Returns the ids that were still alive."""
    import aws

    client = aws_client(settings)
    cluster_id = state["cluster_id"] if state else None
    with aws_errors("run `make down` again, or terminate them in the EC2 console"):
        alive = [i["InstanceId"] for i in aws.find_cluster_instances(client, PROJECT, cluster_id)]
        untagged = [i["InstanceId"] for i in untagged_launches(settings, state, client)]
        if untagged:
            warn(f"terminating {len(untagged)} instances of key pair {settings.keypair_name} that `up` started "
                 f"but never tagged: {', '.join(untagged)}")
        try:
            aws.terminate_and_wait(client, alive + untagged, timeout=600)
        except TimeoutError as error:
            raise UserError(f"{error}: run `make down` again, or terminate them in the EC2 console.") from None
    return alive + untagged


def untagged_launches(settings: Settings, state: dict | None, client: Any) -> list[dict]:
    """Instances this cluster's `up` started that carry none of our tags (its start was cut short)."""
    import aws

    if not state or not settings.keypair_name:
        return []  # without the cluster's start time, nothing tells them from the user's other instances
    configs = settings.clap_path / "configs"
    template = read_yaml(configs / "instances.yaml").get(state.get("instance_type", settings.instance_type), {})
    if not template:
        return []
    launch = aws.Launch(settings.keypair_name, str(template["image_id"]), str(template["flavor"]), state["created"])
    return aws.find_untagged_launches(client, launch)


# -- DRY_RUN=1: the plan, and nothing done ---------------------------------------------
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


def short_id(node_id: str) -> str:
    """A node id as the messages show it; a DRY_RUN placeholder whole."""
    return node_id if node_id.startswith("<") else node_id[:8]


def rank_command(settings: Settings, state: dict, extra: dict, per_node: dict) -> str:
    """A rank's command line, rendered by Ansible's own templating from the role's definitions."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar

    defaults = read_yaml(settings.clap_path / "roles" / "roles" / "dcgan_defaults.yaml")
    master = state["nodes"][0]
    facts = {"ansible_play_hosts_all": node_ids(state), "dcgan_master_addr": master["private_address"]}
    templar = Templar(loader=DataLoader(), variables={**defaults, **extra, **per_node, **facts})
    # What the rank's watchdog puts in its environment on the node (rank_watchdog.rank_environment).
    environment = (f"env GLOO_SOCKET_IFNAME=<interface to the master> "
                   f"OMP_NUM_THREADS={extra.get('omp_num_threads') or '<the node cores>'} PYTHONUNBUFFERED=1")
    return f"{environment} {templar.template('{{ dcgan_rank_command }}')}"
