"""BASIS: the count-sketched weight gradient of a linear layer (PAPER.md section 1).

For Y = X W^T + b with X of shape (B, N), the forward pass is exact and keeps only an
R x N count-sketch of X. The backward pass returns the exact dX and db, and estimates
dW = dY^T X by sketching dY with the same bins and signs:

    dW ~= (1 - lam)^2 * scale(S dY)^T scale(S X)

where S is the R x B count-sketch matrix and scale() rescales a sketch to the Frobenius
norm of the matrix it summarises (the "invariant scalars").

Randomness. The bins and signs are not stored: forward draws one 32-bit seed from
torch's generator (a 0-d device tensor, so no host synchronisation and CUDA-graph safe)
and both passes expand it into a permutation and signs with a counter-based integer
hash. A seeded torch generator therefore reproduces every sketch, and the only
per-layer state kept for backward besides the R x N sketch is 8 bytes.

Two implementations of the sketch share that randomness:
- `count_sketch_reference`: a scatter (index_add) over explicit bins, the readable
  definition used by the tests;
- `count_sketch`: the balanced sketch as a gather + reshaped sum (no atomics), used in
  training. Row q[j] goes to bin j mod R, which is the same bin assignment.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

HASHINGS = ("balanced", "uniform", "gaussian")
_EPS = 1e-8
_M32 = 0xFFFFFFFF
# Counter-based hash constants (lowbias32 family). Both multipliers are < 2**31 so every
# product of a 32-bit value with them fits in int64 without overflow.
_MUL1 = 0x7FEB352D
_MUL2 = 0x68E31DA5
_STREAM_PERM, _STREAM_SIGN, _STREAM_BIN, _STREAM_GAUSS = 1, 2, 3, 4


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


def hash_bits(seed: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """n pseudo-random 32-bit integers (int64) determined by (seed, stream)."""
    key = _mix32((seed.long() + stream * 0x2545F491) & _M32)
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    # No multiply in index space: compiled kernels keep indices in int32.
    return _mix32(_mix32((idx + key) & _M32) ^ key)


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """One 32-bit sketch seed as a 0-d int64 tensor on `device`, from torch's generator."""
    return torch.randint(0, 2**32, (), device=device, dtype=torch.int64, generator=generator)


def sketch_permutation(seed: torch.Tensor, rows: int) -> torch.Tensor:
    """Uniformly random permutation q of range(rows): row q[j] goes to bin j mod R."""
    return torch.argsort(hash_bits(seed, rows, _STREAM_PERM), stable=True)


