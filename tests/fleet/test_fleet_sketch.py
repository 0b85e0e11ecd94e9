"""The member-batched fleet sketch (fleet/sketch.py) against each member sketched alone.

Every member's bins and signs must be the ones core/sketch.py draws for that member by itself
(PyTorch path, and the Triton kernel under the interpreter), and the batched rescaled sketches
of x and dY the per-member `scaled_sketch` / `sketch_stats` + `rescale` results. The last test
guards the point of it all: a fleet step's op count does not grow with the fleet.
"""


import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.core.sketch import SketchSpec, draw_seed, rescale, scaled_sketch, sketch_bins, sketch_signs, sketch_stats
from basis_train.fleet import sketch as fleet_sketch
from basis_train.fleet.head import FleetFusedCE
from basis_train.fleet.model import FleetGPT, FleetLinear
from basis_train.fleet.sketch import FleetSketch, dw_product, dy_side, safe_ranks

# Exact, balanced and uniform members; R = 1; R above every row count here; scalars on and off; lam 0 and 0.01.
S = SketchSpec
MIX = (None, S(8, "balanced", True, 0.01), S(32, "uniform", True, 0.01), S(1, "balanced", True, 0.0),
       S(1, "uniform", False, 0.01), S(5000, "balanced", False, 0.0), S(4096, "uniform", True, 0.0), None,
       S(3, "balanced", False, 0.01), S(8, "uniform", False, 0.0))
ROWS = (6, 64, 100, 1000)


