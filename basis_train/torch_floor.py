"""The oldest torch this package supports, checked once by every command.

2.11 is the oldest torch the code has run on (the GPU results were produced with
2.11.0+cu130; CI runs 2.13). Older releases lack, among others, a stable
`CUDAGraph.register_generator_state` (first merged after March 2024, so not before 2.4)
and were never tested here, so they are refused with one line rather than failing
somewhere inside a run.
"""

from __future__ import annotations

import re
from importlib import metadata

MIN_TORCH = "2.11"
# The first torch whose selective checkpoint hands its policy the op's output (SelectiveCheckpointContext.op_output),
# which core/saved_activations.py needs to tell the memory meter what a selective checkpoint caches.
SELECTIVE_CACHE_COUNTED_FROM = "2.13"


def installed_torch() -> str | None:
    """torch's version from its package metadata: importing torch (1-2 s) just to check it
    would slow every command's start, --help included."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version; the local part (+cu130) and a pre-release
    (2.14.0a0) count as that release."""
    major, minor = re.match(r"(\d+)\.(\d+)", version or installed_torch() or "0.0").groups()
    return int(major), int(minor)


def torch_problem(version: str | None = None) -> str | None:
    """One line saying why this torch cannot be used, or None."""
    version = version or installed_torch()
    if version is None:
        return f"basis-train needs torch >= {MIN_TORCH}, and none is installed (pip install torch)"
    if torch_release(version) < torch_release(MIN_TORCH):
        return f"basis-train needs torch >= {MIN_TORCH}; this is torch {version} (pip install -U torch)"
    return None


def counts_selective_cache(version: str) -> bool:
    """Whether the memory meter under torch `version` counts a selective checkpoint's cached outputs."""
    return torch_release(version) >= torch_release(SELECTIVE_CACHE_COUNTED_FROM)
