"""The batched fleet head's softmax and its gradient in two passes (fleet/head.py `FleetFusedCE`'s
CUDA path).

The head keeps every member's logits transposed, (M, vocab, rows), so that vocabulary chunks are
contiguous blocks (fleet/head.py splits the long dX reduction over them). On that layout:

- `row_lse`: one program per (member, vocabulary chunk, block of rows) reads its chunk once and
  keeps a running maximum and sum of exponentials per row; the (M, chunks, rows) partials are
  combined with a few small ops. torch.logsumexp made four passes (max, subtract, exp, sum). The
  fleet's evaluation uses it too, on each member's (vocab, tokens) logits of a validation batch.
- `softmax_grad_`: one program per (member, vocabulary tile) turns its tile in place into
  dlogits = softmax - onehot and, from the same registers, adds up the two squared norms the
  invariant scalars need: ||dlogits||^2 and ||S dlogits||^2, with S (M, W, rows) the member's
  dense signed count-sketch matrix (fleet/sketch.py; the identity for exact members). The
  PyTorch ops it replaces made five passes over the (M, rows, vocab) tensor (subtract, exp,
  scale, two norms) and a batched product S dlogits of all of it.

Each program writes its partials to its own slot and the caller sums them in a fixed order (no
atomics, so a step is deterministic). S tile is a tensor-core product in "tf32x3" (operands
split into a TF32 high part and a TF32 remainder: float32-level accuracy); it only feeds the
invariant scalar's norm, and S holds +-1 and 0. exp is Triton's, which may differ from PyTorch's
by an ulp. Shapes and grids depend only on (M, rows, vocab, W), so a launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 128  # vocabulary entries per tile
LSE_TILES = 16  # tiles per program of `row_lse`


@triton.jit
def _row_lse_kernel(l_ptr, max_ptr, sum_ptr, rows, vocab, chunks, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
                    TILES: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    r = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    rmask = r < rows
    mx = tl.full([ROWS], float("-inf"), tl.float32)
    se = tl.zeros([ROWS], tl.float32)
    for i in range(TILES):  # the first tile of every program holds at least one entry
        v = (c * TILES + i) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = (v < vocab)[:, None] & rmask[None, :]
        x = tl.load(l_ptr + m * vocab * rows + v[:, None].to(tl.int64) * rows + r[None, :], mask=mask,
                    other=float("-inf"))
        new = tl.maximum(mx, tl.max(x, axis=0))
        new = tl.where(rmask, new, 0.0)  # padding rows: no -inf - -inf
        se = se * tl.exp(mx - new) + tl.sum(tl.exp(x - new[None, :]), axis=0)
        mx = new
    slot = (m * chunks + c) * rows + r
    tl.store(max_ptr + slot, mx, mask=rmask)
    tl.store(sum_ptr + slot, se, mask=rmask)


@triton.jit
def _softmax_grad_kernel(dl_ptr, lse_ptr, tgt_ptr, s_ptr, sumsq_ptr, sksq_ptr, rows, vocab, width, tiles,
                         ROWS: tl.constexpr, WIDTH: tl.constexpr, BLOCK_V: tl.constexpr, SKETCH: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    r = tl.arange(0, ROWS)
    v = t * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = r < rows
    mask = (v < vocab)[:, None] & rmask[None, :]
    offs = m * vocab * rows + v[:, None].to(tl.int64) * rows + r[None, :]
    logits = tl.load(dl_ptr + offs, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + m * rows + r, mask=rmask, other=0.0)
    target = tl.load(tgt_ptr + m * rows + r, mask=rmask, other=-1)
    onehot = tl.where(v[:, None] == target[None, :], 1.0, 0.0)
    d = tl.where(mask, tl.exp(logits - lse[None, :]) - onehot, 0.0)  # (BLOCK_V, ROWS)
    tl.store(dl_ptr + offs, d, mask=mask)
    slot = m * tiles + t
    tl.store(sumsq_ptr + slot, tl.sum(tl.sum(d * d, axis=1), axis=0))
    if SKETCH:
        b = tl.arange(0, WIDTH)
        smask = (b < width)[:, None] & rmask[None, :]
        s = tl.load(s_ptr + m * width * rows + b[:, None] * rows + r[None, :], mask=smask, other=0.0)
        sk = tl.dot(s, tl.trans(d), input_precision="tf32x3")  # (WIDTH, BLOCK_V)
        tl.store(sksq_ptr + slot, tl.sum(tl.sum(sk * sk, axis=1), axis=0))


def supports(logits_t: torch.Tensor, smat: torch.Tensor | None) -> bool:
    """Whether `softmax_grad_` takes these: float32, contiguous, and rows and W within one tile
    (`row_lse` takes any float32 contiguous (M, vocab, rows))."""
    ts = (logits_t,) if smat is None else (logits_t, smat)
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in ts) and 0 < logits_t.shape[2] <= 128 \
        and logits_t.shape[1] > 0 and (smat is None or smat.shape[1] <= 128)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot takes dimensions of at least 16


@torch.no_grad()
def row_lse(logits_t: torch.Tensor, block_v: int = BLOCK_V, tiles: int = LSE_TILES,
            block_rows: int = 64) -> torch.Tensor:
    """Log-sum-exp over the vocabulary (M, rows) of logits_t (M, vocab, rows), float32 contiguous;
    rows in blocks of `block_rows` (a power of two)."""
    size, vocab, rows = logits_t.shape
    chunks = triton.cdiv(vocab, block_v * tiles)
    mx = torch.empty(size, chunks, rows, device=logits_t.device, dtype=torch.float32)
    se = torch.empty_like(mx)
    block = min(_pad(rows), block_rows)
    _row_lse_kernel[(size, chunks, triton.cdiv(rows, block))](logits_t, mx, se, rows, vocab, chunks, ROWS=block,
                                                              BLOCK_V=block_v, TILES=tiles)
    top = mx.amax(1, keepdim=True)
    return (se * (mx - top).exp()).sum(1).log() + top.squeeze(1)


@torch.no_grad()
def softmax_grad_(logits_t: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, smat: torch.Tensor | None,
                  block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits_t (M, vocab, rows) becomes (softmax - onehot) transposed, in place; returns
    (||dlogits||^2 (M,), ||S dlogits||^2 (M,) or None without S). lse (M, rows) float32,
    targets (M, rows) int64, smat (M, W, rows) float32 or None."""
    size, vocab, rows = logits_t.shape
    tiles = triton.cdiv(vocab, block_v)
    parts = torch.empty(2, size, tiles, device=logits_t.device, dtype=torch.float32)
    width = 1 if smat is None else smat.shape[1]
    _softmax_grad_kernel[(size, tiles)](logits_t, lse.contiguous(), targets.contiguous(),
                                        logits_t if smat is None else smat, parts[0], parts[1], rows, vocab,
                                        width, tiles, ROWS=_pad(rows), WIDTH=_pad(width), BLOCK_V=block_v,
                                        SKETCH=smat is not None, num_warps=8)
    sums = parts.sum(2)
    return sums[0], (sums[1] if smat is not None else None)
