"""CUDA-only checks (skipped on CPU machines such as CI)."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.sketch import BasisLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rank_equal_rows_on_cuda(dtype):
    torch.manual_seed(0)
    ref = nn.Linear(64, 32).cuda()
    basis = BasisLinear(64, 32, rank=128, lam=0.01).cuda()
    basis.load_state_dict(ref.state_dict())
    x, dy = torch.randn(128, 64, device="cuda"), torch.randn(128, 32, device="cuda")
    grads = []
    for layer in (ref, basis):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = layer(xi)
        y.backward(dy.to(y.dtype))
        grads.append((y.detach().float(), xi.grad, layer.weight.grad, layer.bias.grad))
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert grads[1][2].dtype == torch.float32
    for a, b in zip(grads[0][:2], grads[1][:2]):
        assert_close(b, a, **tol)
    # BASIS sums its sketches in float32 from the fp32 input and the (bf16/fp16) output
    # gradient, so the reference for dW is that product in float64, not nn.Linear's
    # low-precision dW.
    expected = 0.99**2 * dy.to(dtype).double().t() @ x.double()
    assert_close(grads[1][2].double(), expected, rtol=1e-4, atol=1e-4)
    assert_close(grads[1][3], grads[0][3], **tol)


def test_cuda_graph_step_matches_eager_at_full_rank():
    cfg = GPTConfig(vocab_size=512, block_size=32, n_embd=32, n_head=2, n_layer=2, rank=64)
    idx = torch.randint(0, 512, (2, 32), device="cuda")  # rows = 64 = rank: deterministic dW

    def trained(graphs: bool):
        model = build_gpt(cfg, seed=0).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            model(idx, idx)[1].backward()
            opt.step()

        for _ in range(3):
            step()
            opt.zero_grad(set_to_none=True)
        if graphs:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            for _ in range(5):
                g.replay()
        else:
            for _ in range(5):
                step()
                opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trained(False), trained(True)):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_run_on_cuda(tmp_path):
    from typer.testing import CliRunner

    from basis_train.cli import train_app

    # The embedded corpus (its token cache travels with the repo to a GPU machine).
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("model: {block_size: 32, n_embd: 32, n_head: 2, n_layer: 1}\nsketch: {rank: 8}\n")
    res = CliRunner().invoke(train_app, ["--quiet", "--config", str(cfg), "--device", "cuda",
                                         "--steps", "40", "--eval-every", "20", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    import json

    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert s["cuda_graphs"] and s["cuda_peak_step_bytes"] > 0 and s["final_val_loss"] < 11
