"""The fused fleet SGD kernel (fleet/kernels/sgd.py) under Triton's interpreter on CPU: against
FleetSGD's PyTorch path and against each member's own torch.optim.SGD, with per-member lrs that
differ, weight decay 0 and > 0, momentum 0 and > 0."""


import pytest
import torch
from torch.testing import assert_close

from basis_train.fleet import optim as fleet_optim
from basis_train.fleet.optim import FleetSGD

M = 4
# Shapes with per-member sizes that do not divide the block: members straddle program boundaries.
SHAPES = [(M, 37, 5), (M, 3), (M, 50)]
# Per parameter, per member lrs: all different, one shared (FleetSGD's float lr), one large spread.
LRS = [[0.01, 0.02, 0.5, 0.003], [0.05] * M, [1.0, 0.0, 0.25, 0.1]]
SETTINGS = [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.1)]  # (momentum, weight decay)
ids = [f"mom{m}-wd{w}" for m, w in SETTINGS]
TOL = dict(rtol=2e-6, atol=1e-6)  # float32 rounding (an FMA or not: 1 ulp of values up to ~5), a few steps


@pytest.fixture()
def interpreted(monkeypatch, interpreted_kernel):
    """fleet/kernels/sgd.py under Triton's interpreter, routed to for CPU tensors (as
    tests/fleet/test_fleet_sketch.py does for the bins kernel)."""
    module = interpreted_kernel("basis_train.fleet.kernels.sgd", "the interpreter runs where there is no GPU")
    monkeypatch.setattr(module, "BLOCK", 64)  # several programs per parameter, a ragged last one
    monkeypatch.setattr(fleet_optim.KERNELS, "module", module)
    monkeypatch.setattr(fleet_optim.KERNELS, "devices", {"cpu", "cuda"})
    calls = []
    launch = module.fleet_sgd_

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs, block=64)

    monkeypatch.setattr(module, "fleet_sgd_", counted)
    module.calls = calls
    return module


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def grads(step):
    return make(100 + step)


def run_fleet(momentum, wd, steps):
    params = make()
    opt = FleetSGD(params, LRS, momentum, wd)
    for step in range(steps):
        for p, g in zip(params, grads(step)):
            p.grad = g.clone()
        opt.step()
    return params, opt.bufs


@pytest.mark.parametrize(("momentum", "wd"), SETTINGS, ids=ids)
def test_kernel_matches_the_pytorch_path(interpreted, monkeypatch, momentum, wd):
    fused = run_fleet(momentum, wd, 4)
    expected_launches = len(SHAPES) * (3 if momentum else 4)  # the first momentum step is PyTorch's
    assert len(interpreted.calls) == expected_launches
    monkeypatch.setattr(fleet_optim.KERNELS, "devices", {"cuda"})  # CPU: the PyTorch path
    plain = run_fleet(momentum, wd, 4)
    assert len(interpreted.calls) == expected_launches
    for i, (a, b) in enumerate(zip(fused[0], plain[0])):
        assert_close(a, b, **TOL, msg=f"parameter {i}")
    for i, (a, b) in enumerate(zip(fused[1], plain[1])):
        assert (a is None) == (b is None) == (momentum == 0)
        if a is not None:
            assert_close(a, b, **TOL, msg=f"buffer {i}")


@pytest.mark.parametrize(("momentum", "wd"), SETTINGS, ids=ids)
def test_fused_fleet_equals_each_members_torch_sgd(interpreted, momentum, wd):
    steps = 4
    fleet_params, bufs = run_fleet(momentum, wd, steps)
    assert interpreted.calls
    for m in range(M):
        own = [p[m].clone() for p in make()]
        opts = [torch.optim.SGD([q], lr=LRS[i][m], momentum=momentum, weight_decay=wd, foreach=False)
                for i, q in enumerate(own)]
        for step in range(steps):
            for q, g, opt in zip(own, grads(step), opts):
                q.grad = g[m].clone()
                opt.step()
        for i, q in enumerate(own):
            assert_close(fleet_params[i][m], q, **TOL, msg=f"member {m} parameter {i}")
            if momentum:
                assert_close(bufs[i][m], opts[i].state[q]["momentum_buffer"], **TOL, msg=f"member {m} buffer {i}")


def test_kernel_one_step_against_the_formula(interpreted):
    """One launch on given tensors, against the update written out in float64."""
    g = torch.Generator().manual_seed(3)
    p, grad, buf = (torch.randn(M, 129, generator=g) for _ in range(3))
    lr = torch.tensor([0.5, 0.01, 2.0, 0.125])
    p64, grad64, buf64 = p.double(), grad.double(), buf.double()
    interpreted.fleet_sgd_(p, grad, buf, lr, 0.9, 0.05)
    d = grad64 + 0.05 * p64
    b = 0.9 * buf64 + d
    assert_close(buf.double(), b, rtol=1e-6, atol=1e-6)
    assert_close(p.double(), p64 - lr.double().view(-1, 1) * b, rtol=1e-6, atol=1e-6)


