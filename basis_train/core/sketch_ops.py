"""The sketches of core/sketch.py as torch.library operators, so that torch.compile keeps one graph
around a BASIS layer (no graph break) and nothing it recomputes draws a seed again.

- `sketch_op`, `sketch_colsum_op`: the rescaled sketch (and the column sums for the bias) of one
  matrix. On CUDA, where the fused Triton kernels load, they are `torch.library.triton_op`s, whose
  bodies torch.compile traces: Inductor launches the kernels from its own generated code. Elsewhere
  they are opaque custom ops around the PyTorch path, whose balanced bins loop a data-dependent
  number of times and cannot be traced.
- `bins_and_signs`, `fresh_seed`: opaque custom ops (see each).
"""

from __future__ import annotations

import torch

from basis_train.core.sketch import (
    KERNELS,
    SCALE_EPS,
    SketchSpec,
    acc_dtype,
    draw_seed,
    kernels_take,
    scaled_stats,
    sketch_bins,
    sketch_signs,
)


@torch.library.custom_op("basis::scaled_sketch", mutates_args=())
def _sketch_op(m: torch.Tensor, seed: torch.Tensor, rank: int, kind: str, scalars: bool, lam: float) -> torch.Tensor:
    return scaled_stats(m, seed, rank, kind, scalars, lam)[0]


@_sketch_op.register_fake
def _(m, seed, rank, kind, scalars, lam):
    return m.new_empty(rank, m.shape[1], dtype=acc_dtype(m))


@torch.library.custom_op("basis::scaled_sketch_colsum", mutates_args=())
def _sketch_colsum_op(m: torch.Tensor, seed: torch.Tensor, rank: int, kind: str, scalars: bool,
                      lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    sk, cs = scaled_stats(m, seed, rank, kind, scalars, lam, colsum=True)
    return sk, cs


@_sketch_colsum_op.register_fake
def _(m, seed, rank, kind, scalars, lam):
    acc = acc_dtype(m)
    return m.new_empty(rank, m.shape[1], dtype=acc), m.new_empty(m.shape[1], dtype=acc)


def _triton_sketch(m: torch.Tensor, seed: torch.Tensor, rank: int, scalars: bool, lam: float) -> torch.Tensor:
    return KERNELS.on("cuda").scaled_stats(m, seed, rank, scalars, lam, SCALE_EPS, traceable=True)[0]


def _triton_sketch_colsum(m: torch.Tensor, seed: torch.Tensor, rank: int, scalars: bool,
                          lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    sk, cs = KERNELS.on("cuda").scaled_stats(m, seed, rank, scalars, lam, SCALE_EPS, colsum=True, traceable=True)
    return sk, cs


def _define_triton_ops() -> bool:
    """Define the basis::*_triton ops where CUDA is and the fused kernels load (importing Triton).
    They are torch.library.triton_op: torch.compile traces their bodies, so Inductor launches the
    Triton kernels from its own generated code instead of an opaque op's Python body (its launches
    and allocations: about 250 us a call under the profiler on an H100, results/bench/h100_gpt2/speed)."""
    if not torch.cuda.is_available() or KERNELS.on("cuda") is None:
        return False
    torch.library.triton_op("basis::scaled_sketch_triton", _triton_sketch, mutates_args=())
    torch.library.triton_op("basis::scaled_sketch_colsum_triton", _triton_sketch_colsum, mutates_args=())
    return True


# Decided once, at import: a constant to torch.compile; without CUDA the kernel module is never loaded.
_TRITON_OPS = _define_triton_ops()


def _fused(m: torch.Tensor, kind: str) -> bool:
    return _TRITON_OPS and m.is_cuda and kernels_take(m, kind)


def sketch_op(m: torch.Tensor, seed: torch.Tensor, rank: int, spec: SketchSpec) -> torch.Tensor:
    """`scaled_sketch` of `m` at `rank` as one operator that torch.compile keeps in its graph."""
    if _fused(m, spec.kind):
        return torch.ops.basis.scaled_sketch_triton(m, seed, rank, spec.scalars, spec.lam)
    return torch.ops.basis.scaled_sketch(m, seed, rank, spec.kind, spec.scalars, spec.lam)


def sketch_colsum_op(m: torch.Tensor, seed: torch.Tensor, rank: int, spec: SketchSpec):
    """(`sketch_op`, the float32 column sums of `m`) from one pass over `m`."""
    if _fused(m, spec.kind):
        return torch.ops.basis.scaled_sketch_colsum_triton(m, seed, rank, spec.scalars, spec.lam)
    return torch.ops.basis.scaled_sketch_colsum(m, seed, rank, spec.kind, spec.scalars, spec.lam)


@torch.library.custom_op("basis::bins_and_signs", mutates_args=())
def _bins_signs_op(seed: torch.Tensor, rows: int, rank: int, hashing: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Opaque to torch.compile: the balanced bins' cycle walk loops a data-dependent number of times.
    return sketch_bins(seed, rows, rank, hashing), sketch_signs(seed, rows, torch.float32)


@_bins_signs_op.register_fake
def _(seed, rows, rank, hashing):
    return seed.new_empty(rows, dtype=torch.int64), seed.new_empty(rows, dtype=torch.float32)


def bins_and_signs(seed: torch.Tensor, rows: int, rank: int, hashing: str = "balanced"):
    """(bin of every row, its sign as float32): `sketch_bins` and `sketch_signs` in one op."""
    return torch.ops.basis.bins_and_signs(seed, rows, rank, hashing)


@torch.library.custom_op("basis::fresh_seed", mutates_args=())
def _fresh_seed_op(like: torch.Tensor, salt: int) -> torch.Tensor:
    # An opaque draw from torch's global generator: AOTAutograd saves its output for backward
    # rather than re-running it (it recomputes only cheap pure ops), and the per-layer salt keeps
    # two layers fed the same input from being merged into one draw.
    return draw_seed(like.device)


@_fresh_seed_op.register_fake
def _(like, salt):
    return like.new_empty((), dtype=torch.int64)