def sketch_signs(seed: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rademacher signs, one per row."""
    bit = hash_bits(seed, rows, _STREAM_SIGN) & 1
    return (1 - 2 * bit).to(dtype)


def sketch_bins(seed: torch.Tensor, rows: int, rank: int, hashing: str = "balanced") -> torch.Tensor:
    """Bin of every row. Balanced: sizes floor(B/R) or ceil(B/R); uniform: independent."""
    if hashing == "balanced":
        q = sketch_permutation(seed, rows)
        bins = torch.empty(rows, dtype=torch.int64, device=seed.device)
        bins[q] = torch.arange(rows, device=seed.device) % rank
        return bins
    if hashing == "uniform":
        return hash_bits(seed, rows, _STREAM_BIN) % rank
    raise ValueError(f"no bins for hashing={hashing!r}")


def gaussian_projection(seed: torch.Tensor, rows: int, rank: int) -> torch.Tensor:
    """Dense R x B Gaussian projection with E[G^T G] = I (Bershatsky et al. 2022 style)."""
    u1 = (hash_bits(seed, rank * rows, _STREAM_GAUSS) + 0.5) / 2.0**32
    u2 = (hash_bits(seed, rank * rows, _STREAM_GAUSS + 16) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)  # Box-Muller
    return (z / math.sqrt(rank)).view(rank, rows).float()


def count_sketch_reference(
    m: torch.Tensor, seed: torch.Tensor, rank: int, hashing: str = "balanced"
) -> torch.Tensor:
    """S @ m for a (B, C) matrix, accumulated in float32 (float64 stays float64)."""
    acc = torch.float64 if m.dtype == torch.float64 else torch.float32
    rows = m.shape[0]
    if hashing == "gaussian":
        return gaussian_projection(seed, rows, rank).to(acc) @ m.to(acc)
    signs = sketch_signs(seed, rows, acc)
    bins = sketch_bins(seed, rows, rank, hashing)
    out = torch.zeros(rank, m.shape[1], dtype=acc, device=m.device)
    return out.index_add_(0, bins, m.to(acc) * signs[:, None])


def _row_plan(seed: torch.Tensor, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation q and the signs of rows q[0], q[1], ... (gather order)."""
    q = sketch_permutation(seed, rows)
    return q, sketch_signs(seed, rows, dtype)[q]


def count_sketch(
    m: torch.Tensor, seed: torch.Tensor, rank: int, hashing: str = "balanced"
) -> torch.Tensor:
    """Same result as `count_sketch_reference`; the balanced case avoids atomics."""
    if hashing != "balanced":
        return count_sketch_reference(m, seed, rank, hashing)
    acc = torch.float64 if m.dtype == torch.float64 else torch.float32
    rows, cols = m.shape
    per_bin = -(-rows // rank)
    q, signs = _row_plan(seed, rows, acc)
    gathered = m.index_select(0, q).to(acc) * signs[:, None]
    pad = per_bin * rank - rows
    if pad:
        gathered = torch.cat([gathered, gathered.new_zeros(pad, cols)])
    return gathered.view(per_bin, rank, cols).sum(0)


def _rescale(sketch: torch.Tensor, full: torch.Tensor, lam: float, scalars: bool) -> torch.Tensor:
    # One scalar for the whole matrix; epsilon only in the denominator, as the reference.
    if scalars:
        full_norm = torch.linalg.vector_norm(full, dtype=sketch.dtype)
        sketch = sketch * (full_norm / (torch.linalg.vector_norm(sketch) + _EPS))
    return sketch * (1.0 - lam) if lam else sketch


def scaled_sketch_eager(m: torch.Tensor, seed: torch.Tensor, rank: int, hashing: str, scalars: bool,
                        lam: float) -> torch.Tensor:
    """The rescaled sketch of one matrix: what each pass of BasisLinear keeps or multiplies."""
    return _rescale(count_sketch(m, seed, rank, hashing), m, lam, scalars)


# Eager, one balanced sketch is ~25 kernels (the hash alone ~20 elementwise ones, then a
# float32 copy of the gathered matrix, its signed copy, the sum, two norms) and the host
# time to launch them. Compiled, the hash is one kernel, the sort one, and gather, cast,
# signs, bin sum and the full-matrix norm fuse into reductions that read the matrix once
# in its own dtype. The seed is an input, never drawn inside the compiled region (see
# _apply_basis), so compiling cannot change the estimate. BASIS_SKETCH_COMPILE=0 opts out.
_compiled_sketch = None
# One graph per (rows, cols, rank, dtype, variant) a model produces; GPT-2 small with
# every linear sketched under autocast needs ~6, close to dynamo's default limit of 8.
_RECOMPILE_LIMIT = 64


def _compiled_sketch_fn():
    """The compiled scaled_sketch_eager, built on first use; False if opted out or broken."""
    global _compiled_sketch
    if _compiled_sketch is None:
        if os.environ.get("BASIS_SKETCH_COMPILE", "1") == "0":
            _compiled_sketch = False
        else:
            import torch._dynamo.config as dynamo_config

            if getattr(dynamo_config, "recompile_limit", _RECOMPILE_LIMIT) < _RECOMPILE_LIMIT:
                dynamo_config.recompile_limit = _RECOMPILE_LIMIT
            _compiled_sketch = torch.compile(scaled_sketch_eager, dynamic=False, fullgraph=True)
    return _compiled_sketch


def scaled_sketch(m: torch.Tensor, seed: torch.Tensor, rank: int, hashing: str, scalars: bool,
                  lam: float) -> torch.Tensor:
    global _compiled_sketch
    if m.is_cuda and hashing == "balanced" and (fn := _compiled_sketch_fn()):
        try:
            return fn(m, seed, rank, hashing, scalars, lam)
        except Exception as e:  # no compiler toolchain, say: stay correct, just slower
            warnings.warn(f"compiling the sketch failed ({type(e).__name__}: {e}); using eager kernels")
            _compiled_sketch = False
    return scaled_sketch_eager(m, seed, rank, hashing, scalars, lam)


def _sketch(m, seed, rank, hashing, scalars, lam, reference):
    if reference:
        return _rescale(count_sketch_reference(m, seed, rank, hashing), m, lam, scalars)
    return scaled_sketch(m, seed, rank, hashing, scalars, lam)


class BasisLinearFunction(torch.autograd.Function):
    """Exact forward, exact dX and db, count-sketched dW. Inputs are 2-D (rows, features)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rank, hashing, scalars, lam, generator, reference):
        rows = x.shape[0]
        r = min(rank, rows)
        seed = draw_seed(x.device, generator)
        # The sketch reads x as given (under autocast the matmul below may read a bf16
        # cast of it) and always sums in float32.
        xs = _sketch(x.detach(), seed, r, hashing, scalars, lam, reference)
        ctx.save_for_backward(xs, seed, weight)
        ctx.cfg = (r, hashing, scalars, lam, reference, x.dtype, bias is not None)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        xs, seed, weight = ctx.saved_tensors
        r, hashing, scalars, lam, reference, x_dtype, has_bias = ctx.cfg
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x_dtype)
        if ctx.needs_input_grad[1]:
            gs = _sketch(grad_out, seed, r, hashing, scalars, lam, reference)
            grad_w = (gs.t() @ xs).to(weight.dtype)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0, dtype=torch.promote_types(grad_out.dtype, torch.float32)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


@torch.compiler.disable
def _apply_basis(*args):
    # AOTAutograd re-draws the sketch seed between the traced forward and backward
    # (seen with torch 2.13: dW off at R = rows), which silently breaks the estimator.
    # Compiled models therefore graph-break here and run this op eagerly.
    return BasisLinearFunction.apply(*args)


class BasisLinear(nn.Linear):
    """Drop-in `nn.Linear` whose weight gradient is a BASIS estimate while training.

    Same parameters and state_dict as nn.Linear. In eval mode, under no_grad, or when
    nothing needs a gradient it is an ordinary linear layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 32,
        hashing: str = "balanced",
        invariant_scalars: bool = True,
        lam: float = 0.01,
        device=None,
        dtype=None,
        reference: bool = False,
    ) -> None:
        check_rank(rank)
        if hashing not in HASHINGS:
            raise ValueError(f"hashing must be one of {HASHINGS}, got {hashing!r}")
        if not 0.0 <= float(lam) < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {lam!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = int(rank)
        self.hashing = hashing
        self.invariant_scalars = bool(invariant_scalars)
        self.lam = float(lam)
        self.reference = reference
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        if not (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = _apply_basis(
            x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.rank, self.hashing,
            self.invariant_scalars, self.lam, self.generator, self.reference,
        )
        return y if x.dim() == 2 else y.view(*lead, y.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, hashing={self.hashing}, "
            f"invariant_scalars={self.invariant_scalars}, lam={self.lam}"
        )


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) and not (
        isinstance(rank, float) and rank.is_integer()
    ):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
