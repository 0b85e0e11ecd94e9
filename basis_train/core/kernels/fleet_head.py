"""The batched fleet head's softmax gradient in one pass (core/fleet.py `_FleetFusedCE`'s CUDA path).

Given every member's logits (M, rows, vocab), their log-sum-exp (M, rows) and targets (M, rows),
one program per (member, vocabulary tile) turns its tile in place into dlogits = softmax - onehot
and, from the same registers, adds up the two squared norms the invariant scalars need:
||dlogits||^2 and ||S dlogits||^2, with S (M, W, rows) the member's dense signed count-sketch
matrix (core/fleet_sketch.py; the identity for exact members). The PyTorch ops it replaces made
five passes over the (M, rows, vocab) tensor (subtract, exp, scale, two norms) and a batched
product S dlogits of the whole tensor, which cuBLAS ran as small-tile FFMA GEMMs (about 1.5 ms of
a 7.2 ms fleet step of 30 members on an H200, scripts/fleet_profile.py).

Each program writes its partial sums to its own slot; the caller sums them in a fixed order (no
atomics, so a step is deterministic). The product S tile is float32 FMA (input_precision "ieee"):
S holds only +-1 and 0, so its products are exact and the sums round as float32 sums do. exp is
Triton's, which may differ from PyTorch's by an ulp. Shapes and the grid depend only on
(M, rows, vocab, W), so a launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 128


@triton.jit
def _softmax_grad_kernel(dl_ptr, lse_ptr, tgt_ptr, s_ptr, sumsq_ptr, sksq_ptr, rows, vocab, width, tiles,
                         ROWS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_V: tl.constexpr, SKETCH: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    r = tl.arange(0, ROWS)
    v = t * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = r < rows
    mask = rmask[:, None] & (v < vocab)[None, :]
    offs = m * rows * vocab + r[:, None].to(tl.int64) * vocab + v[None, :]
    logits = tl.load(dl_ptr + offs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + m * rows + r, mask=rmask, other=0.0)
    target = tl.load(tgt_ptr + m * rows + r, mask=rmask, other=-1)
    onehot = tl.where(v[None, :] == target[:, None], 1.0, 0.0)
    d = tl.where(mask, tl.exp(logits - lse[:, None]) - onehot, 0.0)
    tl.store(dl_ptr + offs, d, mask=mask)
    slot = m * tiles + t
    tl.store(sumsq_ptr + slot, tl.sum(tl.sum(d * d, axis=1), axis=0))
    if SKETCH:
        b = tl.arange(0, WIDTH)
        smask = (b < width)[:, None] & rmask[None, :]
        s = tl.load(s_ptr + m * width * rows + b[:, None] * rows + r[None, :], mask=smask, other=0.0)
        sk = tl.dot(s, d, input_precision="ieee")
        tl.store(sksq_ptr + slot, tl.sum(tl.sum(sk * sk, axis=1), axis=0))


def supports(logits: torch.Tensor, smat: torch.Tensor | None) -> bool:
    """Whether `softmax_grad_` takes these: float32, contiguous, and rows and W within one tile."""
    ts = (logits,) if smat is None else (logits, smat)
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in ts) and 0 < logits.shape[1] <= 128 \
        and (smat is None or smat.shape[1] <= 128)


@torch.no_grad()
def softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, smat: torch.Tensor | None,
                  block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (M, rows, vocab) becomes softmax - onehot in place; returns (||dlogits||^2 (M,),
    ||S dlogits||^2 (M,) or None without S). lse (M, rows) float32, targets (M, rows) int64,
    smat (M, W, rows) float32 or None."""
    size, rows, vocab = logits.shape
    tiles = triton.cdiv(vocab, block_v)
    parts = torch.empty(2, size, tiles, device=logits.device, dtype=torch.float32)
    width = 1 if smat is None else smat.shape[1]
    pad = max(16, triton.next_power_of_2(rows))  # tl.dot takes dimensions of at least 16
    _softmax_grad_kernel[(size, tiles)](logits, lse.contiguous(), targets.contiguous(),
                                        logits if smat is None else smat, parts[0], parts[1], rows, vocab,
                                        width, tiles, ROWS=pad, WIDTH=max(16, triton.next_power_of_2(width)),
                                        BLOCK_V=block_v, SKETCH=smat is not None, num_warps=8)
    sums = parts.sum(2)
    return sums[0], (sums[1] if smat is not None else None)
