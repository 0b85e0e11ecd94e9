"""The BASIS estimator against a float64 reference (docs/paper.md section 1)."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.memory import SavedTensorMeter
from basis_train.core.sketch import count_sketch_reference, sketch_bins, sketch_permutation, sketch_stats

F64 = torch.float64


def grads(layer: nn.Linear, x: torch.Tensor, dy: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad.clone(), None if layer.bias is None else layer.bias.grad.clone()


def pair(n_in=6, n_out=5, seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.Linear(n_in, n_out, dtype=F64)
    basis = BasisLinear(n_in, n_out, dtype=F64, **kw)
    basis.load_state_dict(ref.state_dict())
    return ref, basis


@pytest.mark.parametrize("rank", [12, 1000])  # rows = 3 * 4 = 12; 1000 exercises R_safe = min(R, rows)
def test_rank_equal_rows_is_exact_up_to_lambda(rank):
    ref, basis = pair(rank=rank, lam=0.01)
    x, dy = torch.randn(3, 4, 6, dtype=F64), torch.randn(3, 4, 5, dtype=F64)
    y0, dx0, dw0, db0 = grads(ref, x, dy)
    y1, dx1, dw1, db1 = grads(basis, x, dy)
    assert_close(y1, y0)
    assert_close(dx1, dx0)
    assert_close(db1, db0)
    assert_close(dw1, 0.99**2 * dw0)


def test_dx_and_db_exact_at_low_rank_and_dw_is_not():
    ref, basis = pair(rank=2)
    x, dy = torch.randn(32, 6, dtype=F64), torch.randn(32, 5, dtype=F64)
    _, dx0, dw0, db0 = grads(ref, x, dy)
    _, dx1, dw1, db1 = grads(basis, x, dy)
    assert_close(dx1, dx0)
    assert_close(db1, db0)
    assert (dw1 - dw0).norm() > 0.1 * dw0.norm()


def monte_carlo(basis, x, dy, draws):
    torch.manual_seed(1234)
    est = torch.stack([grads(basis, x, dy)[2] for _ in range(draws)])
    return est.mean(0), est.std(0) / draws**0.5


@pytest.mark.parametrize("kind", ["balanced", "uniform", "gaussian"])
def test_unbiased_without_scalars_and_lambda(kind):
    ref, basis = pair(n_in=4, n_out=3, rank=3, sketch=kind, invariant_scalars=False, lam=0.0)
    torch.manual_seed(7)
    x, dy = torch.randn(13, 4, dtype=F64), torch.randn(13, 3, dtype=F64)
    exact = grads(ref, x, dy)[2]
    mean, se = monte_carlo(basis, x, dy, 3000)
    z = (mean - exact).abs() / se
    assert z.max() < 4.5, f"max |z| = {z.max():.2f}"


def test_monte_carlo_check_has_power():
    # The same check must reject a biased estimator (lambda = 0.2 shrinks dW by 0.64),
    # otherwise passing it says nothing.
    ref, basis = pair(n_in=4, n_out=3, rank=3, invariant_scalars=False, lam=0.2)
    torch.manual_seed(7)
    x, dy = torch.randn(13, 4, dtype=F64), torch.randn(13, 3, dtype=F64)
    exact = grads(ref, x, dy)[2]
    mean, se = monte_carlo(basis, x, dy, 3000)
    assert ((mean - exact).abs() / se).max() > 6


@pytest.mark.parametrize("rows,rank", [(64, 32), (64, 64), (65, 8), (100, 7), (5, 3), (1, 1)])
def test_balanced_bin_sizes(rows, rank):
    for s in range(20):
        sizes = torch.bincount(sketch_bins(torch.tensor(s), rows, rank), minlength=rank)
        assert sizes.sum() == rows
        assert set(sizes.tolist()) <= {rows // rank, -(-rows // rank)}


def test_permutation_is_uniform_and_seeded():
    rows, draws = 6, 6000
    first = torch.stack([sketch_permutation(torch.tensor(s), rows) for s in range(draws)])[:, 0]
    freq = torch.bincount(first, minlength=rows).double() / draws
    assert_close(freq, torch.full((rows,), 1 / rows, dtype=F64), atol=0.025, rtol=0)
    assert torch.equal(sketch_permutation(torch.tensor(3), 50), sketch_permutation(torch.tensor(3), 50))
    assert not torch.equal(sketch_permutation(torch.tensor(3), 50), sketch_permutation(torch.tensor(4), 50))


def test_balanced_has_lower_error_than_uniform():
    # Two rows collide with probability (B/R - 1)/(B - 1) under balanced bins and 1/R under
    # uniform ones: 1/31 vs 1/16 here, so the error roughly halves.
    torch.manual_seed(0)
    x, dy = torch.randn(32, 8, dtype=F64), torch.randn(32, 6, dtype=F64)
    exact = x.t() @ dy

    def mse(hashing):
        errs = []
        for s in range(2000):
            seed = torch.tensor(s)
            est = count_sketch_reference(x, seed, 16, hashing).t() @ count_sketch_reference(dy, seed, 16, hashing)
            errs.append(((est - exact) ** 2).sum())
        return torch.stack(errs).mean()

    assert mse("balanced") < 0.7 * mse("uniform")


def test_fast_sketch_matches_reference():
    for rows, rank in [(64, 8), (67, 8), (10, 10), (9, 4)]:
        m = torch.randn(rows, 5, dtype=F64)
        seed = torch.tensor(rows * rank)
        assert_close(sketch_stats(m, seed, rank)[0], count_sketch_reference(m, seed, rank))


def test_rank_one_norm_identity():
    lam = 0.01
    ref, basis = pair(rank=1, lam=lam)
    x, dy = torch.randn(40, 6, dtype=F64), torch.randn(40, 5, dtype=F64)
    dw = grads(basis, x, dy)[2]
    assert_close(dw.norm(), (1 - lam) ** 2 * x.norm() * dy.norm())
    assert torch.linalg.matrix_rank(dw) == 1


def saved_bytes_of(layer, rows):
    x = torch.randn(rows, layer.in_features, requires_grad=True)
    meter = SavedTensorMeter(params=layer.parameters())
    with meter.measure():
        y = layer(x)
    y.sum().backward()
    return meter.activation_bytes


def test_saved_bytes_scale_with_rank_not_rows():
    n_in, n_out = 32, 16
    b8 = BasisLinear(n_in, n_out, rank=8)
    b16 = BasisLinear(n_in, n_out, rank=16)
    assert saved_bytes_of(b8, 256) == saved_bytes_of(b8, 4096)
    seed_bytes = 8
    assert saved_bytes_of(b8, 256) == 8 * n_in * 4 + seed_bytes
    assert saved_bytes_of(b16, 256) - seed_bytes == 2 * (saved_bytes_of(b8, 256) - seed_bytes)
    exact = nn.Linear(n_in, n_out)
    assert saved_bytes_of(exact, 4096) == 16 * saved_bytes_of(exact, 256) == 4096 * n_in * 4


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", None, True])
def test_bad_rank_raises(bad):
    with pytest.raises(ValueError, match="rank"):
        BasisLinear(4, 4, rank=bad)


def test_eval_and_no_grad_are_plain_linear():
    ref, basis = pair(rank=2)
    x = torch.randn(7, 6, dtype=F64, requires_grad=True)
    basis.eval()
    assert basis(x).grad_fn.name() == ref(x).grad_fn.name()
    basis.train()
    with torch.no_grad():
        assert_close(basis(x), ref(x))
    assert "BasisLinearFunction" in basis(x).grad_fn.name()
    assert list(basis.state_dict()) == list(ref.state_dict())


def test_seeded_reproducibility():
    _, basis = pair(rank=3)
    x, dy = torch.randn(20, 6, dtype=F64), torch.randn(20, 5, dtype=F64)
    torch.manual_seed(5)
    a = grads(basis, x, dy)[2]
    torch.manual_seed(5)
    b = grads(basis, x, dy)[2]
    c = grads(basis, x, dy)[2]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cpu_bf16_autocast():
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    basis = BasisLinear(16, 8, rank=64, lam=0.0)
    basis.load_state_dict(ref.state_dict())
    x, dy = torch.randn(64, 16), torch.randn(64, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = basis(x.requires_grad_(True))
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert basis.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    # R = rows: the sketch is a signed permutation of the bf16-rounded dY and fp32 X.
    assert_close(basis.weight.grad, dy.bfloat16().float().t() @ x, rtol=1e-4, atol=1e-4)


def test_torch_compile_matches_eager():
    # Compiled graphs may draw the sketch seeds in another order than eager, so compare
    # at R = rows (a signed permutation: every draw gives the same dW) and check that a
    # seed still reproduces the compiled low-rank run.
    def build(rank):
        torch.manual_seed(0)
        return nn.Sequential(BasisLinear(8, 16, rank=rank), nn.GELU(), BasisLinear(16, 4, rank=rank))

    x = torch.randn(2, 10, 8)

    def run(model, fn):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        fn(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    full = build(20)
    for a, b in zip(run(full, full), run(full, torch.compile(full, backend="aot_eager"))):
        assert_close(a, b)
    low = build(3)
    compiled = torch.compile(low, backend="aot_eager")
    for a, b in zip(run(low, compiled), run(low, compiled)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scalars", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_rescale_factor_is_what_rescale_multiplies_by(scalars, lam):
    from basis_train.core.sketch import SketchSpec, rescale, rescale_factor

    g = torch.Generator().manual_seed(3)
    s = torch.randn(8, 5, generator=g, dtype=torch.float64)
    full = torch.tensor(41.5, dtype=torch.float64)
    spec = SketchSpec(rank=8, scalars=scalars, lam=lam)
    # (s c)(1 - lam) against s (c (1 - lam)): one float64 rounding apart, 2**-53 relative each
    torch.testing.assert_close(s * rescale_factor(s, full, spec), rescale(s, full, spec), rtol=1e-15, atol=0)
