"""make deps: put the Ansible collections the role uses into this venv, and only them.

The role needs one module outside ansible-core, ansible.posix.mount. Collections are not on
PyPI one by one, and Ansible Galaxy is not always reachable; the `ansible` bundle on PyPI holds
them all. pip downloads the bundle's wheel pinned (with its hash) in the requirements file given,
and only COLLECTIONS are unpacked into site-packages/ansible_collections/, where Ansible and
ansible-lint find them (Ansible scans sys.path for collections).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

COLLECTIONS = ("ansible/posix",)


def install(requirements: Path, site_packages: Path) -> list[str]:
    """Unpack COLLECTIONS from the bundle pinned in `requirements`; returns the collections installed."""
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", download,
                        "-r", str(requirements)], check=True)
        wheel = next(Path(download).glob("ansible-*.whl"))
        with zipfile.ZipFile(wheel) as bundle:
            for collection in COLLECTIONS:
                prefix = f"ansible_collections/{collection}/"
                shutil.rmtree(site_packages / prefix, ignore_errors=True)  # an earlier version's files
                members = [name for name in bundle.namelist() if name.startswith(prefix)]
                if not members:
                    raise SystemExit(f"{wheel.name} has no collection {collection}: pin a bundle that has it "
                                     f"in {requirements}.")
                bundle.extractall(site_packages, members)
    return [collection.replace("/", ".") for collection in COLLECTIONS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("requirements", type=Path, help="the file that pins the bundle (requirements-collections.txt)")
    args = parser.parse_args(argv)
    installed = install(args.requirements, Path(sysconfig.get_paths()["purelib"]))
    print(f"collections: {', '.join(installed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
