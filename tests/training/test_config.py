from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from basis_train.cli.train import CLI_FLAGS
from basis_train.training.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_config,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_the_paper_protocol():
    cfg = load_config(None)
    assert (cfg.model.block_size, cfg.model.n_embd, cfg.model.n_head, cfg.model.n_layer) == (
        64, 64, 2, 2)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every) == (50000, 1, 1000)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (
        "sgd", 0.01, 0.9, 0.0)
    assert (cfg.sketch.rank, cfg.sketch.layers, cfg.sketch.lam) == (32, "mlp+head", 0.01)
    assert cfg.train.dtype == "float32"


@pytest.mark.parametrize("name", ["paper", "tiny", "gpt2-small"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert config_from_dict(config_to_dict(cfg)) == cfg
    dump_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.yaml"]


def test_paper_yaml_spells_out_the_defaults():
    # Except data.shuffle: the defaults shuffle fineweb-edu and files, the paper streams every
    # dataset in order (test_data_order.py); on its own corpus the two agree.
    paper = load_config(CONFIGS / "paper.yaml")
    assert paper.data.shuffle is False and paper.data.shuffled == Config().data.shuffled
    assert dataclasses.replace(paper, data=dataclasses.replace(paper.data, shuffle=None)) == Config()
    text = (CONFIGS / "paper.yaml").read_text()
    for section, body in config_to_dict(Config()).items():
        for key in body:
            assert f"  {key}:" in text, f"{section}.{key} not written out in paper.yaml"


def test_tiny_and_gpt2_small_values():
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert (tiny.model.vocab_size, tiny.model.block_size, tiny.model.n_embd) == (50257, 32, 32)
    assert (tiny.model.n_head, tiny.model.n_layer) == (2, 1)
    assert (tiny.train.steps, tiny.train.eval_every) == (200, 50)
    big = load_config(CONFIGS / "gpt2-small.yaml")
    assert (big.model.n_embd, big.model.n_layer, big.model.n_head, big.model.block_size) == (
        768, 12, 12, 1024)
    assert (big.train.batch_size, big.train.dtype, big.train.steps, big.train.eval_every) == (
        8, "bfloat16", 1000, 250)
    assert (big.optim.name, big.optim.lr, big.optim.weight_decay) == ("adamw", 6e-4, 0.1)
    assert (big.sketch.layers, big.sketch.rank) == ("mlp+head", 64)


def test_partial_and_empty_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "sketch:\n  rank: 8\nlog:\n"))
    assert cfg.sketch.rank == 8
    assert dataclasses.replace(cfg, sketch=Config().sketch) == Config()
    for empty in ("", "# only a comment\n"):  # refused: a file that sets nothing is a mistake, not the defaults
        with pytest.raises(ConfigError, match="sets nothing"):
            load_config(write(tmp_path, empty))


