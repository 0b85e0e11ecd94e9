"""The fused Triton sketch kernel against the PyTorch reference: under the Triton
interpreter on CPU (small shapes), and compiled on a GPU when there is one."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from basis_train.core import sketch
from basis_train.core.sketch import BasisLinear, count_sketch_reference, sketch_bins, sketch_signs

triton = pytest.importorskip("triton")
KERNEL_FILE = Path(sketch.__file__).parent / "kernels" / "sketch_triton.py"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture()
def interpreted(monkeypatch):
    """A copy of the kernel module built under Triton's interpreter, routed to for CPU tensors."""
    import triton.language as tl

    if torch.cuda.is_available():
        pytest.skip("with a GPU the compiled kernels are tested instead (the tests marked cuda)")
    if os.environ.get("TRITON_INTERPRET") != "1" or isinstance(tl.zeros, triton.runtime.JITFunction):
        pytest.fail("Triton was imported before tests/conftest.py could switch on its interpreter")
    spec = importlib.util.spec_from_file_location("basis_train.core.kernels._interpreted", KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sketch, "_kernels", module)
    monkeypatch.setattr(sketch, "_KERNEL_DEVICES", {"cpu", "cuda"})
    return module


def check_stats(kernels, m, seed, rank):
    sk, sumsq, colsum = kernels.sketch_stats(m, seed, rank, colsum=True)
    m64 = m.double()
    assert sk.dtype == torch.float32
    assert_close(sk.double(), count_sketch_reference(m64, seed, rank), rtol=1e-5, atol=1e-4)
    assert_close(sumsq.double(), m64.square().sum(), rtol=1e-5, atol=1e-4)
    assert_close(colsum.double(), m64.sum(0), rtol=1e-5, atol=1e-4)


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
                                                  (1000, 257, 256, torch.float16), (64, 64, 32, torch.float32)])
def test_gpu_kernel_matches_reference(rows, cols, rank, dtype):
    from basis_train.core.kernels import sketch_triton

    torch.manual_seed(0)
    m = torch.randn(rows, cols, device="cuda").to(dtype)
    seed = torch.tensor(2**32 - 5, device="cuda")
    check_stats(sketch_triton, m, seed, rank)
    first = sketch_triton.sketch_stats(m, seed, rank, colsum=True)
    again = sketch_triton.sketch_stats(m, seed, rank, colsum=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # deterministic: no atomics


@cuda
def test_gpu_kernel_bins_and_signs_match_cpu():
    from basis_train.core.kernels import sketch_triton

    rows, rank, seed = 3000, 64, 77
    sk = sketch_triton.sketch_stats(torch.eye(rows, device="cuda"), torch.tensor(seed, device="cuda"), rank)[0]
    expected = torch.zeros(rank, rows)
    expected[sketch_bins(torch.tensor(seed), rows, rank), torch.arange(rows)] = sketch_signs(torch.tensor(seed), rows)
    assert torch.equal(sk.cpu(), expected)


@cuda
def test_gpu_layer_uses_kernel_and_graph_replays_continue_the_eager_stream():
    # At R < rows every seed gives another dW, so a sketch frozen into the graph would fail.
    from basis_train.core import graphs

    assert sketch._use_kernel(torch.empty(4, 4, device="cuda"), "balanced")

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
