"""The fused Triton sketch kernel (kernels/sketch_gather.py) against the PyTorch reference: under the
Triton interpreter on CPU (small shapes), and compiled on a GPU when there is one."""

import importlib

import pytest
import torch
from torch.testing import assert_close

from basis_train.core import sketch
from basis_train.core.basis_linear import BasisLinear
from basis_train.core.sketch import SketchSpec, count_sketch_reference, rescale, rescale_factor, sketch_bins, sketch_signs

from tolerance import assert_fp32_sum_close, fp32_sum_bound

triton = pytest.importorskip("triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture()
def interpreted(monkeypatch, interpreted_kernel):
    """A copy of the kernel module built under Triton's interpreter, routed to for CPU tensors."""
    module = interpreted_kernel(sketch.KERNELS.name,
                                "with a GPU the compiled kernels are tested instead (the tests marked cuda)")
    monkeypatch.setattr(sketch.KERNELS, "module", module)
    monkeypatch.setattr(sketch.KERNELS, "devices", {"cpu", "cuda"})
    return module


def compiled():
    return importlib.import_module(sketch.KERNELS.name)


def abs_sketch(m64, seed, rank):
    """Each sketch entry's sum of |terms|: the count sketch of |m| without its signs."""
    out = torch.zeros(rank, m64.shape[1], dtype=m64.dtype, device=m64.device)
    return out.index_add_(0, sketch_bins(seed, m64.shape[0], rank), m64.abs())


def check_stats(kernels, m, seed, rank):
    """The three float32 sums against float64 within the rounding bound of their lengths (tests/tolerance.py)."""
    sk, sumsq, colsum = kernels.sketch_stats(m, seed, rank, colsum=True)
    m64 = m.double()
    rows = m.shape[0]
    assert sk.dtype == torch.float32
    assert_fp32_sum_close(sk, count_sketch_reference(m64, seed, rank), abs_sketch(m64, seed, rank), rows, "sketch")
    assert_fp32_sum_close(sumsq, m64.square().sum(), m64.square().sum(), m64.numel(), "sum of squares")
    assert_fp32_sum_close(colsum, m64.sum(0), m64.abs().sum(0), rows, "column sums")


@pytest.mark.parametrize("rows,cols,rank,dtype", [
    (64, 24, 8, torch.float32),     # divisible rows, several bins per program grid
    (67, 5, 8, torch.float32),      # ragged last slot row, cols below one block
    (100, 40, 16, torch.bfloat16),  # bf16 input, float32 sums
    (5, 3, 3, torch.float32),       # cycle-walking from a 64-value domain
    (300, 130, 4, torch.float16),   # two column blocks, split bins
])
def test_interpreted_kernel_matches_reference(interpreted, rows, cols, rank, dtype):
    torch.manual_seed(rows)
    check_stats(interpreted, torch.randn(rows, cols).to(dtype), torch.tensor(987654321 + rows), rank)


def test_interpreted_kernel_puts_rows_in_the_same_bins_with_the_same_signs(interpreted):
    # The sketch of the identity has sign(i) at (bin(i), i): exact equality, no rounding.
    rows, rank, seed = 50, 7, torch.tensor(12345)
    sk = interpreted.sketch_stats(torch.eye(rows), seed, rank)[0]
    expected = torch.zeros(rank, rows)
    expected[sketch_bins(seed, rows, rank), torch.arange(rows)] = sketch_signs(seed, rows)
    assert torch.equal(sk, expected)


def test_basis_linear_through_interpreted_kernel_is_exact_at_full_rank(interpreted):
    # The whole layer (forward sketch of X, backward sketch + norm + bias sums of dY) on the kernels.
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 5)
    layer = BasisLinear(6, 5, rank=12, lam=0.01)
    layer.load_state_dict(ref.state_dict())
    x, dy = torch.randn(12, 6), torch.randn(12, 5)
    grads = []
    for mod in (ref, layer):
        xi = x.clone().requires_grad_(True)
        mod(xi).backward(dy)
        grads.append((xi.grad, mod.weight.grad, mod.bias.grad))
    assert_close(grads[1][0], grads[0][0])
    assert_close(grads[1][2], grads[0][2], rtol=1e-6, atol=1e-6)
    assert_close(grads[1][1], 0.99**2 * grads[0][1], rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("rows,cols,rank,dtype", [(8192, 3072, 64, torch.bfloat16), (8192, 768, 16, torch.float32),
                                                  (1000, 257, 256, torch.float16), (64, 64, 32, torch.float32),
                                                  (8191, 3000, 64, torch.bfloat16), (3, 8, 2, torch.float32)])
def test_gpu_kernel_matches_reference(rows, cols, rank, dtype):
    kernels = compiled()
    torch.manual_seed(0)
    m = torch.randn(rows, cols, device="cuda").to(dtype)
    seed = torch.tensor(2**32 - 5, device="cuda")
    check_stats(kernels, m, seed, rank)
    first = kernels.sketch_stats(m, seed, rank, colsum=True)
    again = kernels.sketch_stats(m, seed, rank, colsum=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic: no atomics


@cuda
def test_gpu_kernel_bins_and_signs_match_cpu():
    kernels = compiled()
    rows, rank, seed = 3000, 64, 77
    sk = kernels.sketch_stats(torch.eye(rows, device="cuda"), torch.tensor(seed, device="cuda"), rank)[0]
    expected = torch.zeros(rank, rows)
    expected[sketch_bins(torch.tensor(seed), rows, rank), torch.arange(rows)] = sketch_signs(torch.tensor(seed), rows)
    assert torch.equal(sk.cpu(), expected)


@cuda
@pytest.mark.parametrize("rows,cols,rank", [(8192, 3072, 64), (8192, 768, 16), (1000, 257, 256)])
def test_gpu_fused_rescale_matches_reference_and_is_deterministic(rows, cols, rank):
    kernels = compiled()
    torch.manual_seed(0)
    m = torch.randn(rows, cols, device="cuda").bfloat16()
    seed = torch.tensor(2**32 - 5, device="cuda")
    sk, cs = kernels.scaled_stats(m, seed, rank, True, 0.01, sketch.SCALE_EPS, colsum=True)
    m64, seed64 = m.double().cpu(), seed.cpu()
    expected = rescale(count_sketch_reference(m64, seed64, rank), m64.square().sum(), SketchSpec(rank, lam=0.01))
    assert_close(sk.double().cpu(), expected, rtol=1e-5, atol=1e-4)
    assert_fp32_sum_close(cs.cpu(), m64.sum(0), m64.abs().sum(0), rows, "column sums")
    again = kernels.scaled_stats(m, seed, rank, True, 0.01, sketch.SCALE_EPS, colsum=True)
    assert torch.equal(sk, again[0]) and torch.equal(cs, again[1])


@cuda
def test_gpu_layer_uses_kernel_and_graph_replays_continue_the_eager_stream():
    # At R < rows every seed gives another dW, so a sketch frozen into the graph would fail.
    from basis_train.core import graphs

    assert sketch.KERNELS.on("cuda").__name__ == sketch.KERNELS.name

    def make():
        torch.manual_seed(0)
        layer = BasisLinear(64, 32, rank=8).cuda()
        layer.generator = torch.Generator(device="cuda").manual_seed(3)
        return layer

    x = torch.randn(256, 64, device="cuda")
    dy = torch.randn(256, 32, device="cuda")
    eager = make()
    expected = []
    for _ in range(4):
        eager.weight.grad = None
        eager(x).backward(dy)
        expected.append(eager.weight.grad.clone())
    layer = make()

    def step():
        layer(x).backward(dy)

    with graphs.side_stream(x.device):
        layer.weight.grad = None
        step()  # warm-up: the kernel compiles outside the graph
    layer.generator.manual_seed(3)
    layer.weight.grad = layer.bias.grad = None
    graph = graphs.capture(step, generators=[layer.generator])
    got = [layer.weight.grad.clone()]
    for _ in range(3):
        graph.replay()
        got.append(layer.weight.grad.clone())
    for a, b in zip(got, expected):
        assert_close(a, b)
    assert not torch.equal(got[0], got[1])


@cuda
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_layer_has_inductor_launch_the_sketch_kernels_and_matches_eager(bias):
    """Under torch.compile the sketches are triton_ops: Inductor's own code launches their kernels
    (no opaque basis::scaled_sketch call left in it), and one seed gives eager's estimate."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    layer = BasisLinear(96, 80, bias=bias, rank=16).cuda()
    layer.seed = torch.tensor(12345, device="cuda")
    x = torch.randn(300, 96, device="cuda", requires_grad=True)

    def step(module):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        module(x).square().sum().backward()
        return [t.clone() for t in (x.grad, *(p.grad for p in layer.parameters()))]

    eager = step(layer)
    got, codes = run_and_get_code(step, torch.compile(layer))
    code = "\n".join(codes)
    assert "_gather_kernel" in code and "_finish_kernel" in code
    assert not re.search(r"ops\.basis\.scaled_sketch(_colsum)?\.default", code)
    # Same kernels and seed, but the compiled forward's addmm may round y (so dY = 2y) differently. Each
    # gradient is a float32 sum along a chain of sums, both results within the bound of the exact one
    # (hence 2 x): dY (96 terms and the bias), then dX = dY W (80), db = column sums (300) and dW =
    # (S dY)^T (S x) (19 rows a bin, 16 bins). dW also carries the invariant scalar of dY, whose
    # 24,000-term sum of squares (positive terms; the square root halves it) is off by a relative
    # error that multiplies the whole estimate.
    rows, n_in, n_out, rank = 300, 96, 80, 16
    x64, w64, s64 = x.detach().double().cpu(), layer.weight.detach().double().cpu(), layer.seed.cpu()
    b64 = layer.bias.detach().double().cpu() if bias else torch.zeros(n_out, dtype=torch.float64)
    dy, dy_abs = 2 * (x64 @ w64.t() + b64), 2 * (x64.abs() @ w64.abs().t() + b64.abs())
    fg, fx = (rescale_factor(count_sketch_reference(m, s64, rank), m.square().sum(), layer.spec) for m in (dy, x64))
    dw_abs = (abs_sketch(dy_abs, s64, rank) * fg).t() @ (abs_sketch(x64, s64, rank) * fx)
    scalar = fp32_sum_bound(torch.tensor(0.5), rows * n_out)
    dy_n = n_in + 1
    bounds = [(dy_abs @ w64.abs(), dy_n + n_out, 0), (dw_abs, dy_n + -(-rows // rank) + rank, scalar)]
    bounds += [(dy_abs.sum(0), dy_n + rows, 0)] if bias else []
    for a, b, (abs_sum, n, rel), what in zip(got, eager, bounds, ("dX", "dW", "db")[: len(bounds)], strict=True):
        err = (a.cpu().double() - b.cpu().double()).abs()
        bound = 2 * (fp32_sum_bound(abs_sum, n) + rel * abs_sum)
        assert bool((err <= bound).all()), f"{what}: compiled off eager by {(err / bound).max().item():.3g} x the bound"


# --- the slot table and the launch shapes of the gather ---------------------------------

@pytest.mark.parametrize("rows", [5, 64, 67, 1000])
def test_interpreted_slot_table_is_the_inverse_permutation_with_the_row_signs(interpreted, rows):
    for s in (0, 2**32 - 5):
        seed = torch.tensor(s)
        table = interpreted.slot_table(seed, rows, block=64 if rows < 100 else 512)  # several programs
        q = sketch.sketch_permutation(seed, rows)
        assert torch.equal((table >> 1).long(), q), (rows, s)
        assert torch.equal(1 - 2 * (table & 1).float(), sketch_signs(seed, rows)[q]), (rows, s)


def visited_slots(rows, cols, rank, cfg):
    """Replay the gather kernel's loop bounds in Python: which slot each (bin, column block) reads."""
    from basis_train.core.kernels import sketch_gather

    sh = sketch_gather.launch_shape(rows, cols, rank, cfg)
    seen = []
    for rb in range(sh["n_rb"]):
        for sp in range(sh["splits"]):
            for k0 in range(0, sh["steps"], sh["block_k"]):
                for t in range(sh["block_r"] * sh["block_k"]):
                    b, kk = rb * sh["block_r"] + t % sh["block_r"], t // sh["block_r"]
                    slot = b + (sp * sh["steps"] + k0 + kk) * rank
                    if b < rank and slot < rows:  # the kernel's mask
                        seen.append(slot)
    return sh, seen


@pytest.mark.parametrize("rows,cols,rank", [(8192, 3072, 64), (8192, 768, 16), (8192, 3072, 256), (1000, 257, 256),
                                            (67, 5, 8), (5, 3, 3), (8191, 768, 1), (3, 8, 64)])
@pytest.mark.parametrize("programs,tile_rows", [(528, 32), (1, 32), (100000, 8), (64, 64)])
def test_launch_shape_reads_every_slot_exactly_once(rows, cols, rank, programs, tile_rows):
    cfg = dict(tile_rows=tile_rows, block_c=128, warps=4, programs=programs, table_block=1024)
    sh, seen = visited_slots(rows, cols, rank, cfg)
    assert sorted(seen) == list(range(rows)), sh
    assert sh["steps"] % sh["block_k"] == 0  # the kernel masks no step of a split
    assert sh["block_r"] * sh["block_k"] <= tile_rows


@pytest.mark.parametrize("tuning,rows,cols,rank", [
    ("programs=1,tile_rows=16,block_c=16", 67, 40, 8),  # 8 bins per program, no split, 3 column blocks
    ("programs=100000,tile_rows=4", 67, 40, 8),         # one bin per program, steps split over programs
    ("programs=2,tile_rows=8,table_block=16", 50, 9, 3),  # bins masked off in the last bin block
])
def test_interpreted_matches_reference_under_other_launch_shapes(interpreted, monkeypatch, tuning, rows,
                                                                    cols, rank):
    monkeypatch.setenv("BASIS_SKETCH_V2", tuning)
    torch.manual_seed(rows)
    check_stats(interpreted, torch.randn(rows, cols), torch.tensor(4242), rank)


def test_cached_launch_shapes_follow_the_tuning_override(interpreted, monkeypatch):
    # Launch shapes are cached per matrix shape; the environment's override must be part of the key.
    interpreted._shape.cache_clear()
    seen, real = [], interpreted.launch_shape
    monkeypatch.setattr(interpreted, "launch_shape", lambda *a: seen.append(a[3]["programs"]) or real(*a))
    m, seed = torch.randn(300, 130), torch.tensor(5)
    monkeypatch.delenv("BASIS_SKETCH_V2", raising=False)
    for _ in range(2):
        interpreted.sketch_stats(m, seed, 4)
    monkeypatch.setenv("BASIS_SKETCH_V2", "programs=100000")
    interpreted.sketch_stats(m, seed, 4)
    assert seen == [264, 100000]  # computed once per override, then read from the cache


def test_v2_tuning_rejects_unknown_keys(monkeypatch):
    from basis_train.core.kernels import sketch_gather

    monkeypatch.setenv("BASIS_SKETCH_V2", "program=5")
    with pytest.raises(ValueError, match="unknown key"):
        sketch_gather.launch_shape(64, 8, 4)


@pytest.mark.parametrize("tuning", ["", "programs=100000,tile_rows=4"])  # unsplit; steps split (reduce kernel)
@pytest.mark.parametrize("scalars,lam", [(True, 0.01), (False, 0.0), (False, 0.2)])
def test_interpreted_fused_rescale_matches_scale_of_the_reference(interpreted, monkeypatch, tuning, scalars,
                                                                     lam):
    monkeypatch.setenv("BASIS_SKETCH_V2", tuning)
    # Small finish blocks: several row blocks and several chunks of the fixed-order partial sums.
    monkeypatch.setattr(interpreted, "_FINISH_BLOCK_R", 4)
    monkeypatch.setattr(interpreted, "_FINISH_BLOCK_N", 2)
    torch.manual_seed(1)
    rows, cols, rank, seed = 67, 150, 8, torch.tensor(99)  # two column blocks in every kernel
    m = torch.randn(rows, cols)
    sk, cs = interpreted.scaled_stats(m, seed, rank, scalars, lam, sketch.SCALE_EPS, colsum=True)
    m64 = m.double()
    expected = rescale(count_sketch_reference(m64, seed, rank), m64.square().sum(), SketchSpec(rank, "balanced", scalars, lam))
    assert sk.dtype == torch.float32 and sk.shape == (rank, cols)
    assert_close(sk.double(), expected, rtol=1e-5, atol=1e-5)
    assert_fp32_sum_close(cs, m64.sum(0), m64.abs().sum(0), rows, "column sums")
    assert interpreted.scaled_stats(m, seed, rank, scalars, lam, sketch.SCALE_EPS)[1] is None