def seeds_for(plans, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.stack([draw_seed(torch.device("cpu"), g) for _ in plans])
    s[1], s[2] = 0, 2**32 - 1  # the ends of the seed range
    return torch.where(torch.tensor([p is None for p in plans]), 0, s)


def check_bins_and_signs(bins, signs, seeds, rows, plans):
    assert bins.shape == signs.shape == (len(plans), rows) and bins.dtype == torch.int64
    for m, (p, r) in enumerate(zip(plans, safe_ranks(plans, rows))):
        if p is None:
            assert torch.equal(bins[m], torch.arange(rows)) and torch.equal(signs[m], torch.ones(rows)), m
        else:
            assert torch.equal(bins[m], sketch_bins(seeds[m], rows, r, p.kind)), (rows, m, p)
            assert torch.equal(signs[m], sketch_signs(seeds[m], rows)), (rows, m, p)


@pytest.mark.parametrize("rows", ROWS)
def test_torch_bins_and_signs_are_each_members_own(rows):
    seeds = seeds_for(MIX)
    check_bins_and_signs(*FleetSketch(MIX).bins_and_signs(seeds, rows), seeds, rows, MIX)


@pytest.mark.parametrize("plans", [MIX[1:3], (MIX[2], MIX[4]), (MIX[1], MIX[3]), (None, MIX[6])],
                         ids=["balanced+uniform", "uniform only", "balanced only", "exact+uniform"])
def test_torch_bins_and_signs_of_fleets_without_every_mode(plans):
    # Modes no member uses are not computed at all (c.has): the others must still come out right.
    seeds = seeds_for((None, None, *plans))[2:]
    check_bins_and_signs(*FleetSketch(plans).bins_and_signs(seeds, 100), seeds, 100, plans)


@pytest.fixture()
def interpreted(monkeypatch, interpreted_kernel):
    """fleet/kernels/bins.py under Triton's interpreter, routed to for CPU tensors (as
    tests/core/test_sketch_kernels.py does for the single-run kernels)."""
    module = interpreted_kernel(fleet_sketch.KERNELS.name, "with a GPU the compiled kernel runs in the fleet tests instead")
    monkeypatch.setattr(fleet_sketch.KERNELS, "module", module)
    monkeypatch.setattr(fleet_sketch.KERNELS, "devices", {"cpu", "cuda"})
    return module


@pytest.mark.parametrize("rows", ROWS)
def test_interpreted_kernel_bins_and_signs_are_each_members_own(interpreted, rows):
    seeds = seeds_for(MIX, seed=rows)
    fs = FleetSketch(MIX)
    c = fs.consts(rows, seeds.device, torch.float32)
    # Small blocks: several row blocks per member, and a ragged last one.
    bins, signs = interpreted.bins_and_signs(seeds, c.modes, c.ranks, rows, block=64)
    check_bins_and_signs(bins, signs, seeds, rows, MIX)
    # The routed call (one launch, default block) gives the same.
    routed = fs.bins_and_signs(seeds, rows)
    assert torch.equal(routed[0], bins) and torch.equal(routed[1], signs)


def member_results(x, dy, seeds, plans):
    """Each member alone, through core/sketch.py: (kept rows of x, dY side) as BasisLinear forms them."""
    out = []
    for m, (p, r) in enumerate(zip(plans, safe_ranks(plans, x.shape[1]))):
        if p is None:
            out.append((x[m], dy[m]))
            continue
        gs, sumsq, _ = sketch_stats(dy[m], seeds[m], r, p.kind)
        out.append((scaled_sketch(x[m], seeds[m], p, r), rescale(gs, sumsq, p)))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rows", [6, 64, 100])
def test_batched_sketches_equal_each_members_own(dtype, rows):
    torch.manual_seed(rows)
    plans = MIX
    seeds = seeds_for(plans, seed=7)
    x, dy = torch.randn(len(plans), rows, 24, dtype=dtype), torch.randn(len(plans), rows, 40, dtype=dtype)
    fs = FleetSketch(plans)
    smat = fs.matrix(seeds, rows, dtype)
    width = max(safe_ranks(plans, rows))
    assert smat.shape == (len(plans), width, rows) and smat.dtype == dtype
    kept, dside = fs.scaled(smat, x), fs.scaled(smat, dy)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for m, (r, (ek, ed)) in enumerate(zip(safe_ranks(plans, rows), member_results(x, dy, seeds, plans))):
        if plans[m] is None:  # the identity, factor 1: the member's own rows, bit for bit
            assert torch.equal(kept[m, :rows], x[m]) and torch.equal(dside[m, :rows], dy[m])
        assert_close(kept[m, :r], ek.to(dtype), **tol, msg=f"x of member {m} {plans[m]}")
        assert_close(dside[m, :r], ed.to(dtype), **tol, msg=f"dY of member {m} {plans[m]}")
        assert not kept[m, r:].any() and not dside[m, r:].any()  # zero padding: no term in the dW product


def test_interpreted_kernel_matrix_equals_torch_matrix(interpreted, monkeypatch):
    seeds, fs = seeds_for(MIX), FleetSketch(MIX)
    kernel = fs.matrix(seeds, 100, torch.float32)
    monkeypatch.setattr(fleet_sketch.KERNELS, "module", False)  # the PyTorch path, as without Triton
    assert torch.equal(fs.matrix(seeds, 100, torch.float32), kernel)


# (rows, O, N), R = rows (MIX has exact members): the head (O = vocab, wide) and an FC-like layer (O > N)
# scale the kept side, a Proj-like one (O < N) the dY side, and one with R > O, N the product.
DW_SHAPES = [(64, 300, 16), (32, 100, 20), (32, 20, 100), (100, 8, 6)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("rows", "o", "n"), DW_SHAPES)
def test_dw_product_folds_the_dy_factor_into_the_smallest_tensor(dtype, rows, o, n):
    """The dW product with the dY side's factor applied to the smallest of its three tensors equals
    the product of the rescaled sketch `scaled(S, dY)` (as formed before) up to rounding: bit for
    bit where the factor is 1 (exact members; no scalars, lam 0), 1e-12 in float64, 1e-6 in float32."""
    torch.manual_seed(rows + o)
    plans = MIX
    seeds = seeds_for(plans, seed=11)
    fs = FleetSketch(plans)
    x, dy = torch.randn(len(plans), rows, n, dtype=dtype), torch.randn(len(plans), rows, o, dtype=dtype)
    smat = fs.matrix(seeds, rows, dtype)
    kept = fs.scaled(smat, x)
    before = torch.bmm(fs.scaled(smat, dy).transpose(1, 2), kept)
    gk, sums, factor = dy_side(dy, kept.shape[1], seeds, smat, fs)
    assert factor.shape == (len(plans),) and sums == [None] * len(plans)
    assert torch.equal(gk, torch.bmm(smat, dy))  # the wide side is formed once, unscaled
    after = dw_product(gk, kept, factor)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-5)
    assert_close(after, before, **tol)
    ones = [m for m, p in enumerate(plans) if p is None or (not p.scalars and p.lam == 0)]
    assert ones and all(factor[m] == 1 for m in ones)
    for m in ones:
        assert torch.equal(after[m], before[m]), m


