"""Measured activation memory: one definition for every command.

- `activation_bytes`: bytes autograd saves for backward over one training step. Each
  underlying storage counts once (views and repeated saves share memory). Parameters
  and views of them are excluded: they exist whether or not a backward is pending.
- `weight_cast_bytes`: saved tensors that are casts of a parameter (under autocast,
  nn.Linear keeps a bf16 copy of its weight; BasisLinear keeps the fp32 parameter).
  Same rule for every layer type, reported apart from `activation_bytes` so that layer
  types that save a cast and those that re-cast in backward compare fairly.
- `activation_breakdown`: `activation_bytes` split by category (CATEGORIES), from the
  module that was running when the tensor was saved.
- `step_peak_bytes`: the CUDA allocator's peak over one steady-state step minus what was
  allocated when it began (None on CPU). The caller picks a step after warm-up.

A saved tensor is a cast of a parameter when its storage holds as many elements as that
parameter, in another dtype, and equals the parameter cast to that dtype (in the
parameter's layout or, for matrices, transposed). The check compares values, so it costs
a device sync per candidate: it runs on one measured step per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
from torch import nn

from basis_train.core.options import MEMORY_CATEGORIES as CATEGORIES

# Storages marked by layers whose saved tensors cannot be told apart by module alone
# (the fused BASIS head keeps both x and its sketch). Only filled while a meter runs.
_marks: dict[tuple[str, int], str] = {}
_active = 0


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def mark(t: torch.Tensor, category: str) -> None:
    """Tell a running meter which category `t`'s storage belongs to (no-op otherwise)."""
    if _active:
        _marks[_storage_key(t)] = category


def _storage_tensor(t: torch.Tensor) -> torch.Tensor:
    s = t.untyped_storage()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(s, 0, (s.nbytes() // t.element_size(),))


class SavedTensorMeter:
    """Counts what autograd saves; `model` gives the parameters and, through its
    `memory_categories()` (core/model.py's GPT), the category of what each submodule saves:
    ({module name: category}, the module after which the root's own saves are the loss's).
    A model without it, or `params` alone, counts everything as "other"."""

    def __init__(self, model: nn.Module | None = None, params: Iterable[torch.Tensor] = ()) -> None:
        self.params = [p.detach() for p in (model.parameters() if model is not None else params)]
        self._param_keys = {_storage_key(p) for p in self.params}
        self._categories, self._head_after = (model.memory_categories() if hasattr(model, "memory_categories")
                                              else ({}, None))
        self._storages: dict[tuple[str, int], tuple[str, int]] = {}  # key -> (category, bytes)
        self._stack: list[tuple[str, nn.Module]] = []
        self._after_head_input = False
        self._model = model

    def _is_cast(self, t: torch.Tensor) -> bool:
        n = t.untyped_storage().nbytes() // t.element_size()
        for p in self.params:
            if p.numel() != n or p.dtype == t.dtype or p.device != t.device:
                continue
            flat = _storage_tensor(t)
            cast = p.to(t.dtype)
            if torch.equal(flat, cast.reshape(-1)) or (p.dim() == 2 and torch.equal(flat, cast.t().reshape(-1))):
                return True
        return False

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Always hand autograd a detached alias: a saved *output* packed as itself keeps its own
        # grad_fn alive through a cycle in C++ that Python's gc cannot see, so a measured forward
        # without a backward would leak the whole graph (and its AccumulateGrad nodes, which then
        # break a later CUDA-graph capture on another stream).
        if not t.numel() or t.layout != torch.strided:
            return t.detach()
        key = _storage_key(t)
        if key in self._param_keys or key in self._storages:
            return t.detach()
        nbytes = t.untyped_storage().nbytes()
        if self._is_cast(t):
            category = "weight_cast"
        elif key in _marks:
            category = _marks[key]
        else:
            category = self._category(t)
        self._storages[key] = (category, nbytes)
        return t.detach()

    def _category(self, t: torch.Tensor) -> str:
        from basis_train.core.sketch import BasisLinear

        name, module = self._stack[-1] if self._stack else ("", None)
        if isinstance(module, BasisLinear):  # it keeps nothing but its sketch and its seed (and the weight)
            return "seeds" if t.dim() == 0 and not t.is_floating_point() else "sketches"
        if name == "" and self._after_head_input:
            return "head"  # the root after the head's input: the loss's log-softmax
        return self._categories.get(name, "other")

    def _bytes(self, pick) -> int:
        return sum(nb for cat, nb in self._storages.values() if pick(cat))

    @property
    def activation_bytes(self) -> int:
        return self._bytes(lambda c: c != "weight_cast")

    @property
    def weight_cast_bytes(self) -> int:
        return self._bytes(lambda c: c == "weight_cast")

    @property
    def breakdown(self) -> dict[str, int]:
        return {c: self._bytes(lambda x, c=c: x == c) for c in CATEGORIES}

    def fields(self) -> dict:
        return {"activation_bytes": self.activation_bytes, "weight_cast_bytes": self.weight_cast_bytes,
                "activation_breakdown": self.breakdown}

    def _hooks(self) -> list:
        if self._model is None:
            return []

        def pre(name, module):
            def hook(*_):
                self._stack.append((name, module))
            return hook

        def post(name):
            def hook(*_):
                if self._stack:
                    self._stack.pop()
                if name == self._head_after:  # what the root saves from here on is the loss's
                    self._after_head_input = True
            return hook

        handles = []
        for name, module in self._model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre(name, module)))
                handles.append(module.register_forward_hook(post(name)))
        return handles

    @contextmanager
    def measure(self):
        global _active
        handles = self._hooks()
        _active += 1
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            _active -= 1
            if not _active:
                _marks.clear()
            for h in handles:
                h.remove()
            self._stack.clear()
            self._after_head_input = False


def step_peak_bytes(step: Callable[[], object], device: torch.device) -> int | None:
    """Allocator peak during `step()` minus what was allocated before it; None off CUDA.

    Only meaningful after warm-up: a first step also allocates optimizer state and
    library workspaces, which are not the step's working memory."""
    if device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
