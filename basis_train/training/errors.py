"""What a run tells its user: a RunError is one line and exit 2; a warning is one line and goes on."""

from __future__ import annotations

import os
import sys


class RunError(Exception):
    """A user-facing problem with a run (bad input, unusable output dir): one line."""


def warn(message: str) -> None:
    """One line on stderr, also under --quiet (a warning is never noise); process 0 only under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    """An exception as '<Type>: <its first line>', for errors that wrap another."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
