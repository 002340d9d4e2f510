"""make all: up, setup, run, results, then down.

On a failure the nodes are kept (so the failed step can be fixed and re-run
alone) and the exit status is non-zero.
"""

from __future__ import annotations

import argparse

import common
import down
import results
import run
import setup
import up
from common import UserError

STEPS = (("up", up), ("setup", setup), ("run", run), ("results", results))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    if common.load_settings().dry_run:
        status = up.main([])
        print("DRY RUN: then setup, run, results and down on those nodes (`DRY_RUN=1 make <step>` shows "
              "each once the nodes exist).")
        return status
    for name, step in STEPS:
        try:
            status = step.main([])
        except UserError as error:
            common.fail(str(error))
            status = 1
        if status != 0:
            common.fail(f"`make all` stopped at `{name}`. The nodes are KEPT and still running.\n"
                        f"  resume:   make {' '.join(n for n, _ in STEPS[STEPS.index((name, step)):])} down\n"
                        f"  or stop:  make down")
            return status
    return down.main([])


if __name__ == "__main__":
    common.main_guard(main)
