"""BASIS: the count-sketched weight gradient of a linear layer (docs/paper.md section 1).

For Y = X W^T + b with X of shape (B, N), the forward pass is exact and keeps only an
R x N count-sketch of X. The backward pass returns the exact dX and db, and estimates
dW = dY^T X by sketching dY with the same bins and signs:

    dW ~= (1 - lam)^2 * scale(S dY)^T scale(S X)

where S is the R x B count-sketch matrix and scale() rescales a sketch to the Frobenius
norm of the matrix it summarises (the "invariant scalars").

Randomness. The bins and signs are not stored: forward draws one 32-bit seed from
torch's generator (a 0-d device tensor: no host synchronisation, CUDA-graph safe) and both
passes expand it with `feistel.py` (a keyed bijection of the rows for balanced bins, keyed
hashes for signs). Only the R x N sketch and the 8-byte seed are kept for backward.

The public sketch API, all sharing that randomness and reading a `SketchSpec`:
- `count_sketch_reference`: a scatter (index_add) over explicit bins, the readable
  definition the tests compare against;
- `sketch_stats`: the fast sketch with the norms the rescale needs, from one pass: on CUDA the
  fused Triton kernel (`kernels/sketch_gather.py`: a slot table, then one gather-and-sum pass
  per matrix); elsewhere, or without Triton, a PyTorch gather;
- `scaled_sketch` (the fast sketch, rescaled) and `rescale` (the rescale alone).

Vocabulary: a *hashing* assigns rows to the bins of a count-sketch ("balanced", "uniform").
A *sketch kind* is what summarises a matrix: a count-sketch with one of the hashings, or
"gaussian", a dense Gaussian projection kept as an ablation (it is not a hashing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from basis_train.core import feistel as fe
from basis_train.core.kernels import KernelRoute
from basis_train.core.options import HASHINGS, SKETCH_KINDS

# Only in the rescale's denominator, as the reference.
SCALE_EPS = 1e-8
# Matrices the fused kernels take; float64 (the tests' references) stays in PyTorch.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KERNELS = KernelRoute("basis_train.core.kernels.sketch_gather", "BASIS uses its slower PyTorch sketch")


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """One 32-bit sketch seed as a 0-d int64 tensor on `device`, from torch's generator."""
    return torch.randint(0, 2**32, (), device=device, dtype=torch.int64, generator=generator)


def sketch_permutation(seed: torch.Tensor, rows: int) -> torch.Tensor:
    """Slot order q of the balanced hashing: row q[j] goes to bin j mod R (q = pi^-1)."""
    return fe.inverse_permutation(seed, rows)


