"""Apple's Cut Cross-Entropy (CCE) as the exact fused head's kernel on CUDA, on request only.

`cut-cross-entropy` (pip) computes the same mean cross-entropy of x W^T as our chunked
head (core/head.py) with Triton kernels that never write the logits to memory, several
times faster on a GPU. It is optional: our implementation stays the one for CPU, for the
sketched (BASIS) head, for float32, and the reference in the tests.

How it is called, and why not through `cut_cross_entropy.linear_cross_entropy`:
- that wrapper defaults to filter_eps="high", which skips small entries of dlogits in
  backward: an approximate dW and dX. The exact head passes filter_eps=None.
- it builds the valid-row index with `.nonzero()`, a host sync that breaks CUDA-graph
  capture (the training loop captures the whole step). We never ignore a target, so we
  call `linear_cross_entropy_apply` with valids=None and no sync happens.
Both names live in `cut_cross_entropy.cce`, which is not the package's documented API, so
they are checked at import; if anything differs, asking for CCE fails with the reason.

Numerics (differences from ours, all rounding): CCE computes in the dtype of its inputs and
its backward accepts only 16-bit inputs, so it runs only under bf16/fp16 (autocast or
16-bit tensors). It adds the tiles' partial dX and dW in that 16-bit dtype under
lock-protected atomics (ours accumulates in float32), so its gradients are coarser and not
bit-reproducible from run to run.

That rounding is not harmless: at GPT-2 small (results/archive/scale-sorted/, 2,000 AdamW steps, bf16) exact
runs with CCE ended about 0.06 nats above the same seeds with our head (results/archive/scale-sorted/summary.md,
"exact [cce]"). So `auto` (the default) runs ours everywhere and CCE runs only when asked for
(`--head-kernel cce`): a user trades that loss for CCE's memory and speed knowingly.
It saves the 16-bit cast of the weight for backward; the memory meter counts that copy
under weight_cast_bytes, not activation_bytes (core/memory.py).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from basis_train.core.options import KERNELS

# CCE's backward asserts 16-bit inputs ("Backwards requires embeddings to be bf16 or fp16").
CCE_DTYPES = (torch.bfloat16, torch.float16)
_PARAM_FIELDS = {"targets", "valids", "softcap", "reduction", "filter_eps", "shift", "batch_shape"}


@functools.lru_cache(maxsize=1)
def _load() -> tuple[object, object] | str:
    """(linear_cross_entropy_apply, CCEParams), or one line saying why CCE cannot be used.

    Cached: a failed import is not cached by Python and would be retried on every step."""
    try:
        from cut_cross_entropy.cce import CCEParams, linear_cross_entropy_apply
    except Exception as e:  # not installed, or Triton/torch mismatch inside the package
        return f"cut_cross_entropy cannot be imported ({type(e).__name__}: {e})"
    try:
        fields = {f.name for f in dataclasses.fields(CCEParams)}
    except TypeError:
        return "cut_cross_entropy.cce.CCEParams is not a dataclass (an unsupported version)"
    if fields != _PARAM_FIELDS or not callable(linear_cross_entropy_apply):
        return (f"cut_cross_entropy.cce.CCEParams has fields {sorted(fields)}, expected {sorted(_PARAM_FIELDS)} "
                f"(an unsupported version)")
    return linear_cross_entropy_apply, CCEParams


def cce_problem() -> str | None:
    """Why CCE cannot run in this environment (None when it can)."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _on_cuda(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"  # one predicate, so CPU tests can pretend (tests/core/test_head_cce.py)


def _not_here(x: torch.Tensor) -> str | None:
    """Why CCE cannot run on this input (None when it can)."""
    if not _on_cuda(x):
        return f"CCE runs only on CUDA (input on {x.device.type})"
    if compute_dtype(x) not in CCE_DTYPES:
        return f"CCE's backward needs bf16 or fp16 (this head computes in {compute_dtype(x)})"
    return cce_problem()


def use_cce(kernel: str, x: torch.Tensor) -> bool:
    """Whether the exact fused head runs CCE on input `x` for `kernel` (auto | native | cce).

    auto and native: ours (see the module doc for why auto no longer picks CCE);
    cce: CCE or a RuntimeError saying why not."""
    if kernel not in KERNELS:
        raise ValueError(f"head kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "cce":
        return False
    reason = _not_here(x)
    if reason is not None:
        raise RuntimeError(f"head kernel 'cce' requested but {reason}")
    return True


def cce_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of x W^T over rows of x (rows, N) against targets (rows,), exact, via CCE.

    Call only where `use_cce` said yes. Under autocast x and the weight are cast to the
    autocast dtype here (CCE needs both in one dtype, and autocast does not reach inside a
    Triton kernel); the casts are ordinary autograd ops, so dW reaches the float32 weight."""
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(loaded)
    apply, params_cls = loaded
    cd = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        e, c = x.to(cd).contiguous(), weight.to(cd)
        targets = targets.contiguous()
        params = params_cls(targets=targets, valids=None, softcap=None, reduction="mean", filter_eps=None,
                            shift=False, batch_shape=targets.shape)
        return apply(e, c, params)
