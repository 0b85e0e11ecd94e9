"""fleet/head.py's batched fused head (`FleetFusedCE`) against the form it had before it kept its
dlogits from forward and formed the sketched dW as dl^T (S^T kept): the head that recomputed the
logits in backward and sketched the scaled dlogits, written out here. They differ by float32
rounding only (the head now forms its logits transposed and sums dX over vocabulary chunks). Then the one-pass
softmax-gradient kernel (fleet/kernels/head.py) under Triton's interpreter against the
PyTorch path it replaces on CUDA."""


import pytest
import torch
from torch.testing import assert_close

from basis_train.core.sketch import SketchSpec, draw_seed
from basis_train.fleet import head as fleet_head
from basis_train.fleet.head import FleetFusedCE
from basis_train.fleet.sketch import FleetSketch, dw_product, dy_side, kept_side

from tolerance import assert_fp32_sum_close, small_integers


class _RecomputingCE(torch.autograd.Function):
    """The head before: logits dropped in forward, recomputed with a bmm in backward."""

    @staticmethod
    def forward(ctx, x, weight, targets, seeds, sketch):
        rows = x.shape[1]
        logits = torch.bmm(x, weight.transpose(1, 2))
        lse = torch.logsumexp(logits, dim=2)
        picked = logits.gather(2, targets.unsqueeze(2)).squeeze(2)
        loss = (lse - picked).sum(1) / rows
        kept, smat = (x, None) if sketch is None else kept_side(x, seeds, sketch)
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
            gk, _, factor = dy_side(dl, kept.shape[1], seeds, smat, ctx.sketch)
            grad_w = dw_product(gk, kept, factor)  # the sketched dW product, as fleet/sketch.py forms it
        return grad_x, grad_w, None, None, None


PLANS = {
    "exact": None,
    "mixed": (None, SketchSpec(8, "balanced", True, 0.01), SketchSpec(3, "uniform", False, 0.0),
              SketchSpec(64, "balanced", True, 0.01)),
    "small-S": (SketchSpec(4, "balanced", True, 0.01), None, None, SketchSpec(2, "uniform", True, 0.0)),
}


def _problem(rows: int, m: int = 4, n: int = 16, vocab: int = 97):
    """x, W, targets and sketch seeds of `m` members, and weights of the members' losses that differ
    (one negative: the invariant scalar's epsilon must use its magnitude)."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(m, rows, n, generator=g)
    w = torch.randn(m, vocab, n, generator=g) * 0.3
    targets = torch.randint(0, vocab, (m, rows), generator=g)
    seeds = torch.stack([draw_seed(torch.device("cpu"), g) for _ in range(m)])
    return x, w, targets, seeds, torch.tensor([1.0, 0.5, 2.0, -0.25])


def _head_grads(fn, plans, x0, w0, targets, seeds, grad_loss):
    """(loss, dX, dW) of the head `fn` (an autograd Function) on fresh copies of x0 and w0."""
    x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    loss = fn.apply(x, w, targets, seeds, None if plans is None else FleetSketch(plans))
    loss.backward(grad_loss)
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("rows", [10, 33])
def test_head_keeping_dlogits_equals_the_recomputing_head(name, rows, monkeypatch):
    plans = PLANS[name]
    if name == "small-S":  # the per-member loop (`_kept_rows`, `_sketched_rows`), not the dense S
        monkeypatch.setattr("basis_train.fleet.sketch.MAX_DENSE", 0)
    problem = _problem(rows)
    out = [_head_grads(fn, plans, *problem) for fn in (FleetFusedCE, _RecomputingCE)]
    for what, new, old in zip(("loss", "dX", "dW"), *out):
        assert_close(new, old, rtol=1e-5, atol=1e-6, msg=what)


def test_no_grad_head_loss():
    """Under no_grad the head (which then forms no dlogits) still gives each member's mean cross-entropy."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(2, 31, 8, generator=g)
    targets = torch.randint(0, 31, (2, 5), generator=g)
    seeds = torch.zeros(2, dtype=torch.int64)
    with torch.no_grad():
        loss = FleetFusedCE.apply(x, w, targets, seeds, None, torch.is_grad_enabled())
    expected = torch.nn.functional.cross_entropy(torch.bmm(x, w.transpose(1, 2)).flatten(0, 1), targets.flatten(),
                                                 reduction="none").view(2, -1).mean(1)
    torch.testing.assert_close(loss, expected)


