"""A fleet's SGD update in one pass per stacked parameter (training/fleet_optim.py's CUDA path).

It lives with the other Triton kernels (core/kernels/) rather than under training/: the tests load
every kernel module from this folder under Triton's interpreter the same way, and importing it needs
Triton, which training/ never imports directly.

For a stacked parameter p [M, ...] with gradient g, momentum buffer buf (same shape, contiguous)
and the members' learning rates lr (M,) float32, each element does torch.optim.SGD's update
(dampening 0, no Nesterov) after the first step:

    d = g + wd * p          (only where wd != 0)
    buf = momentum * buf + d  ;  d = buf   (only where momentum != 0)
    p = p - lr[member] * d,  member = flat offset // (elements per member)

reading p, g, buf and lr once and writing buf and p once (PyTorch's separate ops made about 13
full passes over a big parameter). The first step (buf = d, as torch) stays on PyTorch.
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
                      USE_WD: tl.constexpr, USE_BUF: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    d = tl.load(g_ptr + offs, mask=mask, other=0.0)
    lr = tl.load(lr_ptr + offs // per_member, mask=mask, other=0.0)
    if USE_WD:
        d = d + wd * p
    if USE_BUF:
        b = tl.load(buf_ptr + offs, mask=mask, other=0.0)
        b = b * momentum + d
        tl.store(buf_ptr + offs, b, mask=mask)
        d = b
    tl.store(p_ptr + offs, p - lr * d, mask=mask)


def supports(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None) -> bool:
    """Whether `fleet_sgd_` takes these tensors: float32, contiguous, one shape (else PyTorch's path)."""
    ts = (p, grad) if buf is None else (p, grad, buf)
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape for t in ts) and p.numel() > 0


@torch.no_grad()
def fleet_sgd_(p: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, lr: torch.Tensor,
               momentum: float, weight_decay: float, block: int = BLOCK) -> None:
    """Update p (and buf, when momentum is used) in place; see the module doc. lr: (M,) float32,
    M = p.shape[0]; buf None means momentum 0."""
    n = p.numel()
    use_buf = buf is not None and momentum != 0
    grid = (triton.cdiv(n, block),)
    _fleet_sgd_kernel[grid](p, grad, buf if use_buf else p, lr, n, n // p.shape[0], float(momentum),
                            float(weight_decay), USE_WD=weight_decay != 0, USE_BUF=use_buf, BLOCK=block)
