"""A fleet's SGD update in one pass per stacked parameter (fleet/optim.py's CUDA path).

It lives apart from fleet/optim.py because importing it needs Triton: optim.py loads it through a
KernelRoute, and the tests load it under Triton's interpreter.

For a stacked parameter p [M, ...] with gradient g, momentum buffer buf (same shape, contiguous)
and the members' learning rates lr (M,) float32, each element does torch.optim.SGD's update
(dampening 0, no Nesterov) after the first step:

    d = g + wd * p          (only where wd != 0)
    buf = momentum * buf + d  ;  d = buf   (only where momentum != 0)
    p = p - lr[member] * d,  member = flat offset // (elements per member)

reading p, g, buf and lr once and writing buf and p once (PyTorch's separate ops made about 13
full passes over a big parameter). The first step (buf = d, as torch) stays on PyTorch.

The token embedding's gradient comes as rows (fleet/model.py `EmbeddingRows`: 64 tokens a member
against 50257 table rows): `fleet_sgd_` runs with a zero gradient (no gradient tensor is read), then
`fleet_sgd_rows_` adds each row, buf[row] += g and p[row] -= lr * g, which is the same update
(p - lr * (momentum * buf + g)) rounded in two steps.
Arithmetic is float32; products and sums may round differently from PyTorch's separate ops where
the compiler fuses them into FMAs, nothing more. The grid depends only on the parameter's size
and the scalars are launch arguments, so a launch is CUDA-graph safe (no host sync, no
allocation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _fleet_sgd_kernel(p_ptr, g_ptr, buf_ptr, lr_ptr, n, per_member, momentum, wd,
                      USE_WD: tl.constexpr, USE_BUF: tl.constexpr, HAS_G: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    if HAS_G:
        d = tl.load(g_ptr + offs, mask=mask, other=0.0)
    else:
        d = tl.zeros([BLOCK], tl.float32)
    lr = tl.load(lr_ptr + offs // per_member, mask=mask, other=0.0)
    if USE_WD:
        d = d + wd * p
    if USE_BUF:
        b = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        b = b * momentum + d
        tl.store(buf_ptr + offs, b, mask=mask)
        d = b
    tl.store(p_ptr + offs, p - lr * d, mask=mask)


@triton.jit
def _fleet_sgd_rows_kernel(p_ptr, buf_ptr, idx_ptr, rows_ptr, lr_ptr, count, width,
                           USE_BUF: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per member walks its gradient rows in order: rows of one token add up in that
    # order on every run (deterministic), and members own disjoint rows (no races).
    m = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dmask = d < width
    lr = tl.load(lr_ptr + m)
    for j in range(count):
        k = m * count + j
        row = tl.load(idx_ptr + k)
        g = tl.load(rows_ptr + k * width + d, mask=dmask, other=0.0)
        if USE_BUF:
            b = tl.load(buf_ptr + row * width + d, mask=dmask, other=0.0)
            tl.store(buf_ptr + row * width + d, b + g, mask=dmask)
        q = tl.load(p_ptr + row * width + d, mask=dmask, other=0.0)
        tl.store(p_ptr + row * width + d, q - lr * g, mask=dmask)


def supports(p: torch.Tensor, grad: torch.Tensor | None, buf: torch.Tensor | None) -> bool:
    """Whether `fleet_sgd_` takes these tensors: float32, contiguous, one shape (else PyTorch's path)."""
    ts = tuple(t for t in (p, grad, buf) if t is not None)
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape for t in ts) and p.numel() > 0


@torch.no_grad()
def fleet_sgd_(p: torch.Tensor, grad: torch.Tensor | None, buf: torch.Tensor | None, lr: torch.Tensor,
               momentum: float, weight_decay: float, block: int = BLOCK) -> None:
    """Update p (and buf, when momentum is used) in place; see the module doc. lr: (M,) float32,
    M = p.shape[0]; buf None means momentum 0; grad None means a zero gradient (`fleet_sgd_rows_`
    adds the rows that have one)."""
    n = p.numel()
    use_buf = buf is not None and momentum != 0
    grid = (triton.cdiv(n, block),)
    _fleet_sgd_kernel[grid](p, p if grad is None else grad, buf if use_buf else p, lr, n, n // p.shape[0],
                            float(momentum), float(weight_decay), USE_WD=weight_decay != 0, USE_BUF=use_buf,
                            HAS_G=grad is not None, BLOCK=block)


@torch.no_grad()
def fleet_sgd_rows_(p: torch.Tensor, buf: torch.Tensor | None, index: torch.Tensor, rows: torch.Tensor,
                    lr: torch.Tensor) -> None:
    """The gradient rows' part of the update, after `fleet_sgd_` with grad None: buf[row] += g and
    p[row] -= lr[member] * g for each (row, g), p (M, vocab, D) viewed as M * vocab rows; index
    (M * count,) int64 member-major, rows (M * count, D) float32 contiguous."""
    size, width = p.shape[0], p.shape[-1]
    _fleet_sgd_rows_kernel[(size,)](p, p if buf is None else buf, index, rows, lr, index.numel() // size, width,
                                    USE_BUF=buf is not None, BLOCK_D=triton.next_power_of_2(width))
