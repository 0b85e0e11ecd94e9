"""core/fleet.py's batched fused head (`_FleetFusedCE`) against the form it had before it kept its
dlogits from forward: the head that recomputed the logits in backward, written out here. Same ops
on the same values in the same order, so loss and gradients must be bit for bit equal on CPU."""

import pytest
import torch

from basis_train.core.fleet import _dw_product, _dy_side, _FleetFusedCE, _kept
from basis_train.core.fleet_sketch import FleetSketch
from basis_train.core.sketch import draw_seed


class _RecomputingCE(torch.autograd.Function):
    """The head before: logits dropped in forward, recomputed with a bmm in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, seeds, sketch):
        rows = x.shape[1]
        logits = torch.bmm(x, weight.transpose(1, 2))
        lse = torch.logsumexp(logits, dim=2)
        picked = logits.gather(2, targets.unsqueeze(2)).squeeze(2)
        loss = (lse - picked).sum(1) / rows
        kept, smat = (x, None) if sketch is None else _kept(x, seeds, sketch)
        ctx.save_for_backward(x, weight, targets, lse, kept, seeds, smat)
        ctx.sketch = sketch
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, targets, lse, kept, seeds, smat = ctx.saved_tensors
        rows = x.shape[1]
        dl = torch.bmm(x, weight.transpose(1, 2))
        dl.sub_(lse.unsqueeze(2)).exp_()
        dl.scatter_add_(2, targets.unsqueeze(2), dl.new_full((*targets.shape, 1), -1.0))
        dl.mul_((grad_loss / rows).view(-1, 1, 1))
        grad_x = torch.bmm(dl, weight)
        if ctx.sketch is None:
            grad_w = torch.bmm(dl.transpose(1, 2), x)
        else:
            gk, _, factor = _dy_side(dl, kept.shape[1], seeds, smat, ctx.sketch)
            grad_w = _dw_product(gk, kept, factor)  # the sketched dW product, as core/fleet.py forms it
        return grad_x, grad_w, None, None, None


PLANS = {
    "exact": None,
    "mixed": (None, (8, "balanced", True, 0.01), (3, "uniform", False, 0.0), (64, "balanced", True, 0.01)),
    "small-S": ((4, "balanced", True, 0.01), None, None, (2, "uniform", True, 0.0)),
}


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("rows", [10, 33])
def test_head_keeping_dlogits_equals_the_recomputing_head(name, rows, monkeypatch):
    plans = PLANS[name]
    if name == "small-S":  # the per-member loop (`_kept_rows`, `_sketched_rows`), not the dense S
        monkeypatch.setattr("basis_train.core.fleet_sketch.MAX_DENSE", 0)
    m, n, vocab = 4, 16, 97
    g = torch.Generator().manual_seed(rows)
    x0 = torch.randn(m, rows, n, generator=g)
    w0 = torch.randn(m, vocab, n, generator=g) * 0.3
    targets = torch.randint(0, vocab, (m, rows), generator=g)
    seeds = torch.stack([draw_seed(torch.device("cpu"), g) for _ in range(m)])
    grad_loss = torch.tensor([1.0, 0.5, 2.0, -0.25])  # the members' losses weighted differently
    out = []
    for fn in (_FleetFusedCE, _RecomputingCE):
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        sketch = None if plans is None else FleetSketch(plans)
        loss = fn.apply(x, w, targets, seeds, sketch)
        loss.backward(grad_loss)
        out.append((loss.detach(), x.grad, w.grad))
    for what, new, old in zip(("loss", "dX", "dW"), *out):
        assert torch.equal(new, old), what


def test_no_grad_head_loss():
    """Under no_grad the head (which then forms no dlogits) still gives each member's mean cross-entropy."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(2, 31, 8, generator=g)
    targets = torch.randint(0, 31, (2, 5), generator=g)
    seeds = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        loss = _FleetFusedCE.apply(x, w, targets, seeds, None, torch.is_grad_enabled())
    expected = torch.nn.functional.cross_entropy(torch.bmm(x, w.transpose(1, 2)).flatten(0, 1), targets.flatten(),
                                                 reduction="none").view(2, -1).mean(1)
    torch.testing.assert_close(loss, expected)
