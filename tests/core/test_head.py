"""The fused chunked head: exact loss/dX/dW, and the BASIS estimate equal to BasisLinear's."""

import pytest
import torch
import torch.nn.functional as F

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.head import FusedBasisHead, FusedHead, fused_linear_cross_entropy
from basis_train.core.memory import SavedTensorMeter, live_bytes_peak
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.core.sketch import SketchSpec

ROWS, N, V = 37, 12, 53  # 37 rows: the last chunk is short for every chunk size used


@pytest.fixture(params=[1, 16], ids=["unpadded", "padded"])
def vocab_pad(request, monkeypatch):
    """The head pads its weight with zero rows to a multiple of PAD_VOCAB on CUDA (V = 53 -> 64 here):
    the padded path must give the unpadded numbers, so the exactness tests run both on CPU."""
    from basis_train.core import head

    monkeypatch.setattr(head, "PAD_VOCAB", request.param)
    return request.param


@pytest.fixture(params=["index_add", "matmul"])
def sketch_by(request, monkeypatch):
    """The BASIS head sums dlogits into their bins by index_add, or (CUDA under bf16/fp16) by a matmul
    with the count-sketch matrix: both must give the estimate, so the tests run both on CPU."""
    from basis_train.core import head

    monkeypatch.setattr(head, "MATMUL_DEVICES", ("cpu", "cuda") if request.param == "matmul" else ())
    return request.param


def _data(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, N, generator=g, dtype=dtype)
    w = torch.randn(V, N, generator=g, dtype=dtype) / N**0.5
    t = torch.randint(0, V, (ROWS,), generator=g)
    return x, w, t


def _grads(loss_fn, x, w):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_exact_head_matches_plain_and_float64(chunk, vocab_pad):
    x, w, t = _data()
    plain = _grads(lambda x, w: F.cross_entropy(x @ w.t(), t), x, w)
    fused = _grads(lambda x, w: fused_linear_cross_entropy(x, w, t, chunk), x, w)
    ref = _grads(lambda x, w: F.cross_entropy(x @ w.t(), t), x.double(), w.double())
    for a, b, r in zip(fused, plain, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-6)


def _unfused_basis(x, w, t, gen_seed, **kw):
    layer = BasisLinear(N, V, bias=False, **kw)
    layer.weight.data.copy_(w)
    layer.generator = torch.Generator().manual_seed(gen_seed)
    xr = x.clone().requires_grad_()
    loss = F.cross_entropy(layer(xr), t)
    loss.backward()
    return loss.detach(), xr.grad, layer.weight.grad


def _fused_basis(x, w, t, gen_seed, chunk, **kw):
    head = FusedBasisHead(N, V, chunk=chunk, **kw)
    head.weight.data.copy_(w)
    head.generator = torch.Generator().manual_seed(gen_seed)
    xr = x.clone().requires_grad_()
    loss = head.loss(xr, t)
    loss.backward()
    return loss.detach(), xr.grad, head.weight.grad


@pytest.mark.parametrize("hashing", ["balanced", "uniform", "gaussian"])
@pytest.mark.parametrize("scalars,lam", [(True, 0.01), (False, 0.0)])
@pytest.mark.parametrize("rank,chunk", [(5, 8), (1, 64), (37, 3)])
def test_basis_head_equals_unfused_basislinear(hashing, scalars, lam, rank, chunk, vocab_pad, sketch_by):
    x, w, t = _data(seed=1)
    kw = dict(rank=rank, sketch=hashing, invariant_scalars=scalars, lam=lam)
    ref = _unfused_basis(x, w, t, 7, **kw)
    got = _fused_basis(x, w, t, 7, chunk, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    exact = _grads(lambda x, w: F.cross_entropy(x @ w.t(), t), x, w)[2]
    assert not torch.allclose(got[2], exact, atol=1e-3) or rank == ROWS  # an estimate, not dW


def test_basis_head_at_full_rank_is_scaled_exact(vocab_pad, sketch_by):
    # R = rows: every bin one row, scalars 1, dW = (1 - lam)^2 X^T dY (docs/paper.md section 1).
    x, w, t = _data(seed=2)
    got = _fused_basis(x, w, t, 3, 10, rank=ROWS, lam=0.01)
    exact = _grads(lambda x, w: F.cross_entropy(x @ w.t(), t), x, w)[2]
    torch.testing.assert_close(got[2], 0.9801 * exact, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_plain_head():
    x, w, t = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _grads(lambda x, w: F.cross_entropy(F.linear(x, w).float(), t), x, w)
        fused = _grads(lambda x, w: fused_linear_cross_entropy(x, w, t, 8), x, w)
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def _gpt_step(head, method, checkpoint_blocks=False):
    cfg = GPTConfig(vocab_size=97, block_size=16, n_embd=16, n_head=2, n_layer=2, head=head, head_chunk=5,
                    checkpoint_blocks=checkpoint_blocks, sketch=SketchConfig(rank=4))
    model = build_gpt(cfg, seed=0, method=method)
    for m in model.sketched_modules():
        m.generator = torch.Generator().manual_seed(100)
    g = torch.Generator().manual_seed(0)
    idx, tgt = torch.randint(0, 97, (2, 2, 16), generator=g)
    _, loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["exact", "basis"])
@pytest.mark.parametrize("checkpoint_blocks", [False, True])
def test_gpt_fused_head_equals_plain_head(method, checkpoint_blocks):
    lp, gp = _gpt_step("plain", method, checkpoint_blocks)
    lf, gf = _gpt_step("fused", method, checkpoint_blocks)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    for n in gp:
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-5, atol=1e-6, msg=n)


