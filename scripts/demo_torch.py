"""torch for the local demo and the tests: installed on first local use (or by `make test`), with the
bytecode every rank reads written at once.

`make deps` leaves torch out (the AWS path does not need it, and PyPI's Linux build is the multi-GB
CUDA one) and installs its own requirements without compiling them. torch's dependencies that
those already brought (sympy, numpy, mpmath, through moto and matplotlib) are then not compiled by
pip, and every rank imports them (DistributedDataParallel loads torch._dynamo, which loads sympy):
the first run would compile them, 2.8 s more to its first iteration on one node, and a sample taken
in that run would predict the start of a run that compiles. So they are imported once here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from config import ROOT
from output import UserError, main_guard, say

REQUIREMENTS = ROOT / "requirements-local.txt"
RANK_IMPORTS = "import torch, torch.distributed, torch._dynamo"  # what a rank has loaded by its first iteration


def install_if_missing(requirements: Path = REQUIREMENTS) -> None:
    """The local steps' first use: install torch when this venv has none."""
    if not importlib.util.find_spec("torch"):
        say(f"installing torch for the local demo, once ({requirements.name})")
        install(requirements)


def install(requirements: Path = REQUIREMENTS) -> None:
    """pip install requirements, then write the bytecode of what a rank imports."""
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        words = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or ["pip failed"]
        raise UserError(f"pip could not install torch for the local demo ({words[0]}): for its CPU build on Linux "
                        f"x86_64 add PyTorch's index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), "
                        f"or set DCGAN_PYTHON to a Python that has torch.")
    write_rank_bytecode()


def write_rank_bytecode() -> None:
    """Import what a rank imports, writing its bytecode whatever PYTHONDONTWRITEBYTECODE says here."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", RANK_IMPORTS], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"torch is installed but `{RANK_IMPORTS}` fails in {sys.executable} ({last}): "
                        f"reinstall it with `{sys.executable} -m pip install --force-reinstall "
                        f"-r {REQUIREMENTS.name}`.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("requirements", type=Path, nargs="?", default=REQUIREMENTS,
                        help="the file that pins torch (requirements-local.txt)")
    install(parser.parse_args(argv).requirements)
    return 0


if __name__ == "__main__":
    main_guard(main)
