"""The issue-12 grid end to end on CPU: tiny GPT on a temp corpus of .py files, the two basis-compare
calls that grid made (scripts/scale_grid.sh now runs issue 25's: test_scale_grid25.py), then the scale report; plus
the planning and the lr schedule."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import basis_train
from basis_train.cli.compare import compare_app
from basis_train.experiments.compare import parse_variants, plan
from basis_train.reporting.scale import write_report
from basis_train.training.config import ConfigError, apply_overrides, config_from_dict, load_config
from basis_train.training.setup import build_optimizer, lr_multiplier, set_lr

runner = CliRunner()
# heldout_every 60: two of the corpus's files held out (the loader lowers k until 2,000 tokens); scoring
# 50,257 logits a token over more of them was most of each tiny run's time.
TINY_CODE = """
model: {block_size: 32, n_embd: 64, n_head: 2, n_layer: 2}
sketch: {rank: 8}
optim: {name: adamw, lr: 1.0e-3, schedule: cosine, warmup_steps: 2, weight_decay: 0.1}
train: {steps: 6, batch_size: 2, eval_every: 3, checkpoint_every: 3, device: cpu}
data: {heldout_every: 60, heldout_min_tokens: 2000, eval_batch_size: 16, single_pass: true}
"""


@pytest.fixture(scope="module")
def code_corpus(tmp_path_factory):
    """This package's own source, nested as in site-packages: real code nobody wrote for the test."""
    root = tmp_path_factory.mktemp("site") / "basis_train"
    shutil.copytree(Path(basis_train.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    return str(root.parent / "**" / "*.py")


def test_grid_plan_is_the_issue_grid(tmp_path):
    jobs = plan({}, [64, 256, 1024], [0, 1, 2], parse_variants("ckpt@exact,all@256"), tmp_path)
    assert [j.label for j in jobs[:6]] == ["exact", "exact [ckpt]", "basis R=64", "basis R=256",
                                           "basis R=256 [all]", "basis R=1024"]
    assert len(jobs) == 18
    lr = plan({}, [256], [0], parse_variants("lr0.5x,lr2x"), tmp_path, baselines=False)
    assert {j.label for j in lr} == {"exact [lr0.5x]", "exact [lr2x]", "basis R=256 [lr0.5x]", "basis R=256 [lr2x]"}
    assert {j.overrides["optim.lr_factor"] for j in lr} == {0.5, 2.0}
    with pytest.raises(ConfigError, match="after @"):
        parse_variants("ckpt@big")


def test_cosine_schedule_with_warmup():
    cfg = config_from_dict({"optim": {"schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1},
                            "train": {"steps": 110}})
    f = [lr_multiplier(cfg, s) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[10] == 1.0
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert lr_multiplier(config_from_dict({}), 5) == 1.0  # the paper: constant


def test_schedule_moves_every_group_and_keeps_lr_factor():
    cfg = config_from_dict({"optim": {"name": "adamw", "lr": 1e-3, "lr_factor": 2.0, "lr_scale_sketched": 0.5,
                                      "schedule": "cosine"}})
    from basis_train.core.model import build_gpt
    from basis_train.training.setup import gpt_config

    model = build_gpt(gpt_config(apply_overrides(cfg, {"model.vocab_size": 64})), seed=0, method="exact")
    opt = build_optimizer(model, cfg, capturable=False)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 * 0.25, 1e-3 * 0.25])


@pytest.mark.slow
def test_scale_grid_end_to_end_on_cpu(tmp_path, code_corpus):
    config = tmp_path / "tiny-code.yaml"
    config.write_text(TINY_CODE)
    grid = tmp_path / "grid"
    common = ["--config", str(config), "--data-files", code_corpus, "--out", str(grid), "--jobs", "2"]
    res = runner.invoke(compare_app, [*common, "--ranks", "8", "--variants", "ckpt@exact,all@8", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(compare_app, [*common, "--ranks", "8", "--variants", "lr0.5x,lr2x", "--seeds", "1",
                                      "--no-baselines"])
    assert res.exit_code == 0, res.output
    summary = write_report(grid, tmp_path / "results", command="test")
    labels = [s["label"] for s in summary]
    assert set(labels) == {"exact", "exact [ckpt]", "exact [lr0.5x]", "exact [lr2x]", "basis R=8",
                           "basis R=8 [layers=all]", "basis R=8 [lr0.5x]", "basis R=8 [lr2x]"}
    runs = {p.parent.name: json.loads(p.read_text()) for p in grid.glob("runs/*/summary.json")}
    assert len(runs) == 8
    assert {(r["epoch"], r["tokens_seen"]) for r in runs.values()} == {(0, 6 * 2 * 32)}
    # Checkpointing recomputes the same forward: same numbers as exact, seed by seed.
    assert runs["exact_ckpt-s0"]["final_val_loss"] == pytest.approx(runs["exact-s0"]["final_val_loss"], abs=1e-6)
    assert runs["basis_R8-s0"]["final_val_loss"] != runs["exact-s0"]["final_val_loss"]  # R = 8 < 64 rows: sketched
    assert len({runs[f"exact{v}-s0"]["final_val_loss"] for v in ("", "_lr0.5x", "_lr2x")}) == 3
    corpus = runs["exact-s0"]["data"]["corpus"]
    assert corpus["n_files_used"] >= 20 and corpus["documents"] == "one per file"
    md = (tmp_path / "results" / "summary.md").read_text()
    assert "Learning-rate sensitivity" in md and "Epoch at the end of every run: [0]" in md
    assert "| files used" in (tmp_path / "results" / "corpus.md").read_text()


def test_single_pass_refuses_a_second_epoch(tmp_path, code_corpus):
    config = tmp_path / "tiny-code.yaml"
    config.write_text(TINY_CODE)
    cfg = load_config(config)
    assert cfg.data.single_pass
    proc = subprocess.run([sys.executable, "-m", "basis_train.cli", "--config", str(config), "--data-files",
                           code_corpus, "--steps", "100000", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "data.single_pass" in err[0] and "use at most" in err[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("optim", [{"optim.name": "adamw", "optim.lr": 3e-3},
                                   # SGD's foreach update would read the device lr on the host, which a
                                   # capture refuses: setup.build_optimizer makes it fused
                                   {"optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9}])
def test_schedule_reaches_a_captured_graph(tmp_path, optim):
    """A captured step bakes in a float lr; the schedule must reach it through the device tensor:
    graphed and eager runs agree, and both differ from the same run at a constant lr."""
    from basis_train.training.train import Run

    small = {"model.block_size": 32, "model.n_embd": 32, "model.n_head": 2, "model.n_layer": 1,
             "train.batch_size": 2, "train.steps": 30, "train.eval_every": 10, "train.checkpoint_every": 30,
             "train.device": "cuda", "train.method": "exact", "data.val_protocol": "paper",
             **optim, "optim.schedule": "cosine", "optim.warmup_steps": 5, "optim.min_lr_ratio": 0.0}
    cfg = apply_overrides(load_config(None), small)
    graphed = Run(cfg, tmp_path / "g", progress=False).run()
    eager = Run(apply_overrides(cfg, {"train.cuda_graphs": False}), tmp_path / "e", progress=False).run()
    flat = Run(apply_overrides(cfg, {"optim.schedule": "constant"}), tmp_path / "c", progress=False).run()
    assert graphed["cuda_graphs"] and not eager["cuda_graphs"]
    assert graphed["final_val_loss"] == pytest.approx(eager["final_val_loss"], rel=1e-4)
    assert abs(graphed["final_val_loss"] - flat["final_val_loss"]) > 1e-3
