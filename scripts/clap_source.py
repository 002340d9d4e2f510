"""Where CLAP's source comes from: $CLAP, else the CLAP/ submodule.

  fill       (make deps) an empty submodule is filled with `git submodule update --init`,
             so a fresh clone needs no other set-up command; a failure is said, not fatal
             (a step that needs CLAP then says how to get it).
  for-tests  (make test) prints the CLAP checkout the tests drive: $CLAP, the filled
             submodule, or else the pinned source archive kept beside the project
             (../shared/clap/), checked against its sha256 and unpacked once into a
             git-ignored folder. Prints nothing when there is none.

Standard library only: it runs with the machine's Python, before the venv exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The source of the commit the submodule pins, as `git archive` made it (one folder, CLAP/).
ARCHIVE = "CLAP-ee4ad5e6.tar.gz"
ARCHIVE_SHA256 = "3514844228c18929ca8bfcc41964e43c41f84e7a095f23acfec3f81523be2e91"
FETCH_TIMEOUT_S = 300


def is_checkout(path: Path) -> bool:
    return (path / "app" / "cli" / "modules" / "node.py").is_file()


def fill(root: Path) -> str | None:
    """Fill root's empty CLAP submodule; returns what went wrong, or None."""
    if os.environ.get("CLAP") or is_checkout(root / "CLAP"):
        return None
    if not (root / ".git").exists():
        return (f"{root / 'CLAP'} is empty and {root} is not a git clone: clone the project with git "
                f"(git clone --recurse-submodules), or set CLAP=/path/to/a/CLAP/checkout.")
    try:
        done = subprocess.run(["git", "-C", str(root), "submodule", "update", "--init", "CLAP"],
                              capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        done = subprocess.CompletedProcess([], 1, "", f"no answer in {FETCH_TIMEOUT_S} s")
    if done.returncode != 0 or not is_checkout(root / "CLAP"):
        reason = (done.stderr.strip().splitlines() or ["it left CLAP/ empty"])[0]
        return (f"CLAP/ is empty and `git submodule update --init` failed ({reason}): run it again once "
                f"you have network, or set CLAP=/path/to/a/CLAP/checkout.")
    return None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack_archive(archive: Path, target: Path) -> Path:
    """The archive's CLAP/ checkout in target, checked against the pin first, moved in whole."""
    cache = target.parent
    digest = sha256(archive)
    if digest != ARCHIVE_SHA256:
        raise SystemExit(f"{archive} has sha256 {digest}, not the pinned {ARCHIVE_SHA256}: "
                         f"replace it with the pinned archive, or set CLAP=/path/to/a/CLAP/checkout.")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".unpacking-"))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        if not is_checkout(staging / "CLAP"):
            raise SystemExit(f"{archive} holds no CLAP/ checkout: replace it with the pinned archive.")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / "CLAP"


def for_tests(root: Path, archive: Path) -> Path | None:
    if os.environ.get("CLAP"):
        return Path(os.environ["CLAP"])
    if is_checkout(root / "CLAP"):
        return root / "CLAP"
    unpacked = root / ".cache" / f"clap-{ARCHIVE_SHA256[:12]}"
    if is_checkout(unpacked / "CLAP"):
        return unpacked / "CLAP"
    if archive.is_file():
        return unpack_archive(archive, unpacked)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("fill", "for-tests"))
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "clap" / ARCHIVE,
                        help="the pinned source archive the tests fall back on (default %(default)s)")
    args = parser.parse_args(argv)
    if args.action == "fill":
        problem = fill(ROOT)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
        return 0
    checkout = for_tests(ROOT, args.archive)
    print(checkout or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