@pytest.fixture()
def interpreted(monkeypatch, interpreted_kernel):
    """fleet/kernels/head.py under Triton's interpreter, routed to for CPU tensors."""
    module = interpreted_kernel("basis_train.fleet.kernels.head", "the interpreter runs where there is no GPU")
    calls = []
    launch = module.softmax_grad_

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs, block_v=32)  # several tiles and a ragged last one

    monkeypatch.setattr(module, "softmax_grad_", counted)
    module.calls = calls
    return module


@pytest.mark.parametrize("name", ["exact", "mixed"])
@pytest.mark.parametrize("rows", [10, 33])
def test_interpreted_head_kernel_matches_the_pytorch_path(interpreted, monkeypatch, name, rows):
    problem = _problem(rows)
    monkeypatch.setattr(fleet_head.KERNELS, "module", interpreted)
    out = []
    for devices in ({"cuda"}, {"cpu", "cuda"}):  # the PyTorch path, then the interpreted kernel
        monkeypatch.setattr(fleet_head.KERNELS, "devices", devices)
        out.append(_head_grads(FleetFusedCE, PLANS[name], *problem))
    assert len(interpreted.calls) == 1, "the kernel was not the second head's path"
    for what, new, old in zip(("loss", "dX", "dW"), *out):
        assert_close(new, old, rtol=1e-5, atol=1e-6, msg=what)


def test_interpreted_kernel_norms_and_dlogits(interpreted):
    """dlogits, ||dl||^2 and ||S dl||^2 of the kernel against float64, with rows that are not a power
    of two, a sketch width below the rows and a vocabulary of several tiles plus a ragged one; on
    the head's transposed (M, vocab, rows) layout."""
    g = torch.Generator().manual_seed(3)
    m, rows, vocab, width = 3, 21, 75, 5
    logits = torch.randn(m, rows, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (m, rows), generator=g)
    smat = torch.randint(-1, 2, (m, width, rows), generator=g).float()
    lse = torch.logsumexp(logits, 2)
    ref = torch.softmax(logits.double(), 2) - torch.nn.functional.one_hot(targets, vocab).double()
    dl_t = logits.transpose(1, 2).contiguous()
    sumsq, sksq = interpreted.softmax_grad_(dl_t, lse, targets, smat)
    assert_close(dl_t, ref.transpose(1, 2).float(), rtol=1e-5, atol=1e-6)
    assert_close(sumsq.double(), ref.square().sum((1, 2)), rtol=1e-5, atol=1e-6)
    assert_close(sksq.double(), torch.bmm(smat.double(), ref).square().sum((1, 2)), rtol=1e-5, atol=1e-6)
    dl2 = logits.transpose(1, 2).contiguous()
    assert interpreted.softmax_grad_(dl2, lse, targets, None)[1] is None
    assert torch.equal(dl2, dl_t)


