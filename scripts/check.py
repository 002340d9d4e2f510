"""make check: everything that can be checked before a node starts or money is spent.

Settings, CLAP's files, RESULTS_DIR; on the local cluster root, tools, app and
data; on AWS the keys, then EC2: the credentials, key pair, AMI and security group,
and a DryRun of each call `up` and `down` make. `make up` runs the same checks first.
"""

from __future__ import annotations

import argparse

import checks
import config
import output


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    checks.preflight(settings)
    output.say(f"ready: {settings.nodes} x {settings.instance_type} on {settings.provider}, "
               f"runner {settings.runner}, {settings.epochs} epochs, results to {settings.results_dir}")
    return 0


if __name__ == "__main__":
    output.main_guard(main)
