"""What the course puts on its EFS before `make setup`, put on the local EFS stand-in.

On AWS the user clones the app into their folder on the EFS and extracts CIFAR-10
beside it. For the cloud-like local nodes (INSTANCE_TYPE=type-local-vm) the stand-in's
export folder is on this machine, so `make setup` places there, once, what is not there
yet: the synthetic data set (unless CIFAR_DATA_DIR is the user's) and the demo app
with its Dockerfile and the torch wheels its image installs (unless DCGAN_DIR is the
user's: then their clone must already be there, as on AWS).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

from config import ROOT, Settings
from local_hosts import LocalHosts
from local_tree import CACHE
from output import UserError, say

DEMO = ROOT / "demo"
DEMO_FILES = ("dist_dcgan.py", "make_cifar.py", "Dockerfile")
WHEELS = CACHE / "wheels"
# The nodes' Python (Debian 12's) and machine: the wheels their image installs must fit them, not this venv.
NODE_WHEEL_TARGET = ("--python-version", "3.11", "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
                     "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64")
NODE_MARKERS = {"sys_platform": "linux", "platform_machine": "x86_64"}  # the same, for requirements' markers


def export_dir(settings: Settings) -> Path:
    """The stand-in's export folder."""
    return LocalHosts(settings.local_dir, settings.local_subnet).efs_export


def on_export(settings: Settings, node_path: str) -> Path | None:
    """Where a path of the nodes' shared filesystem lies on this machine (None: not on it)."""
    try:
        relative = PurePosixPath(node_path).relative_to(settings.efs_mount_point)
    except ValueError:
        return None
    return export_dir(settings) / relative


def check_app(settings: Settings) -> None:
    """A DCGAN_DIR of the user's is on the stand-in, with the app in it."""
    app = on_export(settings, settings.dcgan_dir)
    if app is None:
        raise UserError(f"DCGAN_DIR={settings.dcgan_dir} is not on the shared filesystem "
                        f"(EFS_MOUNT_POINT={settings.efs_mount_point}): point it below that folder.")
    if "DCGAN_DIR" in settings.user_set and not (app / "dist_dcgan.py").is_file():
        raise UserError(f"DCGAN_DIR={settings.dcgan_dir} is {app} on this machine's EFS stand-in, which has no "
                        f"dist_dcgan.py: clone eborin/Distributed-DCGAN there (as on the course's EFS).")


def stage(settings: Settings) -> None:
    """The data and the demo app on the stand-in, where they are missing or out of date."""
    export_dir(settings).mkdir(mode=0o755, parents=True, exist_ok=True)
    if settings.synthetic_data:
        make_synthetic_data(settings, on_export(settings, settings.cifar_data_dir))
    if "DCGAN_DIR" not in settings.user_set:
        app = on_export(settings, settings.dcgan_dir)
        app.mkdir(parents=True, exist_ok=True)
        for name in DEMO_FILES:
            if not (app / name).exists() or (app / name).read_bytes() != (DEMO / name).read_bytes():
                shutil.copy(DEMO / name, app / name)
        copy_wheels(app / "wheels")


def make_synthetic_data(settings: Settings, out: Path | str) -> None:
    """The synthetic CIFAR-10 test set, made once (make_cifar.py does nothing when it is there)."""
    subprocess.run([sys.executable, str(DEMO / "make_cifar.py"), "--out", str(out),
                    "--test-images", str(settings.synthetic_images)], check=True)


def node_torch_pin(requirements: Path) -> str:
    """The torch pin of `requirements` whose marker holds on the nodes (Linux x86_64: the CPU build)."""
    from packaging.requirements import Requirement

    for line in requirements.read_text().splitlines():
        if line.startswith("torch"):
            torch = Requirement(line)
            if torch.marker is None or torch.marker.evaluate(NODE_MARKERS):
                return f"{torch.name}{torch.specifier}"
    raise UserError(f"{requirements} pins no torch for Linux x86_64: pin one there (torch==<version>+cpu).")


def copy_wheels(target: Path) -> None:
    """The torch of requirements-local.txt and what it needs, as wheels for the nodes' Python."""
    pin = node_torch_pin(ROOT / "requirements-local.txt")
    stamp = WHEELS / pin
    if not stamp.exists():
        say(f"fetching the wheels of {pin} for the nodes' image (once)")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELS), *NODE_WHEEL_TARGET,
                               pin], capture_output=True, text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"pip could not fetch {pin} for the nodes' image ({reason}): check this machine's "
                            f"access to the package index, then `make setup` again.")
        stamp.touch()
    target.mkdir(exist_ok=True)
    for wheel in WHEELS.glob("*.whl"):
        if not (target / wheel.name).exists():
            shutil.copy(wheel, target / wheel.name)
