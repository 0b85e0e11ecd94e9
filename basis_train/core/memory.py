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
_running: list[SavedTensorMeter] = []  # the meters measuring now, innermost last


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def mark(t: torch.Tensor, category: str) -> None:
    """Tell a running meter which category `t`'s storage belongs to (no-op otherwise)."""
    if _running:
        _marks[_storage_key(t)] = category


def note_kept(out: object) -> None:
    """Tell a running meter that the tensors in `out` (a tensor or a tuple) are kept for backward
    outside autograd's saved tensors, which its hooks never see: a selective checkpoint's cached
    matmul outputs (core/saved_activations.py). No-op when no meter runs."""
    if _running:
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                _running[-1].record(t, t, output=True)


def _storage_tensor(t: torch.Tensor) -> torch.Tensor:
    s = t.untyped_storage()
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(s, 0, (s.nbytes() // t.element_size(),))


class ParamSet:
    """A model's parameters, to tell them, views of them and casts of them from activations: one rule
    for the meter and for what core/saved_activations.py may compress or offload."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = [p.detach() for p in params]
        self._keys = {_storage_key(p) for p in self.params}

    def is_param(self, t: torch.Tensor) -> bool:
        return _storage_key(t) in self._keys

    def _candidates(self, t: torch.Tensor) -> list[torch.Tensor]:
        n = t.untyped_storage().nbytes() // t.element_size()
        return [p for p in self.params if p.numel() == n and p.dtype != t.dtype and p.device == t.device]

    def may_be_cast(self, t: torch.Tensor) -> bool:
        """Whether `is_cast` has to compare values (a device sync): a parameter has `t`'s element count."""
        return bool(self._candidates(t))

    def is_cast(self, t: torch.Tensor) -> bool:
        for p in self._candidates(t):
            flat = _storage_tensor(t)
            cast = p.to(t.dtype)
            if torch.equal(flat, cast.reshape(-1)) or (p.dim() == 2 and torch.equal(flat, cast.t().reshape(-1))):
                return True
        return False


class SavedTensorMeter:
    """Counts what autograd saves; `model` gives the parameters and, through its
    `memory_categories()` (core/model.py's GPT), the category of what each submodule saves:
    ({module name: category}, the module after which the root's own saves are the loss's).
    A model without it, or `params` alone, counts everything as "other".

    `saving`: the step's method for saved tensors (core/saved_activations.py's SavedActivations),
    whose hooks the meter's replace (only the innermost saved-tensor hooks apply): the meter then
    installs the method's own hooks and counts what each pack keeps, the packed form's bytes, on
    the device (`activation_bytes`) or moved off it (`offloaded_bytes`)."""

    def __init__(self, model: nn.Module | None = None, params: Iterable[torch.Tensor] = (), saving=None) -> None:
        self.params = ParamSet(model.parameters() if model is not None else params)
        self._categories, self._head_after = (model.memory_categories() if hasattr(model, "memory_categories")
                                              else ({}, None))
        self._storages: dict[tuple[str, int], tuple[str, int]] = {}  # key -> (category, bytes)
        self._offloaded: dict[tuple[str, int], int] = {}
        self._stack: list[tuple[str, nn.Module]] = []
        self._after_head_input = False
        self._model, self.saving = model, saving

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        # Always hand autograd a detached alias: a saved *output* packed as itself keeps its own
        # grad_fn alive through a cycle in C++ that Python's gc cannot see, so a measured forward
        # without a backward would leak the whole graph (and its AccumulateGrad nodes, which then
        # break a later CUDA-graph capture on another stream).
        kept = t.detach()
        self.record(t, kept)
        return kept

    def record(self, t: torch.Tensor, packed: object, output: bool = False) -> None:
        """Count what autograd keeps of the saved tensor `t`: `packed`, `t` itself (an alias) or
        what a saving method packed it into (a tuple holding tensors). Each storage counts once.
        `output`: `t` is the output of the running module (a selective checkpoint's cache)."""
        for kept in packed if isinstance(packed, tuple) else (packed,):
            if not isinstance(kept, torch.Tensor) or not kept.numel() or kept.layout != torch.strided:
                continue
            key = _storage_key(kept)
            if self.params.is_param(kept) or key in self._storages or key in self._offloaded:
                continue
            nbytes = kept.untyped_storage().nbytes()
            if kept.device != t.device:
                self._offloaded[key] = nbytes
            elif self.params.is_cast(t):
                self._storages[key] = ("weight_cast", nbytes)
            else:
                self._storages[key] = (_marks.get(_storage_key(t)) or self._category(t, output), nbytes)

    def _category(self, t: torch.Tensor, output: bool = False) -> str:
        from basis_train.core.basis_linear import BasisLinear

        name, module = self._stack[-1] if self._stack else ("", None)
        if output:
            return self._categories.get(f"{name}:out") or self._categories.get(name, "other")
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

    @property
    def offloaded_bytes(self) -> int:
        return sum(self._offloaded.values())

    def fields(self) -> dict:
        return {"activation_bytes": self.activation_bytes, "weight_cast_bytes": self.weight_cast_bytes,
                "activation_breakdown": self.breakdown, "offloaded_bytes": self.offloaded_bytes}

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
        handles = self._hooks()
        _running.append(self)
        hooks = (self.saving.hooks(observe=self.record) if self.saving is not None
                 else torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        try:
            with hooks:
                yield self
        finally:
            _running.remove(self)
            if not _running:
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


def live_bytes_peak(fn: Callable[[], object]) -> int:
    """Peak, over `fn()`, of the bytes held by storages its ops allocate, on any device and without an
    allocator's rounding or caching: the tensor-level counterpart of `step_peak_bytes` (a CPU has no
    CUDA allocator to ask). Eager ops only; a storage counts from its first op until it is freed."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    live = {"now": 0, "peak": 0}
    seen: set[int] = set()

    def free(key: int, n: int) -> None:
        live["now"] -= n
        seen.discard(key)

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # in-place ops and views return one of their inputs' storages: nothing new
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr in seen or ptr in inputs:
                    continue
                seen.add(ptr)
                live["now"] += st.nbytes()
                live["peak"] = max(live["peak"], live["now"])
                weakref.finalize(st, free, ptr, st.nbytes())
            return out

    with _Count():
        fn()
    return live["peak"]
