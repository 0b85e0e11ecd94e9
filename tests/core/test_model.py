"""The paper's GPT: size, initialisation, pairing of exact and BASIS models."""

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.model import GPT, GPTConfig, build_gpt
from basis_train.core.options import SketchConfig

PAPER = GPTConfig()


def test_paper_parameter_count():
    # wte 50257*64 + wpe 64*64 + 2 blocks * 49,984 + final LN 128 + head 64*50257
    model = build_gpt(PAPER, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 3_216_448 + 4_096 + 2 * 49_984 + 128 + 3_216_448


def test_sketched_layer_selection():
    count = lambda m: sum(isinstance(x, BasisLinear) for x in m.modules())
    assert count(build_gpt(PAPER, 0)) == 5  # fc and proj of 2 blocks, lm_head
    assert count(build_gpt(replace(PAPER, sketch=replace(PAPER.sketch, layers="all")), 0)) == 13
    assert count(build_gpt(PAPER, 0, method="exact")) == 0
    names = build_gpt(PAPER, 0, method="exact").sketchable_names()
    assert names == ["blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj", "lm_head"]
    mlp_only = build_gpt(replace(PAPER, sketch=replace(PAPER.sketch, layers="mlp")), 0)
    assert count(mlp_only) == 4 and not isinstance(mlp_only.lm_head, BasisLinear)
    assert mlp_only.sketchable_names() == names[:-1]


def test_flax_default_init_statistics():
    model = build_gpt(PAPER, seed=3)
    head = model.lm_head.weight
    assert_close(head.std().item(), 64**-0.5, rtol=0.01, atol=0)
    assert head.abs().max() <= 2 * 64**-0.5 / 0.87962566103423978 + 1e-6
    proj = model.blocks[0].mlp.proj.weight
    assert_close(proj.std().item(), 256**-0.5, rtol=0.03, atol=0)
    assert_close(model.wte.weight.std().item(), 0.125, rtol=0.01, atol=0)
    assert model.wte.weight.abs().max() > 2.5 * 0.125  # plain normal, not truncated
    assert_close(model.wpe.weight.std().item(), 0.125, rtol=0.05, atol=0)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        if "ln" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
    assert model.ln_f.eps == 1e-6


def test_same_seed_same_weights_across_methods():
    exact = build_gpt(PAPER, seed=5, method="exact").state_dict()
    for cfg in (PAPER, replace(PAPER, sketch=replace(PAPER.sketch, layers="all", rank=8))):
        basis = build_gpt(cfg, seed=5).state_dict()
        assert exact.keys() == basis.keys()
        for k in exact:
            assert torch.equal(exact[k], basis[k]), k
    other = build_gpt(PAPER, seed=6).state_dict()
    assert not torch.equal(exact["lm_head.weight"], other["lm_head.weight"])


@pytest.mark.parametrize("layers", ["mlp+head", "mlp", "all"])
def test_rank_equal_rows_matches_exact_gradients(layers):
    cfg = GPTConfig(vocab_size=101, block_size=16, n_embd=16, n_head=2, n_layer=2, sketch=SketchConfig(layers=layers, rank=32))
    lam = cfg.sketch.lam
    exact = build_gpt(cfg, seed=1, method="exact").double()
    basis = build_gpt(cfg, seed=1).double()
    idx = torch.randint(0, 101, (2, 16))  # rows = 2 * 16 = 32 = rank
    tgt = torch.randint(0, 101, (2, 16))
    for m in (exact, basis):
        _, loss = m(idx, tgt)
        loss.backward()
    sketched = {n for n, m in basis.named_modules() if isinstance(m, BasisLinear)}
    assert sketched == set(exact.sketchable_names())
    for (name, p0), p1 in zip(exact.named_parameters(), basis.parameters()):
        module = name.rsplit(".", 1)[0]
        factor = (1 - lam) ** 2 if module in sketched and name.endswith("weight") else 1.0
        assert_close(p1.grad, factor * p0.grad, msg=name)


def test_eval_mode_logits_identical_and_block_size_checked():
    exact = build_gpt(PAPER, seed=2, method="exact").eval()
    basis = build_gpt(PAPER, seed=2).eval()
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert_close(exact(idx)[0], basis(idx)[0])
    with pytest.raises(ValueError, match="block_size"):
        exact(torch.zeros(1, 65, dtype=torch.long))


def test_checkpointed_blocks_same_gradients():
    cfg = GPTConfig(vocab_size=64, block_size=8, n_embd=16, n_head=2, n_layer=2, sketch=SketchConfig(layers="none"))
    plain, ckpt = GPT(cfg, seed=0), GPT(replace(cfg, checkpoint_blocks=True), seed=0)
    idx = torch.randint(0, 64, (2, 8))
    for m in (plain, ckpt):
        m(idx, idx)[1].backward()
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert_close(a.grad, b.grad)


def test_bad_config():
    with pytest.raises(ValueError, match="sketch layers"):
        GPTConfig(sketch=SketchConfig(layers="head"))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=64, n_head=3)
    with pytest.raises(ValueError, match="rank"):
        GPTConfig(sketch=SketchConfig(rank=0))
    assert isinstance(GPT(GPTConfig(vocab_size=10, n_embd=8, n_head=2, n_layer=1), 0).lm_head, nn.Linear)