def test_unsupported_tensors_take_the_pytorch_path(interpreted):
    params = [torch.randn(M, 6, 5).transpose(1, 2), torch.randn(M, 8, dtype=torch.float64)]  # strided; float64
    opt = FleetSGD(params, [[0.1] * M, [0.2] * M], 0.0, 0.0)
    before = [p.clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert not interpreted.calls
    assert_close(params[0], before[0] - 0.1) and assert_close(params[1], before[1] - 0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("momentum", "wd"), SETTINGS, ids=ids)
def test_compiled_kernel_on_cuda_matches_the_pytorch_path(monkeypatch, momentum, wd):
    def run(kernel_devices):
        monkeypatch.setattr(fleet_optim.KERNELS, "devices", kernel_devices)
        params = [p.cuda() for p in make()]
        opt = FleetSGD(params, LRS, momentum, wd)
        for step in range(4):
            for p, g in zip(params, grads(step)):
                p.grad = g.cuda()
            opt.step()
        return params

    for i, (a, b) in enumerate(zip(run({"cuda"}), run(set()))):
        assert_close(a, b, **TOL, msg=f"parameter {i}")


def _rows_problem(step, size=M, vocab=11, width=5, count=6):
    """Gradient rows of one step, member-major, with repeated tokens, and the dense gradient they make."""
    g = torch.Generator().manual_seed(200 + step)
    tokens = torch.randint(0, vocab, (size, count), generator=g)
    tokens[:, 1] = tokens[:, 0]  # every member sees one token twice
    index = (tokens + torch.arange(size).view(-1, 1) * vocab).reshape(-1)
    rows = torch.randn(size * count, width, generator=g)
    dense = torch.zeros(size * vocab, width).index_add_(0, index, rows).view(size, vocab, width)
    return index, rows, dense


def run_rows(momentum, wd, device="cpu", steps=3, sparse=True):
    from basis_train.fleet.model import EmbeddingRows

    p = torch.randn(M, 11, 5, generator=torch.Generator().manual_seed(1)).to(device)
    holder = EmbeddingRows()
    opt = FleetSGD([p], [LRS[0]], momentum, wd, sparse={0: holder} if sparse else None)
    for step in range(steps):
        index, rows, dense = (t.to(device) for t in _rows_problem(step))
        if sparse:
            holder.index, holder.rows = index, rows
        else:
            p.grad = dense
        opt.step()
        opt.zero_grad()
        assert holder.rows is None and holder.index is None  # consumed
    opt.step()  # no backward since: no rows (no gradient), no update
    return p, opt.bufs[0]


@pytest.mark.parametrize(("momentum", "wd"), SETTINGS, ids=ids)
def test_gradient_rows_update_equals_the_dense_update(momentum, wd):
    """FleetSGD from gradient rows (the token embedding's) on the PyTorch path against the dense update
    of the gradient those rows make, repeated tokens included, over three steps."""
    fleet_optim.KERNELS.module = None  # the module state other tests may have routed
    dense_p, dense_buf = run_rows(momentum, wd, sparse=False)
    rows_p, rows_buf = run_rows(momentum, wd)
    assert_close(rows_p, dense_p, **TOL)
    if momentum:
        assert_close(rows_buf, dense_buf, **TOL)


@pytest.mark.parametrize(("momentum", "wd"), SETTINGS, ids=ids)
def test_interpreted_rows_kernel_equals_the_pytorch_path(interpreted, monkeypatch, momentum, wd):
    kernel = run_rows(momentum, wd)
    assert len(interpreted.calls) == (3 if momentum or wd else 0)  # the dense part, when there is one
    monkeypatch.setattr(fleet_optim.KERNELS, "devices", {"cuda"})
    torch_path = run_rows(momentum, wd)
    assert_close(kernel[0], torch_path[0], **TOL)
    if momentum:
        assert_close(kernel[1], torch_path[1], **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("momentum", "wd"), SETTINGS, ids=ids)
def test_compiled_rows_kernel_on_cuda_matches_the_pytorch_path(monkeypatch, momentum, wd):
    kernel = run_rows(momentum, wd, "cuda")
    monkeypatch.setattr(fleet_optim.KERNELS, "devices", set())
    torch_path = run_rows(momentum, wd, "cuda")
    assert_close(kernel[0], torch_path[0], **TOL)


def test_embedding_rows_no_optimiser_takes_are_an_error():
    """A fleet that hands out its embedding's gradient rows must have them taken before the next
    backward: otherwise the table would never train, without a word."""
    from basis_train.core.model import GPTConfig, build_gpt
    from basis_train.fleet.model import FleetGPT

    cfg = GPTConfig(vocab_size=31, block_size=8, n_embd=8, n_head=2, n_layer=1)
    fleet = FleetGPT([build_gpt(cfg, seed=s, method="exact") for s in range(2)], [None] * 2)
    holder = fleet.sparse_embedding_grad()
    idx = torch.randint(0, 31, (2, 1, 9))
    fleet(idx[..., :-1], idx[..., 1:]).sum().backward()
    assert fleet.p("wte.weight").grad is None and holder.rows.shape == (16, 8) and holder.index.shape == (16,)
    assert (holder.index // 31).tolist() == [0] * 8 + [1] * 8  # member-major
    with pytest.raises(RuntimeError, match="never used"):
        fleet(idx[..., :-1], idx[..., 1:]).sum().backward()
