"""Edge cases of BasisLinear (issue 14): empty batches, frozen weights, kernel failures,
global settings, and activation checkpointing that keeps the sketch stream."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from basis_train.core import sketch
from basis_train.core.basis_linear import BasisLinear
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig


@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6)])
def test_zero_rows(shape):
    layer = BasisLinear(6, 5, rank=4)
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 5)
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(5, 6)) and torch.equal(layer.bias.grad, torch.zeros(5))
    assert x.grad.shape == x.shape


def test_frozen_weight_is_a_plain_linear_and_draws_no_seed():
    torch.manual_seed(0)
    ref, layer = nn.Linear(6, 5), BasisLinear(6, 5, rank=2)
    layer.load_state_dict(ref.state_dict())
    layer.weight.requires_grad_(False)
    layer.generator = torch.Generator().manual_seed(1)
    state = layer.generator.get_state()
    x = torch.randn(32, 6, requires_grad=True)
    y = layer(x)
    assert "BasisLinearFunction" not in y.grad_fn.name()  # so no R x N sketch is computed or kept
    y.backward(torch.ones_like(y))
    x_ref = x.detach().clone().requires_grad_(True)
    ref(x_ref).backward(torch.ones(32, 5))
    assert_close(x.grad, x_ref.grad)
    assert_close(layer.bias.grad, ref.bias.grad)
    assert torch.equal(layer.generator.get_state(), state)


class FlakyKernels:
    """Stands in for the Triton module: fails once (an out-of-memory, say), then works."""

    def __init__(self):
        self.calls = 0

    def sketch_stats(self, m, seed, rank, colsum=False):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return sketch._gather_sketch(m, seed, rank), m.float().square().sum(), m.float().sum(0) if colsum else None


def test_one_failed_kernel_call_raises_and_does_not_switch_the_process_to_the_slow_path(monkeypatch):
    fake = FlakyKernels()
    monkeypatch.setattr(sketch.KERNELS, "module", fake)
    monkeypatch.setattr(sketch.KERNELS, "devices", {"cpu"})
    m, seed = torch.randn(16, 4), torch.tensor(3)
    with pytest.raises(RuntimeError, match="out of memory"):
        sketch.scaled_sketch(m, seed, sketch.SketchSpec(4))
    sketch.scaled_sketch(m, seed, sketch.SketchSpec(4))
    assert fake.calls == 2 and sketch.KERNELS.module is fake


def test_global_dynamo_settings_are_left_alone(monkeypatch):
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(sketch.KERNELS, "module", FlakyKernels())
    sketch.KERNELS.module.calls = 1  # no simulated failure
    monkeypatch.setattr(sketch.KERNELS, "devices", {"cpu"})
    # torch's own config patch, not monkeypatch: undoing a monkeypatch on dynamo's config module
    # deletes the key, which breaks every later torch.compile in the process
    with dynamo_config.patch(recompile_limit=3):
        layer = BasisLinear(6, 5, rank=2)
        layer(torch.randn(8, 6, requires_grad=True)).sum().backward()
        assert sketch.KERNELS.module.calls == 3  # forward X and backward dY went through the kernel dispatch
        assert dynamo_config.recompile_limit == 3


def test_checkpointed_basis_run_equals_plain_run_step_for_step():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_embd=16, n_head=2, n_layer=2, sketch=SketchConfig(layers="all", rank=4))
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))

    def trained(checkpoint_blocks):
        model = build_gpt(GPTConfig(**{**cfg.__dict__, "checkpoint_blocks": checkpoint_blocks}), seed=0)
        gen = torch.Generator().manual_seed(5)
        for m in model.sketched_modules():
            m.generator = gen
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        states = []
        for _ in range(3):
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            states.append([p.detach().clone() for p in model.parameters()])
        return states, gen.get_state()

    plain, plain_gen = trained(False)
    ckpt, ckpt_gen = trained(True)
    for step_plain, step_ckpt in zip(plain, ckpt):
        for a, b in zip(step_plain, step_ckpt):
            assert_close(b, a)
    assert torch.equal(plain_gen, ckpt_gen)
