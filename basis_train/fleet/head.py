"""A fleet's batched fused head (fleet/model.py's `FleetGPT`, one chunk of rows on CUDA): every
member's linear head and mean cross-entropy as one autograd op, `FleetFusedCE`, and the helpers it
runs on: the vocabulary-chunked dX product, the softmax gradient with the invariant scalars' norms,
and the routing to the Triton kernels of fleet/kernels/head.py (also used by the fleet's
evaluation)."""

from __future__ import annotations

import functools

import torch

from basis_train.core.kernels import KernelRoute
from basis_train.core.sketch import SCALE_EPS
from basis_train.fleet.sketch import dw_product, dy_side, kept_side


class FleetFusedCE(torch.autograd.Function):
    """Every member's fused head in one chunk (rows <= chunk): per-member mean cross-entropy of
    x[m] W[m]^T. The logits are formed transposed, (M, vocab, rows), so that vocabulary chunks are
    contiguous blocks. Forward, once the log-sum-exp and the targets' logits are taken, turns them
    in place into dlogits = softmax - onehot and keeps that for backward: no second
    (M, rows, vocab) product. With keep False (no gradient wanted) nothing is kept and only the
    loss is formed. Keeping it holds one (M, rows, vocab) tensor from forward to backward (386 MB
    for the paper's 30 members); a fleet's reported memory figures are its members' single-run
    probes (fleet/loop.py `_measure`), so none of them changes.

    dX = dl W sums over the whole vocabulary for a tiny (rows, 64) result, which cuBLAS ran on a
    few dozen thread blocks (about 1.8 ms of a 6.6 ms step of 30 members on an H200,
    scripts/fleet_profile.py); `_dx` splits that sum over vocabulary chunks.

    The dW estimate of a sketched member is BasisLinear's: the rescaled sketch of x in forward
    times the rescaled sketch of its whole dlogits matrix (one chunk holds all of it), with the
    same bins and signs. With the batched sketch (S kept from forward) it is formed without
    the (M, Rmax, vocab) sketch of dlogits: (S dl)^T kept = dl^T (S^T kept), and the invariant
    scalar ||dl|| / ||S dl|| comes from the squared norms `_softmax_grad` adds up while it forms
    dl (one Triton pass on CUDA, fleet/kernels/head.py). Each member's grad_loss / rows
    scales the small (M, rows, 64) sides instead of dl, and the scalar's epsilon is divided by
    it, so the estimate is the one of scaled dlogits. Only rounding differs from BasisLinear.
    Without S (the per-member loop of large or gaussian sketches) backward sketches the scaled
    dlogits member by member (`dy_side`).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, seeds, sketch, keep=True):
        rows = x.shape[1]
        logits_t = torch.bmm(weight, x.transpose(1, 2))  # (M, vocab, rows); becomes dlogits below
        kernels = head_kernels_for(logits_t, None)
        lse = kernels.row_lse(logits_t) if kernels else torch.logsumexp(logits_t, dim=1)
        picked = logits_t.gather(1, targets.unsqueeze(1)).squeeze(1)
        loss = (lse - picked).sum(1) / rows
        if not keep:
            return loss
        kept, smat = (x, None) if sketch is None else kept_side(x, seeds, sketch)
        sums = _softmax_grad(logits_t, lse, targets, smat)  # logits_t is dlogits^T from here on
        ctx.save_for_backward(weight, logits_t, kept, seeds, smat, *sums)
        ctx.sketch = sketch
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        weight, dl_t, kept, seeds, smat, *sums = ctx.saved_tensors
        scale = (grad_loss / dl_t.shape[2]).view(-1, 1, 1)
        grad_x = _dx(dl_t, weight).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.sketch is None:
                grad_w = torch.bmm(dl_t, kept * scale)  # kept is x
            elif smat is not None:
                sumsq, sksq = sums
                c = ctx.sketch.consts(dl_t.shape[2], dl_t.device, dl_t.dtype)
                ratio = sumsq.sqrt() / (sksq.sqrt() + SCALE_EPS / scale.view(-1).abs())  # the scalar of scaled dl
                factor = torch.where(c.scalars, ratio, 1.0) * c.shrink
                side = torch.bmm(smat.transpose(1, 2), kept) * (factor.view(-1, 1, 1) * scale)
                grad_w = torch.bmm(dl_t, side)
            else:
                dl = dl_t.transpose(1, 2).mul(scale)
                gk, _, factor = dy_side(dl, kept.shape[1], seeds, smat, ctx.sketch)
                grad_w = dw_product(gk, kept, factor)
        return grad_x, grad_w, None, None, None, None


@functools.cache
def _vocab_chunks(vocab: int) -> int:
    """How many equal vocabulary chunks `_dx` sums over: the divisor of `vocab` whose chunks are
    closest to 2,048 entries (50257 = 29 x 1733), or 1 where `vocab` has none in 256..16384."""
    best = 1
    for c in range(2, vocab // 256 + 1):
        if vocab % c == 0 and vocab // c <= 16384 and abs(vocab // c - 2048) < abs(vocab // best - 2048):
            best = c
    return best


def _dx(dl_t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every member's dl W, (M, rows, N), from dl_t (M, vocab, rows) and weight (M, vocab, N): one batched
    product per vocabulary chunk (chunks are contiguous, so both sides are views), then their sum."""
    size, vocab, rows = dl_t.shape
    c = _vocab_chunks(vocab)
    part = torch.bmm(dl_t.reshape(size * c, vocab // c, rows).transpose(1, 2),
                     weight.reshape(size * c, vocab // c, weight.shape[2]))
    return part.view(size, c, rows, -1).sum(1)


def _softmax_grad(logits_t: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
                  smat: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """logits_t (M, vocab, rows) becomes (softmax - onehot) transposed in place; returns
    (||dl||^2 (M,), ||S dl||^2 (M,)), or () without S. One Triton pass where the kernel takes the
    tensors (fleet/kernels/head.py), else these PyTorch ops (CPU)."""
    kernels = head_kernels_for(logits_t, smat)
    if kernels:
        sumsq, sksq = kernels.softmax_grad_(logits_t, lse, targets, smat)
        return () if smat is None else (sumsq, sksq)
    dl_t = logits_t.sub_(lse.unsqueeze(1)).exp_()
    dl_t.scatter_add_(1, targets.unsqueeze(1), dl_t.new_full((targets.shape[0], 1, targets.shape[1]), -1.0))
    if smat is None:
        return ()
    return dl_t.square().sum((1, 2)), torch.bmm(smat, dl_t.transpose(1, 2)).square().sum((1, 2))


KERNELS = KernelRoute("basis_train.fleet.kernels.head", "the fleet head forms its softmax gradient with PyTorch")


def head_kernels_for(logits_t: torch.Tensor, smat: torch.Tensor | None, lse_only: bool = False):
    """fleet/kernels/head.py where it takes these tensors on their device (with `lse_only`,
    where `row_lse` takes logits_t: any float32 tensor), else None."""
    kernels = KERNELS.on(logits_t.device.type)
    if not kernels:
        return None
    ok = logits_t.dtype == torch.float32 if lse_only else kernels.supports(logits_t, smat)
    return kernels if ok else None
