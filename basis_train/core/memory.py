"""Measured activation memory: bytes saved for backward, and the CUDA allocator's peak.

`SavedTensorMeter` sees every tensor autograd keeps for backward through
`torch.autograd.graph.saved_tensors_hooks`. It counts each underlying storage once
(views and repeated saves of one tensor share memory) and skips parameter storage,
which exists whether or not a backward pass is pending. What remains is the memory a
training step holds between forward and backward because of the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


class SavedTensorMeter:
    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_key(p) for p in exclude}
        self._storages: dict[tuple[str, int], int] = {}
        self.by_shape: dict[tuple, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() and t.layout == torch.strided:
            key = _storage_key(t)
            if key not in self._excluded and key not in self._storages:
                nbytes = t.untyped_storage().nbytes()
                self._storages[key] = nbytes
                shape = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
                self.by_shape[shape] = self.by_shape.get(shape, 0) + nbytes
        return t

    @property
    def total_bytes(self) -> int:
        return sum(self._storages.values())

    @contextmanager
    def measure(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def saved_bytes(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes saved for backward by `forward()` (which returns the loss), and that loss."""
    meter = SavedTensorMeter(exclude=model.parameters())
    with meter.measure():
        loss = forward()
    return meter.total_bytes, loss


def cuda_step_peak(step: Callable[[], object], device: torch.device) -> int:
    """Allocator peak during `step()` minus what was allocated before it (bytes)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