def test_numbers_yaml_1_1_would_read_as_strings(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 6e-4\n  eps: 1e-10\n"))
    assert cfg.optim.lr == 6e-4 and cfg.optim.eps == 1e-10


def test_int_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\nsketch:\n  lam: 0\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.sketch.lam == 0.0 and isinstance(cfg.sketch.lam, float)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_yaml_reports_line(tmp_path):
    msg = error_of(tmp_path, "train:\n  steps: 5\n  seed: [1, 2\n")
    assert "invalid YAML" in msg and "line" in msg
    msg = error_of(tmp_path, "train:\n  steps: 5\n bad: - x\n")
    assert "line 3" in msg


def test_top_level_must_be_mapping(tmp_path):
    assert "top level must be a mapping" in error_of(tmp_path, "- 1\n- 2\n")
    assert "section 'train' must be a mapping" in error_of(tmp_path, "train: 5\n")


def test_unknown_section_and_key(tmp_path):
    assert "unknown section 'trian' (did you mean 'train'?)" in error_of(tmp_path, "trian: {}\n")
    msg = error_of(tmp_path, "train:\n  stpes: 10\n")
    assert "unknown key 'train.stpes' (did you mean 'steps'?)" in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("train:\n  steps: abc\n", "train.steps must be int, got str 'abc'"),
    ("train:\n  steps: true\n", "train.steps must be int, got bool True"),
    ("train:\n  steps: 10.0\n", "train.steps must be int, got float 10.0"),
    ("optim:\n  lr: fast\n", "optim.lr must be float, got str 'fast'"),
    ("optim:\n  lr: .nan\n", "optim.lr must be a finite number"),
    ("sketch:\n  invariant_scalars: 1\n", "sketch.invariant_scalars must be bool, got int 1"),
    ("sketch:\n  layers: 3\n", "sketch.layers must be str, got int 3"),
    ("optim:\n  betas: 0.9\n", "optim.betas must be a list of float"),
    ("optim:\n  betas: [0.9, x]\n", "optim.betas[1] must be float"),
])
def test_wrong_types(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(("text", "expected"), [
    ("sketch:\n  hashing: balancd\n", "sketch.hashing must be one of"),
    ("train:\n  method: sketch\n", "train.method must be one of basis, exact"),
    ("train:\n  dtype: fp16\n", "train.dtype must be one of"),
    ("data:\n  val_protocol: test\n", "data.val_protocol must be one of"),
    ("log:\n  wandb: yes-please\n", "log.wandb must be one of"),
    ("sketch:\n  rank: 0\n", "sketch.rank must be >= 1"),
    ("train:\n  steps: 0\n", "train.steps must be >= 1"),
    ("train:\n  batch_size: -1\n", "train.batch_size must be >= 1"),
    ("train:\n  eval_every: 0\n", "train.eval_every must be >= 1"),
    ("train:\n  checkpoint_every: 0\n", "train.checkpoint_every must be >= 1"),
    ("optim:\n  lr: 0\n", "optim.lr must be > 0"),
    ("optim:\n  lr: -0.1\n", "optim.lr must be > 0"),
    ("sketch:\n  lam: 1.0\n", "sketch.lam must satisfy 0 <= value < 1"),
    ("sketch:\n  lam: -0.1\n", "sketch.lam must satisfy 0 <= value < 1"),
    ("model:\n  n_embd: 64\n  n_head: 3\n", "model.n_embd (64) must be divisible by model.n_head"),
    ("optim:\n  betas: [0.9]\n", "optim.betas must be two values"),
    ("data:\n  dataset: files\n", "needs data.data_files"),
    ("data:\n  dataset: fineweb-edu\n  data_files: a.txt\n", "data.data_files is set"),
])
def test_invalid_values(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text)


def test_choice_error_suggests(tmp_path):
    assert "did you mean 'balanced'" in error_of(tmp_path, "sketch:\n  hashing: balancd\n")


def test_data_files_in_yaml_implies_files(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  data_files: corpus/*.txt\n"))
    assert cfg.data.dataset == "files"


def test_apply_overrides():
    base = Config()
    cfg = apply_overrides(base, {"sketch.rank": 8, "optim.lr": 1, "train.method": "exact"})
    assert (cfg.sketch.rank, cfg.optim.lr, cfg.train.method) == (8, 1.0, "exact")
    assert base == Config()  # untouched
    assert apply_overrides(base, {}) == base


def test_overrides_validate():
    with pytest.raises(ConfigError, match=r"sketch.rank must be >= 1"):
        apply_overrides(Config(), {"sketch.rank": 0})
    with pytest.raises(ConfigError, match=r"sketch.rank must be int, got str '8'"):
        apply_overrides(Config(), {"sketch.rank": "8"})
    with pytest.raises(ConfigError, match=r"did you mean 'rank'"):
        apply_overrides(Config(), {"sketch.rnak": 8})
    with pytest.raises(ConfigError, match=r"did you mean 'sketch'"):
        apply_overrides(Config(), {"skech.rank": 8})
    with pytest.raises(ConfigError, match=r"section.key"):
        apply_overrides(Config(), {"rank": 8})


def test_data_files_override_implies_files_dataset():
    cfg = apply_overrides(Config(), {"data.data_files": "x/*.txt"})
    assert cfg.data.dataset == "files" and cfg.data.data_files == "x/*.txt"
    with pytest.raises(ConfigError, match="data.data_files is set"):
        apply_overrides(Config(), {"data.data_files": "x", "data.dataset": "fineweb-edu"})


def test_cli_flags_point_at_real_fields():
    fields = config_to_dict(Config())
    for flag, dotted in CLI_FLAGS.items():
        section, key = dotted.split(".")
        assert key in fields[section], flag
    assert CLI_FLAGS["rank"] == "sketch.rank" and CLI_FLAGS["optimizer"] == "optim.name"
    assert CLI_FLAGS["head"] == "model.head"
    # Every entry is an option of basis-train, which passes exactly these through to the config.
    import inspect

    from basis_train.cli.train import train_cmd

    assert set(CLI_FLAGS) <= set(inspect.signature(train_cmd).parameters)


def test_config_hash():
    base = Config()
    h = config_hash(base)
    assert len(h) == 12 and h == config_hash(Config())
    ignored = apply_overrides(base, {"log.out": "runs/x", "log.wandb": "online",
                                     "train.compile": True, "train.cuda_graphs": False})
    assert config_hash(ignored) == h
    for key, value in [("sketch.rank", 8), ("train.seed", 1), ("train.device", "cpu"),
                       ("data.val_protocol", "paper"), ("optim.betas", [0.9, 0.99])]:
        assert config_hash(apply_overrides(base, {key: value})) != h, key
    assert config_hash(ignored, ignore=()) != h
    # auto and native both run our head; cce rounds its gradient sums in bf16: another run
    assert config_hash(apply_overrides(base, {"model.head_kernel": "native"})) == h
    assert config_hash(apply_overrides(base, {"model.head_kernel": "cce"})) != h


# Hashes of runs that exist: a resumable grid skips a finished run by its hash, so moving or renaming a
# config field must leave these alone (a changed hash reruns every committed grid).
KNOWN_HASHES = {"paper": "1e2f00309d5d", "tiny": "685bc8472bd6", "gpt2-small": "c79702999d7b",
                "gpt2-small-code": "200682bdbfb8"}


@pytest.mark.parametrize("name", sorted(KNOWN_HASHES))
def test_shipped_configs_keep_their_hash(name):
    assert config_hash(load_config(name)) == KNOWN_HASHES[name]


def test_hash_is_stable_across_round_trip(tmp_path):
    cfg = apply_overrides(load_config(CONFIGS / "tiny.yaml"), {"optim.lr": 3e-3})
    dump_config(cfg, tmp_path / "c.yaml")
    assert config_hash(load_config(tmp_path / "c.yaml")) == config_hash(cfg)


def test_yaml_1_1_words_are_not_booleans(tmp_path):
    cfg = load_config(write(tmp_path, "log:\n  wandb: off\nsketch:\n  invariant_scalars: false\n"))
    assert cfg.log.wandb == "off" and cfg.sketch.invariant_scalars is False
    assert "must be bool, got str 'yes'" in error_of(tmp_path, "train:\n  compile: yes\n")


def test_new_keys_at_defaults_keep_committed_run_hashes():
    """Keys added after runs were committed must not change their hash (grids would rerun them)."""
    # every committed run, so that moving a config field between modules is checked too
    runs = sorted(p for p in Path(__file__).resolve().parents[2].glob("results/**/summary.json")
                  if (p.parent / "config.yaml").is_file() and "config_hash" in json.loads(p.read_text()))
    if not runs:
        pytest.skip("no committed runs")
    for path in runs:
        recorded = json.loads(path.read_text())["config_hash"]
        assert config_hash(load_config(path.parent / "config.yaml")) == recorded, path
    cfg = load_config(runs[0].parent / "config.yaml")
    assert config_hash(apply_overrides(cfg, {"optim.schedule": "cosine"})) != config_hash(cfg)


def test_variant_tags_name_what_changes_the_numbers():
    from basis_train.training.variants import VARIANTS, variant_of

    base = Config()
    assert variant_of(base) == ""
    assert variant_of(apply_overrides(base, {"model.head_kernel": "native"})) == ""
    assert variant_of(apply_overrides(base, {"model.head_kernel": "cce", "model.checkpoint_blocks": True})) == "ckpt,cce"
    assert variant_of(apply_overrides(base, {"optim.lr_factor": 2.0})) == "lr2x"
    assert variant_of(apply_overrides(base, {"train.tf32": True, "model.checkpoint_blocks": True})) == "ckpt,tf32"
    # a grid's variant is tagged by its name wherever the grid runs it (the reports read layers=all)
    for name, (overrides, methods) in VARIANTS.items():
        for method in methods:
            tag = variant_of(apply_overrides(base, {**overrides, "train.method": method}))
            layers = overrides.get("sketch.layers")
            assert tag == (f"layers={layers}" if layers else name), (name, method)
    assert {"all", "mlp"} <= set(VARIANTS)


def test_tf32_off_keeps_the_hash_and_on_is_another_run():
    """Every run before `train.tf32` ran with TF32 off: off keeps their hash; on can change the numbers."""
    from basis_train.training.config import apply_overrides, config_hash, load_config

    bf16 = apply_overrides(load_config(None), {"train.dtype": "bfloat16"})
    assert config_hash(apply_overrides(bf16, {"train.tf32": False})) == config_hash(bf16)
    assert config_hash(apply_overrides(bf16, {"train.tf32": True})) != config_hash(bf16)
