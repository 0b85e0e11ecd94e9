"""torch.compile with BASIS inside: one graph, the eager numbers, resumable, clipped.

The sketches are torch.library custom ops and the step draws the sketch seeds outside the
compiled graph (core/sketch.py, core/model.py), so dynamo keeps one graph and nothing inside
it can redraw a seed.
"""

import dataclasses
import json

import pytest
import torch
import torch._dynamo

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.train import train

SMALL = GPTConfig(arch="gpt2", vocab_size=101, block_size=16, n_embd=32, n_head=2, n_layer=2, head_chunk=16,
                  sketch=SketchConfig(rank=8))


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 101, (2, 16), generator=g), torch.randint(0, 101, (2, 16), generator=g)


@pytest.mark.parametrize("arch", ["gpt2", "paper"])
@pytest.mark.parametrize("head", ["fused", "plain"])
def test_no_graph_break_with_basis_layers(arch, head):
    model = build_gpt(dataclasses.replace(SMALL, arch=arch, head=head,
                                          sketch=dataclasses.replace(SMALL.sketch, layers="all")), seed=0)
    assert model.sketched_modules()
    _assert_one_graph(model)


def _assert_one_graph(model):
    torch._dynamo.reset()
    model.draw_sketch_seeds(torch.Generator().manual_seed(1))
    explained = torch._dynamo.explain(model)(*_batch())
    model.clear_sketch_seeds()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_drop_in_basis_linear_compiles_whole_and_keeps_its_seed():
    """A user's model with BasisLinear and no seeds from outside: under compile the layer draws
    its seed as an opaque op; forward and backward must use the same one. At R = rows the
    estimate is exact times (1 - lam)^2 whatever the seed, but only if both passes share it."""
    torch.manual_seed(0)
    lin = BasisLinear(16, 8, rank=64, lam=0.01)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(4, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(lin, fullgraph=True)
    compiled(x).square().sum().backward()
    ref(x).square().sum().backward()
    # float32 sums of 64 products: a few ulps of |dW| (about 1e2) each
    torch.testing.assert_close(lin.weight.grad, 0.9801 * ref.weight.grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["exact", "basis"])
def test_forward_grad_head_compiles_whole(method):
    """The head kernel that makes dX and dW in forward (core/head.py) compiles into the one graph too."""
    _assert_one_graph(build_gpt(dataclasses.replace(SMALL, head_kernel="forward-grad"), seed=0, method=method))


@pytest.mark.parametrize("checkpoint_blocks", [False, True])
@pytest.mark.parametrize("method", ["exact", "basis"])
def test_compiled_equals_eager(method, checkpoint_blocks):
    """Same weights, batch and sketch seeds: the compiled step's loss and gradients are the eager
    step's up to float32 rounding; with BASIS the same seed gives the same estimate. Inductor
    reorders and fuses sums of at most a few hundred terms (width 32, vocabulary 101, 32 rows):
    float32 error about n * 2^-24 of the sum's terms, so 1e-5 relative, and 1e-6 absolute for
    entries near zero (2^-20, about 30 ulps of the largest gradient, 0.45). Seen on one CPU: the
    loss equal, gradients within 7.5e-8."""
    _compiled_equals_eager(method, checkpoint_blocks=checkpoint_blocks)


@pytest.mark.parametrize("method", ["exact", "basis"])
def test_compiled_equals_eager_with_the_forward_grad_head(method):
    """The head's gradients made in forward, compiled, against the eager default head: eagerly the two
    are bit for bit equal (tests/core/test_head.py), so the same tolerances hold."""
    _compiled_equals_eager(method, compiled_fields={"head_kernel": "forward-grad"})


def _compiled_equals_eager(method, compiled_fields=(), **fields):
    x, y = _batch()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        cfg = dataclasses.replace(SMALL, sketch=dataclasses.replace(SMALL.sketch, layers="all"), **fields,
                                  **(dict(compiled_fields) if compiled else {}))
        model = build_gpt(cfg, seed=0, method=method)
        fwd = torch.compile(model) if compiled else model
        model.draw_sketch_seeds(torch.Generator().manual_seed(7))
        _, loss = fwd(x, y)
        loss.backward()
        model.clear_sketch_seeds()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


def _run(cfg_path, out, steps, resume=False):
    cfg = apply_overrides(load_config(cfg_path), {"train.steps": steps, "train.compile": True, "model.arch": "gpt2",
                                                  "optim.grad_clip": 0.5, "train.checkpoint_every": 5})
    train(cfg, out, resume=resume, progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def deterministic():
    """Inductor lowers the embedding's backward (and so the tied head's gradient) to parallel
    atomic adds, whose order changes the last bit from one run to the next, resumed or not.
    Under torch.use_deterministic_algorithms it falls back to the eager kernel."""
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_resume_with_compile_is_bit_identical(tmp_path, tiny_config, deterministic):
    whole = _run(tiny_config, tmp_path / "whole", 10)
    _run(tiny_config, tmp_path / "split", 5)
    split = _run(tiny_config, tmp_path / "split", 10, resume=True)
    # The split run also evaluates at its first end (step 5), which restarts its train-loss mean:
    # compare the validation losses at the uninterrupted run's evaluations, and the weights.
    val = {r["step"]: r["val_loss"] for r in split}
    assert [(r["step"], r["val_loss"]) for r in whole] == [(r["step"], val[r["step"]]) for r in whole]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_clipping_bounds_the_global_norm(tmp_path):
    from basis_train.training.step import TrainStep

    model = build_gpt(SMALL, seed=0, method="exact")
    chunks = torch.randint(0, 101, (4, 17))
    norms = {}
    for clip in (0.0, 0.01):
        m = build_gpt(SMALL, seed=0, method="exact")
        opt = torch.optim.SGD(m.parameters(), lr=0.0)  # lr 0: the step leaves the gradients to read
        step = TrainStep(m, m, opt, chunks, torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32,
                         use_graphs=False, grad_clip=clip)
        step._fwd_bwd_opt(torch.tensor([0, 1]))
        norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()])).item()
    assert norms[0.0] > 0.01  # unclipped it is larger than the clip ...
    assert norms[0.01] == pytest.approx(0.01, rel=1e-4)  # ... clipped it is the clip (1e-6 epsilon aside)
    del model
