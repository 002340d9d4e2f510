"""The settings, as every step reads them.

One path for every setting: its default in vars.sh, then .env, then the
environment (which `make NAME=value` sets); validated here, once, with the
sentence the user sees.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from output import UserError

ROOT = Path(__file__).resolve().parent.parent
PROGRESS_EVERY_S = 10  # seconds between two progress reports of a run
SAMPLE_AT_LEAST = 8  # a sweep's sample: 3 warm-up iterations (predict.py), then 5 steps for a pace and a spread

EFS_FSTYPES = ("nfs4", "fuse.sshfs")  # the filesystems the role's EFS tasks mount (and install the client of)
CLOUD_LIKE = {  # as on AWS: the app and data on the (stand-in) EFS, the app in Docker
    "RUNNER": "docker",
    "EFS_MOUNT_POINT": "/home/ubuntu/efs",
    "USER_DIR": "{EFS_MOUNT_POINT}/dcgan",
    "DCGAN_DIR": "{USER_DIR}/Distributed-DCGAN",
    "CIFAR_DATA_DIR": "{EFS_MOUNT_POINT}/data/cifar10",
    "DCGAN_PYTHON": "python3",
}
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
    "aws": {"INSTANCE_TYPE": "type-t2.medium", **CLOUD_LIKE},
}
VM_FLAVOR = "vm"  # the local provider's cloud-like nodes (local_vm.py)


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
    efs_fstype: str
    efs_mount_options: str
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
    market: str
    spot_max_price: str
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
    sample_iterations: int  # 0: every sweep point runs in full
    validate: bool
    deadline_minutes: float | None
    budget_usd: float | None
    user_set: frozenset[str] = field(default_factory=frozenset)  # the names the user set
    cloud_like: bool = False  # local nodes of the vm flavor: a whole OS each, an EFS stand-in, Docker

    @property
    def synthetic_data(self) -> bool:
        """The local cluster with no data of the user's: we make a synthetic set."""
        return self.provider == "local" and "CIFAR_DATA_DIR" not in self.user_set

    @property
    def shares_this_filesystem(self) -> bool:
        """The nodes see this machine's files (namespace hosts): their paths are paths here."""
        return self.provider == "local" and not self.ssh_hosts and not self.cloud_like

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


def _market(value: str) -> str:
    if value not in ("on-demand", "spot"):
        raise UserError(f"MARKET={value!r} is unknown: use MARKET=on-demand or MARKET=spot.")
    return value


def _spot_max_price(value: str) -> str:
    if not value:
        return value  # EC2's default
    try:
        price = float(value)
    except ValueError:
        price = -1
    if not 0 < price < float("inf"):
        raise UserError(f"SPOT_MAX_PRICE={value!r} must be US dollars per hour above 0: set it like "
                        f"SPOT_MAX_PRICE=0.05, or leave it empty for EC2's default (the on-demand price).")
    return value


def _app_args(value: str) -> str:
    try:
        shlex.split(value)
    except ValueError as error:
        raise UserError(f"APP_ARGS={value!r} does not split into arguments ({error}): close the quote.") from None
    return value


def _efs_fstype(value: str) -> str:
    if value not in EFS_FSTYPES:
        raise UserError(f"EFS_FSTYPE={value!r} is unknown: use EFS_FSTYPE=nfs4 (EFS, NFS 4.1) or EFS_FSTYPE=fuse.sshfs "
                        f"(a shared folder served over SFTP).")
    return value


def _sizes(value: str) -> list[int]:
    sizes = []
    for part in value.split(","):
        if not part.strip().isdigit() or int(part) < 1:
            raise UserError(f"SIZES={value!r} must list whole numbers of nodes above 0, comma-separated: "
                            f"set it like SIZES=1,2,4.")
        sizes.append(int(part))
    return sorted(set(sizes))


