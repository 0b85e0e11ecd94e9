"""What a result file records of how it was made: the command line, as a user would type it again, the
commit of the checkout that ran it, and the processor it ran on."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from pathlib import Path


def command_line(spec, file: str) -> str:
    """`spec`, `file`: the calling module's __spec__ and __file__. Under `python -m`, argv[0] is the module's
    file path on the machine that ran it, so the command names the module instead; a console script
    (`basis-bench`) is named without its install path; a script run by its path (scripts/*.py, no spec)
    as `python PATH`."""
    if spec is None:
        head = ["python", sys.argv[0]]
    else:
        head = ["python", "-m", spec.name] if sys.argv[0] == file else [Path(sys.argv[0]).name]
    return shlex.join([*head, *sys.argv[1:]])


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The short hash of the checkout's HEAD; None outside a git checkout or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd)
    except OSError:
        return None
    return out.stdout.strip() or None


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The processor's model name as the kernel reports it ("AMD EPYC 7B13"), with the architecture.

    platform.processor() is empty or just the architecture ("x86_64") on Linux, which says nothing
    about the machine a CPU timing ran on. Elsewhere (no /proc/cpuinfo) that is all there is."""
    arch = platform.machine() or "?"
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return platform.processor() or arch
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    return f"{arch}, {name}" if name else arch
