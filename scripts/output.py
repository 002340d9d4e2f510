"""The user's messages, in one voice for every step, and a step's output sent to its log.

`say` for progress, `warn` and `fail` on stderr, coloured only on a terminal (NO_COLOR=1 turns
colour off); `main_guard` runs a step and turns a UserError into its one sentence and exit 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake the user can fix; its message is the one sentence they see."""


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