def fleet_linear_grads(plans, x, w, b, dy, seeds):
    x, w, b = (t.clone().requires_grad_(True) for t in (x, w, b))
    FleetLinear.apply(x, w, b, seeds, FleetSketch(plans)).backward(dy)
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fleet_linear_batched_equals_per_member_loop(monkeypatch, dtype):
    """The layer's three gradients on the batched path equal the per-member loop it replaces (kept
    as the fallback: MAX_DENSE = 0 forces it), bias sums included."""
    torch.manual_seed(0)
    plans, rows = MIX, 64
    n = len(plans)
    seeds = seeds_for(plans, seed=3)
    x, w, b, dy = (torch.randn(*s, dtype=dtype) for s in ((n, rows, 24), (n, 40, 24), (n, 40), (n, rows, 40)))
    assert FleetSketch(plans).use_batched(rows)
    batched = fleet_linear_grads(plans, x, w, b, dy, seeds)
    monkeypatch.setattr(fleet_sketch, "MAX_DENSE", 0)
    assert not FleetSketch(plans).use_batched(rows)
    loop = fleet_linear_grads(plans, x, w, b, dy, seeds)
    # float32: the two sum a bin's rows in other orders; dW entries reach ~400 here.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=4e-4)
    for name, a, e in zip(("dX", "dW", "db"), batched, loop):
        assert_close(a, e, **tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fleet_head_batched_equals_per_member_loop(monkeypatch, dtype):
    """The one-chunk batched head: dX and the sketched dW of the dlogits, batched against the loop."""
    torch.manual_seed(1)
    plans, rows, vocab = MIX, 64, 50
    n = len(plans)
    seeds = seeds_for(plans, seed=5)
    x, w = torch.randn(n, rows, 16, dtype=dtype), torch.randn(n, vocab, 16, dtype=dtype)
    targets = torch.randint(0, vocab, (n, rows))

    def grads():
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        FleetFusedCE.apply(xi, wi, targets, seeds, FleetSketch(plans)).sum().backward()
        return xi.grad, wi.grad

    batched = grads()
    monkeypatch.setattr(fleet_sketch, "MAX_DENSE", 0)
    loop = grads()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for name, a, e in zip(("dX", "dW"), batched, loop):
        assert_close(a, e, **tol, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", ROWS)
def test_gpu_kernel_bins_and_signs_are_each_members_own(rows):
    seeds = seeds_for(MIX, seed=rows)
    fs = FleetSketch(MIX)
    assert fleet_sketch.KERNELS.load()  # the compiled kernel, not the PyTorch path
    bins, signs = fs.bins_and_signs(seeds.cuda(), rows)
    check_bins_and_signs(bins.cpu(), signs.cpu(), seeds, rows, MIX)


def test_gaussian_members_and_large_fleets_take_the_loop():
    assert not FleetSketch((None, SketchSpec(8, "gaussian", True, 0.01))).use_batched(64)
    assert FleetSketch((None, SketchSpec(8, "balanced", True, 0.01))).use_batched(64)
    assert not FleetSketch((None, SketchSpec(8, "balanced", True, 0.01))).use_batched(4096)  # 2 x 4096 x 4096 > 2**24


# --- the launch count ---------------------------------------------------------------------------

class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def fleet_of(size):
    """`size` members cycling through exact, balanced R = 8, uniform R = 32 (no scalars, lam 0), every
    linear layer sketched, fused head; 2 x 32 = 64 rows a step."""
    kinds = [dict(method="exact"), dict(rank=8), dict(rank=32, hashing="uniform", invariant_scalars=False, lam=0.0)]
    members, gens = [], []
    for m in range(size):
        k = dict(kinds[m % 3])
        method = k.pop("method", "basis")
        cfg = GPTConfig(vocab_size=97, block_size=32, n_embd=32, n_layer=2, sketch=SketchConfig(layers="all", **k))
        members.append(build_gpt(cfg, seed=m, method=method))
        gens.append(torch.Generator().manual_seed(m))
    return FleetGPT(members, gens)


def step_ops(model):
    """Ops one training forward + backward dispatches, counted on the second step (the first
    builds the per-layer constants once, as the eager steps before a CUDA-graph capture do)."""
    idx = torch.randint(0, 97, (model.size, 2, 33), generator=torch.Generator().manual_seed(0))
    counts = []
    for _ in range(2):
        with _OpCounter() as counter:
            model(idx[..., :-1], idx[..., 1:]).sum().backward()
        counts.append(counter.n)
    return counts[1]


def test_fleet_step_op_count_does_not_grow_with_the_fleet(monkeypatch):
    monkeypatch.setattr(FleetGPT, "batched_head", True)  # the one-op head CUDA fleets use
    small, large = fleet_of(3), fleet_of(9)
    assert all(s.use_batched(64) for s in large.sketches.values())

    def draws(model):
        return sum(p is not None for plans in model.plans.values() for p in plans)

    with _OpCounter() as one:
        draw_seed(torch.device("cpu"), torch.Generator())
    extra = (draws(large) - draws(small)) * one.n
    assert extra > 0
    grown = step_ops(large) - step_ops(small)
    assert 0 <= grown <= extra, (grown, extra)
    # The loop it replaces grew with every sketched member (dozens of ops each): the guard can see that.
    monkeypatch.setattr(fleet_sketch, "MAX_DENSE", 0)
    assert step_ops(fleet_of(9)) - step_ops(fleet_of(3)) > 4 * extra


def test_fleet_sketch_constants_are_built_once(monkeypatch):
    model = fleet_of(3)
    monkeypatch.setattr(FleetGPT, "batched_head", True)
    idx = torch.randint(0, 97, (3, 2, 33))
    model(idx[..., :-1], idx[..., 1:]).sum().backward()
    built = {n: dict(s._consts) for n, s in model.sketches.items()}
    model(idx[..., :-1], idx[..., 1:]).sum().backward()
    for n, s in model.sketches.items():
        assert s._consts.keys() == built[n].keys() and all(s._consts[k] is built[n][k] for k in built[n]), n
