"""Fused GPU kernels (Triton). A kernel module is imported only through a `KernelRoute`: importing
it needs Triton, which CPU-only installs lack, and its callers must then take their PyTorch path."""

from __future__ import annotations

import importlib
import warnings


def optional(module: str, fallback: str):
    """The kernel module `module` (a dotted name), or False (with one warning naming `fallback`)
    where Triton is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        warnings.warn(f"Triton is not available ({e}); {fallback}", stacklevel=5)
        return False


class KernelRoute:
    """Which tensors a kernel module serves: those on a device type in `devices` (tests add "cpu"
    with an interpreted copy set as `module`). The module is imported on first use, so a process
    that never meets such a tensor never imports Triton; where it is missing, `fallback` is said
    once and the PyTorch path serves for the rest of the process."""

    def __init__(self, module: str, fallback: str, devices=("cuda",)) -> None:
        self.name, self.fallback, self.devices = module, fallback, set(devices)
        self.module = None  # the module once imported; False where Triton is missing

    def load(self):
        """The kernel module, or None where Triton is missing."""
        if self.module is None:
            self.module = optional(self.name, self.fallback)
        return self.module or None

    def on(self, device_type: str):
        """The kernel module for tensors on `device_type`, or None: the caller's PyTorch path."""
        return self.load() if device_type in self.devices else None
