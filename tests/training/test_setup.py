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