def sketch_signs(seed: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rademacher signs, one per row."""
    return fe.signs(seed, rows, dtype)


def sketch_bins(seed: torch.Tensor, rows: int, rank: int, hashing: str = "balanced") -> torch.Tensor:
    """Bin of every row. Balanced: pi(i) mod R, sizes floor(B/R) or ceil(B/R); uniform: independent."""
    if hashing == "balanced":
        return fe.permutation(seed, rows) % rank
    if hashing == "uniform":
        return fe.hash_bits(seed, rows, fe.STREAM_BIN) % rank
    raise ValueError(f"hashing must be one of {HASHINGS}, got {hashing!r}")


def gaussian_projection(seed: torch.Tensor, rows: int, rank: int) -> torch.Tensor:
    """Dense R x B Gaussian projection with E[G^T G] = I (Bershatsky et al. 2022 style)."""
    u1 = (fe.hash_bits(seed, rank * rows, fe.STREAM_GAUSS) + 0.5) / 2.0**32
    u2 = (fe.hash_bits(seed, rank * rows, fe.STREAM_GAUSS + 16) + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)  # Box-Muller
    return (z / math.sqrt(rank)).view(rank, rows).float()


def acc_dtype(m: torch.Tensor) -> torch.dtype:
    return torch.float64 if m.dtype == torch.float64 else torch.float32


def count_sketch_reference(m: torch.Tensor, seed: torch.Tensor, rank: int, kind: str = "balanced") -> torch.Tensor:
    """S @ m for a (B, C) matrix, accumulated in float32 (float64 stays float64)."""
    acc = acc_dtype(m)
    rows = m.shape[0]
    if kind == "gaussian":
        return gaussian_projection(seed, rows, rank).to(acc) @ m.to(acc)
    signs = sketch_signs(seed, rows, acc)
    bins = sketch_bins(seed, rows, rank, kind)
    out = torch.zeros(rank, m.shape[1], dtype=acc, device=m.device)
    return out.index_add_(0, bins, m.to(acc) * signs[:, None])


def _gather_sketch(m: torch.Tensor, seed: torch.Tensor, rank: int) -> torch.Tensor:
    # Slot j holds row q[j] and feeds bin j mod R: a gather and a reshaped sum, no atomics.
    acc = acc_dtype(m)
    rows, cols = m.shape
    q = sketch_permutation(seed, rows)
    gathered = m.index_select(0, q).to(acc) * sketch_signs(seed, rows, acc)[q, None]
    per_bin = -(-rows // rank)
    if pad := per_bin * rank - rows:
        gathered = torch.cat([gathered, gathered.new_zeros(pad, cols)])
    return gathered.view(per_bin, rank, cols).sum(0)


def kernels_take(m: torch.Tensor, kind: str) -> bool:
    """Whether the fused kernels can sketch `m` (a non-empty 2-D matrix of a kernel dtype, balanced
    bins), wherever they load."""
    return kind == "balanced" and m.dtype in _KERNEL_DTYPES and m.dim() == 2 and m.shape[0] > 0


def _kernels_for(m: torch.Tensor, kind: str):
    return KERNELS.on(m.device.type) if kernels_take(m, kind) else None


def sketch_stats(m: torch.Tensor, seed: torch.Tensor, rank: int, kind: str = "balanced", colsum: bool = False):
    """(S m, ||m||_F^2, column sums of m if asked): the fast sketch, from one kernel pass where
    possible; S m equals `count_sketch_reference` up to float32 summation order."""
    if kernels := _kernels_for(m, kind):
        return kernels.sketch_stats(m, seed, rank, colsum)
    acc = acc_dtype(m)
    if m.shape[0] == 0:
        sk = m.new_zeros(rank, m.shape[1], dtype=acc)
    elif kind == "balanced":
        sk = _gather_sketch(m, seed, rank)
    else:
        sk = count_sketch_reference(m, seed, rank, kind)
    sumsq = torch.linalg.vector_norm(m, dtype=acc).square()
    return sk, sumsq, m.sum(0, dtype=acc) if colsum else None


def _invariant_scalar(sketch: torch.Tensor, full_sumsq: torch.Tensor) -> torch.Tensor:
    # One scalar for the whole matrix.
    return full_sumsq.sqrt() / (torch.linalg.vector_norm(sketch) + SCALE_EPS)


def _rescaled(sketch: torch.Tensor, full_sumsq: torch.Tensor, lam: float, scalars: bool) -> torch.Tensor:
    if scalars:
        sketch = sketch * _invariant_scalar(sketch, full_sumsq)
    return sketch * (1.0 - lam) if lam else sketch


def rescale(sketch: torch.Tensor, full_sumsq: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
    """The invariant scalars (if `spec` has them) and lambda, for a sketch of a matrix whose
    squared Frobenius norm is `full_sumsq`."""
    return _rescaled(sketch, full_sumsq, spec.lam, spec.scalars)


def rescale_factor(sketch: torch.Tensor, full_sumsq: torch.Tensor, spec: SketchSpec) -> torch.Tensor:
    """The 0-d factor `rescale` multiplies `sketch` by: a product of sketches can take it on its
    smaller side (the BASIS head: R x N for x rather than R x V for the dlogits)."""
    factor = (_invariant_scalar(sketch, full_sumsq) if spec.scalars
              else torch.ones((), dtype=sketch.dtype, device=sketch.device))
    return factor * (1.0 - spec.lam) if spec.lam else factor


def scaled_stats(m: torch.Tensor, seed: torch.Tensor, rank: int, kind: str, scalars: bool, lam: float,
                  colsum: bool = False):
    # The kernel's fused rescale saves the dozen small launches of `_rescaled` and the partial sums.
    kernels = _kernels_for(m, kind)
    fused = getattr(kernels, "scaled_stats", None)
    if fused is not None:
        return fused(m, seed, rank, scalars, lam, SCALE_EPS, colsum)
    sk, sumsq, cs = sketch_stats(m, seed, rank, kind, colsum)
    return _rescaled(sk, sumsq, lam, scalars), cs


def scaled_sketch(m: torch.Tensor, seed: torch.Tensor, spec: SketchSpec, rank: int | None = None) -> torch.Tensor:
    """The rescaled sketch of one matrix, what each pass of BasisLinear keeps or multiplies;
    `rank`: the R that runs where it is clamped below `spec.rank` (min(R, rows))."""
    return scaled_stats(m, seed, spec.rank if rank is None else rank, spec.kind, spec.scalars, spec.lam)[0]


def mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b: 16-bit CUDA inputs on the tensor cores with a float32 result (float32 accumulation
    kept rather than rounded to 16 bits); other inputs as they are."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a @ b


@dataclass(frozen=True)
class SketchSpec:
    """What a BASIS layer does with its sketches: R bins, the sketch kind, the invariant
    scalars on or off, and the lambda shrinkage (docs/paper.md section 1)."""

    rank: int = 32
    kind: str = "balanced"
    scalars: bool = True
    lam: float = 0.01

    def __post_init__(self) -> None:
        check_rank(self.rank)
        object.__setattr__(self, "rank", int(self.rank))  # 32.0 from a YAML file is rank 32
        if self.kind not in SKETCH_KINDS:
            raise ValueError(f"sketch must be one of {SKETCH_KINDS}, got {self.kind!r}")
        if not 0.0 <= float(self.lam) < 1.0:
            raise ValueError(f"lam must be in [0, 1), got {self.lam!r}")


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) and not (
        isinstance(rank, float) and rank.is_integer()
    ):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
