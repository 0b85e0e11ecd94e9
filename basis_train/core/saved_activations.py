"""What a training step keeps for backward, the alternatives to BASIS: torch's own mechanisms.

- Selective checkpointing (`model.checkpoint_policy: selective`): a checkpointed block keeps the
  outputs of its matmuls and of the attention kernel (`SAVED_OPS`, MUST_SAVE) and recomputes the
  pointwise ops (LayerNorm, GELU, adds, views: PREFER_RECOMPUTE) in backward, through
  torch.utils.checkpoint's `create_selective_checkpoint_contexts`. The cached outputs are held by
  checkpoint's dispatch mode, not by autograd's saved tensors, so the policy reports them to a
  running memory meter itself (core/memory.py's `note_kept`).
- `SavedActivations` (`train.saved_activations`), installed around the forward as
  saved_tensors_hooks: `offload` copies saved activations to host memory with
  `torch.autograd.graph.save_on_cpu(pin_memory=True)`'s own pack and unpack; `int8` and `fp8`
  store them in 8 bits with a scale per row (rows: all dims but the last), dequantised to the
  original dtype in backward.

Only activations are offloaded or compressed (`SavedActivations.takes`): floating tensors of at least
two dims, `MIN_NUMEL` elements and `MIN_ROW` per row, that are neither parameters (nor views of them)
nor casts of parameters (the memory meter's rule, core/memory.py's ParamSet). Integer tensors (BASIS
seeds, targets, indices) are kept as they are. BASIS layers save their R x N sketch through autograd,
so under int8 or fp8 a sketch is compressed like any other activation (when it is large enough).

Composition: saved-tensor hooks nest and only the innermost pair applies. A checkpointed block saves
nothing through these hooks inside it (checkpoint installs its own), only its inputs, which are
compressed or offloaded; a selective checkpoint's cached matmul outputs are neither (checkpoint's
dispatch mode holds them). The memory meter does not nest its hooks with these: it installs these
through `hooks(observe=...)` and counts what each pack keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from basis_train.core.memory import ParamSet, note_kept
from basis_train.core.options import SAVED_ACTIVATIONS

# A tensor under 1024 elements is not worth a per-row scale and two extra kernels in forward and
# backward each: together such tensors are a few KiB a step (LayerNorm's and attention's per-row
# statistics at small sizes, scalars), and statistics are what a small error hurts most.
MIN_NUMEL = 1024
# With a float32 scale a row of n elements takes n + 4 bytes instead of 4n (float32) or 2n
# (bfloat16): under 16 elements a row saves little or nothing (one-value rows, such as LayerNorm's
# mean and rstd, would take 5 bytes for 4).
MIN_ROW = 16
INT8_MAX = 127.0  # symmetric: -127..127, so that -absmax and absmax round alike
FP8_MAX = 448.0  # torch.float8_e4m3fn's largest finite value
Packed = tuple  # (how, data, scale, dtype, shape) for int8/fp8; save_on_cpu's own form for offload


def _aten_ops(names: tuple[str, ...]) -> frozenset:
    aten = torch.ops.aten
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


# What a selective checkpoint keeps: the matmuls and the attention kernels present in this torch.
SAVED_OPS = _aten_ops(("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                       "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                       "_scaled_dot_product_flash_attention_for_cpu"))


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    policy = CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    if policy == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
        # what checkpoint caches, for a running meter; op_output from torch_floor.SELECTIVE_CACHE_COUNTED_FROM on
        # (without it, not counted, and the frontier's report says so)
        note_kept(getattr(ctx, "op_output", None))
    return policy


def selective_contexts():
    """`context_fn` of torch.utils.checkpoint.checkpoint for the selective policy."""
    return create_selective_checkpoint_contexts(_selective_policy)


def quantize(t: torch.Tensor, how: str) -> Packed:
    """8 bits per element and a float32 scale per row. int8: round(x / s) with s = absmax / 127, so
    every element is off by at most absmax / 254 after `dequantize`. fp8 (e4m3): x / s with
    s = absmax / 448, so the row's absmax maps to 448; 3 mantissa bits: off by at most 2^-4 |x|
    (normal numbers) or 2^-10 s (subnormals, |x / s| < 2^-6)."""
    rows = t.detach().reshape(-1, t.shape[-1]).float()
    absmax = rows.abs().amax(dim=1, keepdim=True)
    top = INT8_MAX if how == "int8" else FP8_MAX
    scale = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax))
    scaled = (rows / scale).clamp(-top, top)  # division rounding must not step past the range
    data = scaled.round().to(torch.int8) if how == "int8" else scaled.to(torch.float8_e4m3fn)
    return (how, data, scale, t.dtype, t.shape)


def dequantize(packed: Packed) -> torch.Tensor:
    _, data, scale, dtype, shape = packed
    return (data.float() * scale).to(dtype).reshape(shape)


class SavedActivations:
    """The step's method for saved tensors (`kind`, one of SAVED_ACTIVATIONS); `params`: the model's
    parameters, which are never offloaded or compressed."""

    def __init__(self, kind: str, params) -> None:
        if kind not in SAVED_ACTIVATIONS:
            raise ValueError(f"saved activations must be one of {SAVED_ACTIVATIONS}, got {kind!r}")
        self.kind = kind
        self.params = ParamSet(params)
        # torch's own offload; pinned host memory where CUDA is (else it copies to pageable memory)
        self._offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if kind == "offload" else None
        # The cast check compares values (a device sync, which a CUDA-graph capture forbids). Where it
        # has to run, its verdict is kept by position among such tensors in the forward, which saves
        # the same tensors every step: the eager steps before a capture decide, the capture reuses.
        self._cast_verdicts: list[tuple[tuple, bool]] = []
        self._n_checked = 0

    def takes(self, t: torch.Tensor) -> bool:
        """Whether `t` is an activation this method offloads or compresses."""
        if (not t.is_floating_point() or t.layout != torch.strided or t.dim() < 2 or t.numel() < MIN_NUMEL
                or t.shape[-1] < MIN_ROW or self.params.is_param(t)):
            return False
        if not self.params.may_be_cast(t):
            return True
        sig, i = (tuple(t.shape), t.stride(), t.dtype, t.device), self._n_checked
        self._n_checked += 1
        if i < len(self._cast_verdicts) and self._cast_verdicts[i][0] == sig:
            return not self._cast_verdicts[i][1]
        del self._cast_verdicts[i:]
        self._cast_verdicts.append((sig, self.params.is_cast(t)))
        return not self._cast_verdicts[i][1]

    def pack(self, t: torch.Tensor) -> object:
        if self.kind == "keep" or not self.takes(t):
            return t.detach()  # a detached alias, as the memory meter hands autograd (core/memory.py)
        if self._offload is not None:
            return self._offload.pack_hook(t)
        return quantize(t, self.kind)

    def unpack(self, packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if self._offload is not None:
            return self._offload.unpack_hook(packed)
        return dequantize(packed)

    @contextmanager
    def _installed(self, observe: Callable[[torch.Tensor, object], None] | None):
        self._n_checked = 0

        def pack(t: torch.Tensor) -> object:
            packed = self.pack(t)
            if observe is not None:
                observe(t, packed)
            return packed

        with torch.autograd.graph.saved_tensors_hooks(pack, self.unpack):
            yield

    def hooks(self, observe: Callable[[torch.Tensor, object], None] | None = None):
        """The hooks, for a forward (backward unpacks what they packed); `observe(t, packed)` sees
        each pack (the memory meter's count). `keep` without an observer installs nothing."""
        if self.kind == "keep" and observe is None:
            return nullcontext()
        return self._installed(observe)
