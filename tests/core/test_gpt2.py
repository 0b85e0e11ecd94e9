"""model.arch gpt2: GPT-2's architecture, initialisation, tying and optimiser groups."""

import dataclasses
import math

import pytest
import torch

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.options import SketchConfig
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.setup import build_optimizer, param_groups

SMALL = GPTConfig(arch="gpt2", vocab_size=97, block_size=16, n_embd=32, n_head=2, n_layer=3, head_chunk=8,
                  sketch=SketchConfig(rank=4))


def test_gpt2_small_parameter_count():
    cfg = GPTConfig(arch="gpt2", vocab_size=50257, block_size=1024, n_embd=768, n_head=12, n_layer=12)
    model = build_gpt(cfg, seed=0, method="exact")
    assert sum(p.numel() for p in model.parameters()) == 124_439_808


@pytest.mark.parametrize("method", ["exact", "basis"])
def test_head_is_tied_to_the_token_embedding(method):
    model = build_gpt(dataclasses.replace(SMALL, sketch=dataclasses.replace(SMALL.sketch, layers="all")), seed=0, method=method)
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "wte.weight" in names
    # one fused qkv projection per block: one sketchable layer under sketch_layers all
    attn = model.blocks[0].attn
    assert not hasattr(attn, "q") and attn.qkv.weight.shape == (3 * 32, 32)
    if method == "basis":
        assert isinstance(attn.qkv, BasisLinear)


def test_tied_gradient_is_the_sum_of_head_and_embedding_gradients():
    """Exact model: the tied weight's gradient equals an untied copy's head + embedding grads."""
    torch.manual_seed(0)
    model = build_gpt(dataclasses.replace(SMALL, head="plain"), seed=0, method="exact").double()
    x = torch.randint(0, 97, (2, 16))
    _, loss = model(x, x)
    loss.backward()
    tied = model.wte.weight.grad.clone()
    model.zero_grad()
    head_w = torch.nn.Parameter(model.wte.weight.detach().clone())
    model.lm_head.weight = head_w  # untie: the head now has its own copy
    _, loss = model(x, x)
    loss.backward()
    torch.testing.assert_close(tied, model.wte.weight.grad + head_w.grad, rtol=1e-12, atol=1e-12)


def test_gpt2_init():
    model = build_gpt(dataclasses.replace(SMALL, n_embd=256, n_head=4), seed=0, method="exact")
    std = lambda t: t.detach().std().item()  # noqa: E731
    resid = 0.02 / math.sqrt(2 * SMALL.n_layer)
    # 256 x 256 = 65k samples: the standard error of a std estimate is about std / sqrt(2n) = 0.3%
    assert std(model.blocks[0].attn.out.weight) == pytest.approx(resid, rel=0.02)
    assert std(model.blocks[1].mlp.proj.weight) == pytest.approx(resid, rel=0.02)
    assert std(model.blocks[0].attn.qkv.weight) == pytest.approx(0.02, rel=0.02)
    assert std(model.blocks[2].mlp.fc.weight) == pytest.approx(0.02, rel=0.02)
    assert std(model.wte.weight) == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].ln1.eps == 1e-5 and model.ln_f.eps == 1e-5
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    assert model.lm_head.bias is None
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_gpt2_init_is_the_same_for_exact_and_basis():
    cfg = dataclasses.replace(SMALL, sketch=dataclasses.replace(SMALL.sketch, layers="all"))
    a = build_gpt(cfg, seed=3, method="exact").state_dict()
    b = build_gpt(cfg, seed=3, method="basis").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_weight_decay_only_on_matrices_for_gpt2():
    cfg = apply_overrides(load_config("tiny"), {"model.arch": "gpt2", "optim.name": "adamw", "optim.weight_decay": 0.1})
    model = build_gpt(dataclasses.replace(SMALL), seed=0)
    groups = param_groups(model, cfg)
    for g in groups:
        for p in g["params"]:
            assert g["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_paper_arch_decays_every_parameter():
    cfg = apply_overrides(load_config("tiny"), {"optim.weight_decay": 0.05})
    model = build_gpt(GPTConfig(vocab_size=97, block_size=16, n_embd=32, n_head=2, n_layer=1), seed=0)
    groups = param_groups(model, cfg)
    assert len(groups) == 2 and all(g["weight_decay"] == 0.05 for g in groups)
    opt = build_optimizer(model, cfg, capturable=False)
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
