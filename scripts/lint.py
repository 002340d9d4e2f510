"""make lint: ruff on the Python, yamllint on every YAML file, ansible-lint on the playbooks."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOKS = ROOT / "clap_config" / "roles" / "roles"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    bin_dir = Path(sys.executable).parent
    checks = [
        [str(bin_dir / "ruff"), "check", "."],
        [str(bin_dir / "yamllint"), "--strict", "."],
        [str(bin_dir / "ansible-lint"), "--offline", "-q", *sorted(str(p) for p in PLAYBOOKS.glob("dcgan_*.yaml"))],
    ]
    # ansible-lint runs ansible-playbook --syntax-check, and warns unless this venv's bin is on PATH.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    failed = [check[0] for check in checks if subprocess.run(check, cwd=ROOT, env=env).returncode != 0]
    if failed:
        print(f"lint failed: {', '.join(Path(f).name for f in failed)}", file=sys.stderr)
        return 1
    print("lint: ruff, yamllint, ansible-lint clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
