"""Run assembly: the config layer and the model layer agree on the paper's defaults."""

import pytest

from basis_train.core.model import GPTConfig
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.setup import gpt_config


def test_default_config_builds_the_default_model():
    # GPTConfig is the config's ModelConfig with its SketchConfig: the config file's defaults are
    # the model's, with nothing written twice.
    assert gpt_config(load_config(None)) == GPTConfig()


def test_a_gpu_sized_config_on_the_cpu_is_said_with_its_time(monkeypatch, capsys):
    from basis_train.core.model import build_gpt
    from basis_train.training import setup

    monkeypatch.setattr(setup, "cpu_flops_per_s", lambda: 1e11)
    cfg = apply_overrides(load_config("gpt2-small"), {"model.n_layer": 2})  # a quicker build, same width
    setup.warn_slow_cpu_run(build_gpt(setup.gpt_config(cfg), seed=0, method="exact"), cfg)
    err = capsys.readouterr().err
    assert "on the CPU: roughly" in err and "meant for a GPU" in err, err
    tiny = load_config("tiny")
    setup.warn_slow_cpu_run(build_gpt(setup.gpt_config(tiny), seed=0, method="exact"), tiny)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("arch,layers,scaled", [
    ("paper", "mlp+head", ["mlp.fc.weight", "mlp.proj.weight"], ),
    ("paper", "all", ["attn.k.weight", "attn.out.weight", "attn.q.weight", "attn.v.weight", "mlp.fc.weight",
                      "mlp.proj.weight"]),
    ("gpt2", "mlp+head", ["mlp.fc.weight", "mlp.proj.weight"]),
    ("paper", "mlp", ["mlp.fc.weight", "mlp.proj.weight"]),
    ("gpt2", "all", ["attn.out.weight", "attn.qkv.weight", "mlp.fc.weight", "mlp.proj.weight"]),
])
def test_lr_scale_sketched_reaches_exactly_the_sketchable_weights(arch, layers, scaled):
    """The lr-matched exact baseline (README: R = 64 against lr x 0.9801) rests on this set:
    the weights whose dW lambda scales, no bias, no LayerNorm, and not a tied head's embedding."""
    from basis_train.core.model import build_gpt
    from basis_train.training.setup import param_groups

    cfg = apply_overrides(load_config("tiny"), {"model.n_layer": 2, "model.arch": arch, "sketch.layers": layers,
                                                "optim.lr_scale_sketched": 0.5})
    model = build_gpt(gpt_config(cfg), seed=0, method="basis")
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    assert len(got) == len(names)
    want = {f"blocks.{i}.{s}" for i in range(2) for s in scaled} | (
        {"lm_head.weight"} if arch == "paper" and layers != "mlp" else set())
    assert {n for n, lr in got.items() if lr == 0.5 * cfg.optim.lr} == want
    assert all(lr == cfg.optim.lr for n, lr in got.items() if n not in want)


def test_sgd_holding_a_device_lr_is_fused_and_steps_as_with_a_float_lr():
    """A captured CUDA graph reads a scheduled lr from a tensor, and SGD's foreach update reads a tensor
    lr on the host (alpha=-lr), an error inside a capture: SGD holding one is fused, reading it where it
    lies, and updates the weights as the foreach SGD with the same float lr does."""
    import torch
    from torch.testing import assert_close

    from basis_train.core.model import build_gpt
    from basis_train.training.setup import build_optimizer, set_lr

    cfg = apply_overrides(load_config("tiny"), {"optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.1,
                                                "optim.weight_decay": 0.0, "optim.schedule": "cosine"})
    models = [build_gpt(gpt_config(cfg), seed=0, method="exact") for _ in range(2)]
    graphed, plain = (build_optimizer(m, cfg, capturable=c) for m, c in zip(models, (True, False)))
    assert all(isinstance(g["lr"], torch.Tensor) and g["fused"] for g in graphed.param_groups)
    assert not any(g["fused"] for g in plain.param_groups)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    for factor in (0.3, 1.0, 0.7):  # the momentum buffers' first step and two after it, lr moving
        for model, opt in zip(models, (graphed, plain)):
            set_lr(opt, factor)
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(*(m.parameters() for m in models)):
        # the same float32 operations per element, possibly fused into multiply-adds: a few roundings
        assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_exact_16_bit_step_has_no_float32_matmul_for_tf32_to_round():
    """`train.tf32: true` is meant to reach only the BASIS head's float32 dW product under 16-bit autocast:
    an exact step there runs no float32 matmul, forward or backward (fused head, GPT-2 architecture)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from basis_train.core.model import build_gpt

    products = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm}

    class Float32Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen, self.float32 = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in products:
                self.seen += 1
                if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 for a in args):
                    self.float32.append(func)
            return func(*args, **(kwargs or {}))

    cfg = GPTConfig(arch="gpt2", vocab_size=97, block_size=16, n_embd=32, n_head=2, n_layer=2, head_chunk=8)
    model = build_gpt(cfg, seed=0, method="exact")
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with Float32Products() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
    assert rec.seen >= 4 * 2 * 3 and rec.float32 == []  # 4 linears a block, 2 blocks: forward, dX and dW
