"""Run assembly: the config layer and the model layer agree on the paper's defaults."""

from basis_train.core.model import GPTConfig
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.setup import gpt_config


def test_default_config_builds_the_default_model():
    # ModelConfig/SketchConfig (what users set) and GPTConfig (what the model takes) each
    # spell out the paper's defaults; this keeps the two lists from drifting apart.
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