@pytest.mark.parametrize("vocab", [75, 50, 4000])
def test_interpreted_row_lse(interpreted, vocab):
    """The chunked log-sum-exp against float64: one ragged chunk, an exact tile, chunks of several tiles
    whose last tiles are empty, and rows (21) that are not a power of two; large logits do not overflow."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, 21, generator=g) * 4 + torch.tensor([0.0, 80.0, -80.0]).view(3, 1, 1)
    lse = interpreted.row_lse(logits, block_v=16, tiles=4)
    assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=1e-6, atol=1e-5)


def test_dx_over_vocabulary_chunks():
    """`_dx` (a sum over vocabulary chunks) against one float64 product, where the vocabulary splits
    into chunks (4000 = 2 x 2000) and where it does not (a prime: one chunk): exactly on small
    integers (every term counted once, at its place), and within the float32 rounding bound of a
    sum of `vocab` terms on normal draws (tests/tolerance.py)."""
    g = torch.Generator().manual_seed(0)
    for vocab, chunks in ((4000, 2), (4001, 1), (50257, 29)):
        assert fleet_head._vocab_chunks(vocab) == chunks
        dl_t, w = small_integers(3, vocab, 7, generator=g), small_integers(3, vocab, 5, generator=g)
        expected = torch.bmm(dl_t.double().transpose(1, 2), w.double())
        assert torch.equal(fleet_head._dx(dl_t, w).double(), expected), vocab
        dl_t, w = torch.randn(3, vocab, 7, generator=g), torch.randn(3, vocab, 5, generator=g)
        expected = torch.bmm(dl_t.double().transpose(1, 2), w.double())
        abs_sum = torch.bmm(dl_t.double().abs().transpose(1, 2), w.double().abs())
        assert_fp32_sum_close(fleet_head._dx(dl_t, w), expected, abs_sum, vocab, msg=f"vocab {vocab}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["exact", "mixed"])
def test_cuda_head_kernel_matches_the_pytorch_path(monkeypatch, name):
    """On a GPU, at the paper's shape (64 rows, vocabulary 50257, width 64): the compiled kernel's head
    against the PyTorch path, float32 with TF32 off."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    plans = PLANS[name]
    dev = torch.device("cuda")
    m, rows, n, vocab = 4, 64, 64, 50257
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(m, rows, n, generator=g, device=dev)
    w0 = torch.randn(m, vocab, n, generator=g, device=dev) * 0.1
    targets = torch.randint(0, vocab, (m, rows), generator=g, device=dev)
    seeds = torch.stack([draw_seed(dev, g) for _ in range(m)])
    grad_loss = torch.tensor([1.0, 0.5, 2.0, 0.25], device=dev)
    out = []
    for devices in (set(), {"cuda"}):
        monkeypatch.setattr(fleet_head.KERNELS, "devices", devices)
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        sketch = None if plans is None else FleetSketch(plans)
        loss = FleetFusedCE.apply(x, w, targets, seeds, sketch)
        loss.backward(grad_loss)
        out.append((loss.detach(), x.grad, w.grad))
    assert fleet_head.KERNELS.module, "the kernel module did not load"
    for what, new, old in zip(("loss", "dX", "dW"), *out):
        assert_close(new, old, rtol=1e-4, atol=1e-6, msg=what)


@pytest.mark.parametrize("rows", [21, 130])
def test_interpreted_row_lse_in_row_blocks(interpreted, rows):
    """The evaluation's use: many rows (tokens) in blocks of 32, the last one ragged."""
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(2, 300, rows, generator=g) * 3
    lse = interpreted.row_lse(logits, block_v=32, tiles=2, block_rows=32)
    assert_close(lse.double(), torch.logsumexp(logits.double(), 1), rtol=1e-6, atol=1e-5)


def test_fleet_evaluation_through_the_interpreted_kernel(interpreted, monkeypatch):
    """FleetGPT.eval_loss_sums with the head kernels (the CUDA path) against F.cross_entropy (the CPU
    path) on a small fleet of three members."""
    from basis_train.core.model import GPTConfig, build_gpt
    from basis_train.fleet.model import FleetGPT

    cfg = GPTConfig(vocab_size=211, block_size=16, n_embd=16, n_head=2, n_layer=1, head="fused", head_chunk=64)
    fleet_model = FleetGPT([build_gpt(cfg, seed=s, method="exact") for s in range(3)], [None] * 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 211, (5, 16), generator=g), torch.randint(0, 211, (5, 16), generator=g)
    expected = fleet_model.eval_loss_sums(x, y)
    monkeypatch.setattr(fleet_head.KERNELS, "module", interpreted)
    monkeypatch.setattr(fleet_head.KERNELS, "devices", {"cpu", "cuda"})
    got = fleet_model.eval_loss_sums(x, y)
    assert got.dtype == torch.float64 and expected.shape == (3,) and len(set(expected.tolist())) == 3
    assert_close(got, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fleet_evaluation_kernel_matches_cross_entropy(monkeypatch):
    """On a GPU, at the paper's vocabulary: the evaluation through `row_lse` against F.cross_entropy."""
    from basis_train.core.model import GPTConfig, build_gpt
    from basis_train.fleet.model import FleetGPT

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = GPTConfig(vocab_size=50257, block_size=64, n_embd=64, n_head=2, n_layer=2, head="fused", head_chunk=256)
    fleet_model = FleetGPT([build_gpt(cfg, seed=s, method="exact") for s in range(3)], [None] * 3).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randint(0, 50257, (32, 64), generator=g, device="cuda") for _ in range(2))
    got = fleet_model.eval_loss_sums(x, y)
    monkeypatch.setattr(fleet_head.KERNELS, "devices", set())
    expected = fleet_model.eval_loss_sums(x, y)
    assert fleet_head.KERNELS.module, "the kernel module did not load"
    assert_close(got, expected, rtol=1e-6, atol=0.0)
