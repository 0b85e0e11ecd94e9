"""The command line a result file records, as a user would type it again."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line(spec, file: str) -> str:
    """`spec`, `file`: the calling module's __spec__ and __file__. Under `python -m`, argv[0] is the module's
    file path on the machine that ran it, so the command names the module instead; a console script
    (`basis-bench`) is named without its install path."""
    head = ["python", "-m", spec.name] if spec and sys.argv[0] == file else [Path(sys.argv[0]).name]
    return shlex.join([*head, *sys.argv[1:]])