def test_fused_head_keeps_no_logits():
    x, w, t = _data()
    head = FusedHead(N, V, chunk=8)
    head.weight.data.copy_(w)
    xr = x.clone().requires_grad_()
    meter = SavedTensorMeter(params=[head.weight])
    with meter.measure():
        head.loss(xr, t)
    # x (rows x N), targets and one log-sum-exp per row; nothing of size rows x V.
    assert meter.activation_bytes == ROWS * N * 4 + ROWS * 8 + ROWS * 4


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("hashing", ["balanced", "uniform"])
def test_cuda_basis_head_equals_unfused(hashing):
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w, t = (a.cuda() for a in _data(seed=3))
    kw = dict(rank=5, sketch=hashing)

    def run(fused):
        layer = (FusedBasisHead(N, V, chunk=8, **kw) if fused else BasisLinear(N, V, bias=False, **kw)).cuda()
        layer.weight.data.copy_(w)
        layer.generator = torch.Generator(device="cuda").manual_seed(11)
        xr = x.clone().requires_grad_()
        loss = layer.loss(xr, t) if fused else F.cross_entropy(layer(xr), t)
        loss.backward()
        return loss.detach(), xr.grad, layer.weight.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_bf16_and_graph_capture():
    from basis_train.core import graphs

    x, w, t = (a.cuda() for a in _data(seed=4))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(xr, wr, t, 8)
        loss.backward()
        return loss

    with graphs.side_stream(torch.device("cuda")):
        for _ in range(3):
            xr.grad = wr.grad = None
            step()
    eager = (xr.grad.clone(), wr.grad.clone())
    xr.grad = wr.grad = None
    graph = graphs.capture(step)
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = _grads(lambda x, w: F.cross_entropy(F.linear(x, w).float(), t), x, w)
    for got, ref, want in zip((xr.grad, wr.grad), eager, plain[1:]):
        torch.testing.assert_close(got, ref)  # replays compute what eager computes
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_frozen_basis_head_is_the_exact_head_and_draws_no_seed():
    # The sketch only serves dW: with the head's weight frozen there is nothing to estimate.
    torch.manual_seed(0)
    head = FusedBasisHead(8, 11, chunk=4, rank=2)
    head.weight.requires_grad_(False)
    head.generator = torch.Generator().manual_seed(1)
    state = head.generator.get_state()
    x = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 11, (10,))
    head.loss(x, targets).backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.cross_entropy(x_ref @ head.weight.t(), targets).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert torch.equal(head.generator.get_state(), state)


