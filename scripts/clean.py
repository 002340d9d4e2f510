"""make clean: remove the venv and what the local cluster generated, never a result.

Refuses while nodes.json lists nodes: `make down` first, so nothing is left running.
Runs with the system Python (the venv may be what is removed), so stdlib only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("venv", type=Path, nargs="?", default=ROOT / ".venv")
    args = parser.parse_args(argv)
    nodes_file = ROOT / "nodes.json"
    if nodes_file.exists():
        try:
            listed = json.loads(nodes_file.read_text()).get("nodes")
        except ValueError:
            listed = True
        if listed:
            print(f"error: {nodes_file.name} lists nodes: run `make down` before `make clean`.", file=sys.stderr)
            return 1
    doomed = [args.venv, ROOT / ".cluster", ROOT / ".cache", ROOT / ".ruff_cache", ROOT / ".pytest_cache",
              *ROOT.glob("**/__pycache__")]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    print(f"removed {args.venv.name}, .cluster and caches; {ROOT / 'results'} is kept.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
