"""Fused GPU kernels of the sketch and of fleets (Triton). Import `sketch_triton`, `sketch_gather`,
`fleet_bins` or `fleet_sgd` only where Triton is installed, or through `optional`."""

import importlib
import warnings


def optional(name: str, fallback: str):
    """The kernel module `name`, or False (with one warning naming `fallback`) where Triton is missing:
    its callers then take their PyTorch path for the rest of the process."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        warnings.warn(f"Triton is not available ({e}); {fallback}", stacklevel=4)
        return False