@pytest.mark.parametrize("hashing", ["balanced", "uniform"])
def test_sketch_matrix_is_the_count_sketch(hashing):
    from basis_train.core.head import sketch_matrix
    from basis_train.core.sketch import count_sketch_reference, draw_seed
    from basis_train.core.sketch_ops import bins_and_signs

    m = torch.randn(ROWS, V, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    seed = draw_seed(torch.device("cpu"), torch.Generator().manual_seed(2))
    bins, signs = bins_and_signs(seed, ROWS, 5, hashing)
    s = sketch_matrix(bins, signs, 5, torch.float64)
    assert ((s != 0).sum(0) == 1).all() and set(s.abs().unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(s @ m, count_sketch_reference(m, seed, 5, hashing))


@cuda
def test_cuda_bf16_basis_head_by_matmul_equals_index_add(monkeypatch):
    """Under bf16 on CUDA the head sums dlogits into bins by a tensor-core matmul: the same float32 sums
    of the same bf16 values as index_add's, in another order."""
    from basis_train.core import head

    x, w, t = (a.cuda() for a in _data(seed=6))

    def run(devices):
        monkeypatch.setattr(head, "MATMUL_DEVICES", devices)
        layer = FusedBasisHead(N, V, chunk=8, rank=5).cuda()
        layer.weight.data.copy_(w)
        layer.generator = torch.Generator(device="cuda").manual_seed(11)
        xr = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = layer.loss(xr, t)
        loss.backward()
        return loss.detach(), xr.grad, layer.weight.grad

    for a, b in zip(run(("cuda",)), run(())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_basis_head_backward_holds_one_r_by_v_sketch_beyond_exact(sketch_by):
    # The BASIS head's backward needs the R x V float32 sketch of the dlogits where exact accumulates
    # dW, and float32 transients of a chunk's size that exact does not make (index_add: the squares
    # summed for the norm, the signed rows); the matmul path also makes the chunk's R x V product before
    # adding it. The invariant scalar is one number, applied to the R x N sketch of x, so no scaled
    # R x V copy of the sketch is made: at R much larger than a chunk, such a copy would pass the bound.
    rows, n, v, chunk, rank = 512, 16, 4000, 16, 256
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g, requires_grad=True)
    w = (torch.randn(v, n, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, v, (rows,), generator=g)
    peaks = {}
    for name, spec in (("exact", None), ("basis", SketchSpec(rank=rank))):
        seed = torch.tensor(7) if spec else None
        loss = fused_linear_cross_entropy(x, w, t, chunk, spec, seed)
        peaks[name] = live_bytes_peak(lambda loss=loss: torch.autograd.grad(loss, (x, w)))
    sketches = 2 if sketch_by == "matmul" else 1
    bound = sketches * rank * v * 4 + 2 * chunk * v * 4
    assert peaks["basis"] - peaks["exact"] < bound, (peaks, bound)


# The forward-grad kernel: dX and dW computed in forward from the logits just made (no recompute),
# kept for backward and multiplied by the loss's gradient there. With a loss gradient of 1 it runs the
# same float32 operations on the same values in the same order: the numbers must be bit for bit the
# default's.

def _head_grads(ahead, x, w, t, chunk, spec=None, seed=None, loss_scale=None):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fused_linear_cross_entropy(xr, wr, t, chunk, spec, seed, grads_ahead=ahead)
    (loss if loss_scale is None else loss * loss_scale).backward()
    return loss.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_forward_grad_exact_head_is_bit_identical(chunk, vocab_pad):
    x, w, t = _data(seed=8)
    for a, b in zip(_head_grads(True, x, w, t, chunk), _head_grads(False, x, w, t, chunk)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hashing", ["balanced", "uniform", "gaussian"])
@pytest.mark.parametrize("rank,chunk", [(5, 8), (37, 3)])
def test_forward_grad_basis_head_is_bit_identical(hashing, rank, chunk, vocab_pad, sketch_by):
    x, w, t = _data(seed=9)
    spec, seed = SketchSpec(rank=rank, kind=hashing), torch.tensor(12345)
    for a, b in zip(_head_grads(True, x, w, t, chunk, spec, seed), _head_grads(False, x, w, t, chunk, spec, seed)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [None, SketchSpec(rank=5)], ids=["exact", "basis"])
def test_forward_grad_scales_by_the_loss_gradient(spec):
    # 3 is no power of two: forward-grad scales dX and dW after they are made, the default scales the
    # dlogits before, so the two differ by float32 rounding. dX's entries are sums of V = 53 products
    # that nearly cancel (softmax minus onehot): their error is a few ulps (2^-24) of the largest
    # product, not of the entry, so the absolute tolerance follows the gradient's largest entry.
    x, w, t = _data(seed=10)
    seed = torch.tensor(3) if spec else None
    ahead = _head_grads(True, x, w, t, 8, spec, seed, loss_scale=3.0)
    default = _head_grads(False, x, w, t, 8, spec, seed, loss_scale=3.0)
    for a, b in zip(ahead[1:], default[1:]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    assert not torch.equal(ahead[2], _head_grads(True, x, w, t, 8, spec, seed)[2])  # the scale reached dW


def test_forward_grad_bf16_autocast_matches_default():
    x, w, t = _data(seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = _head_grads(True, x, w, t, 8), _head_grads(False, x, w, t, 8)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_forward_grad_does_no_gradient_work_without_grad(monkeypatch):
    from basis_train.core import head

    def refuse(*a, **k):
        raise AssertionError("gradients computed where none is taken")

    x, w, t = _data(seed=12)
    monkeypatch.setattr(head, "_HeadGrads", refuse)
    with torch.no_grad():
        got = fused_linear_cross_entropy(x.requires_grad_(), w, t, 8, grads_ahead=True)
    torch.testing.assert_close(got, F.cross_entropy(x @ w.t(), t), rtol=1e-5, atol=1e-6)


def test_forward_grad_with_a_frozen_weight_makes_and_keeps_dx_only():
    x, w, t = _data(seed=13)
    got, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    meter = SavedTensorMeter(params=[w])
    with meter.measure():
        loss = fused_linear_cross_entropy(got, w, t, 8, grads_ahead=True)
    loss.backward()
    fused_linear_cross_entropy(ref, w, t, 8).backward()
    assert torch.equal(got.grad, ref.grad) and w.grad is None
    assert meter.activation_bytes == ROWS * N * 4  # dX only: no V x N buffer for a weight that takes none


def test_forward_grad_keeps_its_gradients_instead_of_x():
    x, w, t = _data()
    head = FusedHead(N, V, chunk=8, kernel="forward-grad")
    head.weight.data.copy_(w)
    xr = x.clone().requires_grad_()
    meter = SavedTensorMeter(params=[head.weight])
    with meter.measure():
        head.loss(xr, t)
    # dX (rows x N) and dW (V x N), float32, counted as the head's
    assert meter.activation_bytes == meter.breakdown["head"] == ROWS * N * 4 + V * N * 4
    assert head.kernel_ran == "forward-grad"


def test_forward_grad_step_peak_is_the_defaults():
    # In float32 the dW buffer exists from the end of forward instead of the start of backward: the peak
    # of a forward and backward together is the default's, up to a few bytes a row (the log-sum-exp both
    # make, alive here beside the buffer); a chunk's logits left alive beside it would pass the bound.
    # (With a bf16 weight, backward's cast of the scaled dW adds to it: 123 MiB on an H100 at GPT-2 small.)
    rows, n, v, chunk = 256, 16, 4000, 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g, requires_grad=True)
    w = (torch.randn(v, n, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, v, (rows,), generator=g)

    def step(ahead):
        return torch.autograd.grad(fused_linear_cross_entropy(x, w, t, chunk, grads_ahead=ahead), (x, w))

    peaks = {ahead: live_bytes_peak(lambda ahead=ahead: step(ahead)) for ahead in (False, True)}
    assert peaks[True] - peaks[False] <= 8 * rows, peaks


def test_forward_grad_refuses_float16():
    x, w, t = _data()
    with pytest.raises(ValueError, match="float16"):
        fused_linear_cross_entropy(x.half().requires_grad_(), w.half(), t, 8, grads_ahead=True)


@pytest.mark.parametrize("method", ["exact", "basis"])
def test_gpt_forward_grad_head_is_bit_identical(method):
    def step(kernel):
        cfg = GPTConfig(vocab_size=97, block_size=16, n_embd=16, n_head=2, n_layer=2, head_chunk=5, arch="gpt2",
                        head_kernel=kernel, sketch=SketchConfig(rank=4))
        model = build_gpt(cfg, seed=0, method=method)
        model.draw_sketch_seeds(torch.Generator().manual_seed(100))
        idx, tgt = torch.randint(0, 97, (2, 2, 16), generator=torch.Generator().manual_seed(0))
        _, loss = model(idx, tgt)
        loss.backward()
        model.clear_sketch_seeds()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, model.head_kernel_ran()

    (la, ga, ka), (lb, gb, kb) = step("forward-grad"), step("auto")
    assert (ka, kb) == ("forward-grad", "native")
    assert torch.equal(la, lb)
    for n in gb:
        assert torch.equal(ga[n], gb[n]), n


@cuda
def test_cuda_forward_grad_bf16_graph_capture_is_the_default():
    from basis_train.core import graphs

    x, w, t = (a.cuda() for a in _data(seed=14))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()

    def step(ahead):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(xr, wr, t, 8, grads_ahead=ahead)
        loss.backward()
        return loss

    with graphs.side_stream(torch.device("cuda")):
        for _ in range(3):
            xr.grad = wr.grad = None
            step(False)
    default = (xr.grad.clone(), wr.grad.clone())
    xr.grad = wr.grad = None
    graph = graphs.capture(lambda: step(True))
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip((xr.grad, wr.grad), default):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