def _dollars(name: str, value: str, example: str) -> float:
    try:
        dollars = float(value)
    except ValueError:
        dollars = -1
    if not 0 <= dollars < float("inf"):
        raise UserError(f"{name}={value!r} must be a number of US dollars: set it like {name}={example}.")
    return dollars


def _minutes(value: str) -> float:
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1
    if not 0 < minutes < float("inf"):
        raise UserError(f"DEADLINE={value!r} must be a number of minutes above 0: set it like DEADLINE=30.")
    return minutes


def _sample_iterations(raw: dict[str, str]) -> int:
    if not raw["SAMPLE_ITERATIONS"].strip():
        return 0
    iterations = _whole(raw, "SAMPLE_ITERATIONS", 0, "20")
    if 0 < iterations < SAMPLE_AT_LEAST:
        raise UserError(f"SAMPLE_ITERATIONS={iterations} must be at least {SAMPLE_AT_LEAST} (or 0, no sample): "
                        f"past the 3 slower first ones, fewer steps show no pace or spread; "
                        f"set it like SAMPLE_ITERATIONS=20.")
    return iterations


def _validate(raw: dict[str, str]) -> bool:
    validate = raw["VALIDATE"].strip() not in ("", "0")
    if validate and not _sample_iterations(raw):
        raise UserError("VALIDATE=1 compares each point's prediction with its full run: set SAMPLE_ITERATIONS too, "
                        "like SAMPLE_ITERATIONS=20.")
    return validate


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
    clap_path = (ROOT / raw["CLAP_PATH"]).resolve()
    cloud_like = provider == "local" and _flavor(clap_path, raw["INSTANCE_TYPE"]) == VM_FLAVOR
    if cloud_like:
        for name, default in CLOUD_LIKE.items():
            if name not in user_set:
                raw[name] = default
    for name in ("EFS_MOUNT_POINT", "USER_DIR", "DCGAN_DIR", "CIFAR_DATA_DIR"):
        raw[name] = raw[name].format(**raw)
    if raw["RUNNER"] not in ("native", "docker"):
        raise UserError(f"RUNNER={raw['RUNNER']!r} is unknown: use RUNNER=native or RUNNER=docker.")

    def local_path(name: str) -> str:
        # On namespace hosts the nodes share this machine's filesystem: resolve here.
        return str(Path(raw[name]).resolve()) if provider == "local" and not cloud_like else raw[name]

    return Settings(
        provider=provider,
        nodes=_whole(raw, "NODES", 1, "2"),
        instance_type=raw["INSTANCE_TYPE"],
        epochs=_whole(raw, "EPOCHS", 1, "2"),
        results_dir=Path(raw["RESULTS_DIR"]).resolve(),
        nodes_file=Path(raw["NODES_FILE"]).resolve(),
        runner=raw["RUNNER"],
        efs_host=raw["EFS_HOST"],
        efs_fstype=_efs_fstype(raw["EFS_FSTYPE"].strip()),
        efs_mount_options=raw["EFS_MOUNT_OPTIONS"].strip(),
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
        market=_market(raw["MARKET"].strip()),
        spot_max_price=_spot_max_price(raw["SPOT_MAX_PRICE"].strip()),
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
        max_sweep_cost=_dollars("MAX_SWEEP_COST", raw["MAX_SWEEP_COST"], "5"),
        sample_iterations=_sample_iterations(raw),
        validate=_validate(raw),
        deadline_minutes=_minutes(raw["DEADLINE"]) if raw["DEADLINE"].strip() else None,
        budget_usd=_dollars("BUDGET", raw["BUDGET"], "2") if raw["BUDGET"].strip() else None,
        user_set=user_set,
        cloud_like=cloud_like,
    )


def _flavor(clap_path: Path, instance_type: str) -> str:
    """The flavor of an instance template; empty when it cannot be read (the steps' own check of the
    CLAP files then names the problem)."""
    try:
        template = yaml.safe_load((clap_path / "configs" / "instances.yaml").read_text()).get(instance_type)
        return str(template.get("flavor", ""))
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
