"""basis-diagnose: exact at R = rows, error falls with R, bias against its noise floor, the CLI."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from basis_train.cli.diagnose import app
from basis_train.core.model import GPTConfig, build_gpt
from basis_train.core.sketch import draw_seed
from basis_train.experiments.diagnose import (
    VARIANTS,
    DiagnoseError,
    capture,
    estimate,
    findings,
    load_weights,
    parse_ranks,
    parse_variants,
    resolve_ranks,
    run_draws,
    tabulate,
)

TINY = GPTConfig(vocab_size=97, block_size=8, n_embd=16, n_head=2, n_layer=1, head="plain")  # hooks read dY
ROWS = 16  # 2 sequences x 8 tokens
RANKS = [1, 2, 4, 8, ROWS]
SHRINK = 1 - 0.99**2  # (1 - lam)^2 with the paper's lam


@pytest.fixture(scope="module")
def tiny():
    model = build_gpt(TINY, seed=0, method="exact")
    gen = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, 97, (2, 8), generator=gen) for _ in range(2)) for _ in range(2)]
    names = model.sketchable_names()
    return model, names, capture(model, batches, names)


@pytest.fixture(scope="module")
def table(tiny):
    _, names, caps = tiny
    raw = run_draws(caps, names, RANKS, list(VARIANTS), draws=120, seed=0)
    per_layer, overall = tabulate(raw, names, RANKS, list(VARIANTS), ROWS)
    return {(r["layer"], r["variant"], r["rank"]): r for r in per_layer + overall}


def test_capture_gives_the_exact_weight_gradient(tiny):
    model, names, caps = tiny
    modules = dict(model.named_modules())
    for n in names:  # the model's .grad holds the last batch's gradient
        x, dy = caps[-1][n]
        assert x.dtype == dy.dtype == torch.float64 and x.shape[0] == dy.shape[0] == ROWS
        torch.testing.assert_close(dy.t() @ x, modules[n].weight.grad.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compressed_draws_match_the_literal_estimator(tiny, variant):
    # lm_head's dY (16 x 97) and proj's X (16 x 64) are compressed to 16 columns internally
    _, _, caps = tiny
    for name in ("lm_head", "blocks.0.mlp.proj"):
        x, dy = caps[0][name]
        raw = run_draws([caps[0]], [name], [1, 4, ROWS], [variant], draws=3, seed=7)
        gen, dw = torch.Generator().manual_seed(7), dy.t() @ x
        seeds = [draw_seed(torch.device("cpu"), gen) for _ in range(3)]
        for ri, r in enumerate([1, 4, ROWS]):
            ests = [estimate(x, dy, s, r, VARIANTS[variant]) for s in seeds]
            want = torch.tensor([(e - dw).square().sum().item() for e in ests], dtype=torch.float64)
            torch.testing.assert_close(torch.from_numpy(raw["err2"][0, ri, 0, 0]), want, rtol=1e-9, atol=1e-20)
            nrm = torch.tensor([e.square().sum().item() for e in ests], dtype=torch.float64)
            torch.testing.assert_close(torch.from_numpy(raw["nrm2"][0, ri, 0, 0]), nrm, rtol=1e-9, atol=1e-20)


@pytest.mark.slow
def test_exact_at_rows(table, tiny):
    for layer in [*tiny[1], "overall"]:
        assert table[(layer, "unbiased", ROWS)]["rel_err_mean"] < 1e-10
        basis = table[(layer, "basis", ROWS)]
        # only the scalars' 1e-8 epsilon separates this from pure (1 - lam)^2 shrinkage
        assert basis["rel_err_p10"] == pytest.approx(SHRINK, abs=1e-6)
        assert basis["rel_err_p90"] == pytest.approx(SHRINK, abs=1e-6)
        assert basis["cos_mean"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["unbiased", "basis"])
def test_error_decreases_with_rank(table, variant):
    errs = [table[("overall", variant, r)]["rel_err_mean"] for r in RANKS]
    assert all(a > b for a, b in itertools.pairwise(errs)), errs


@pytest.mark.slow
def test_unbiased_within_noise_and_scalars_overshoot(table, tiny):
    for r in RANKS[:-1]:
        row = table[("overall", "unbiased", r)]
        assert row["bias_rel"] < 4 * row["bias_noise_rel"], (r, row)
        assert abs(row["proj_mean"] - 1) < 4 * row["proj_se"], (r, row)
    assert table[("overall", "basis", ROWS)]["proj_mean"] == pytest.approx(0.99**2, abs=1e-6)
    for layer in [*tiny[1], "overall"]:
        # at R = 1 the scalars give ||dW^|| = (1-lam)^2 ||X|| ||dY||, above ||X^T dY|| here
        assert table[(layer, "basis", 1)]["norm_ratio_mean"] >= 1.0
    assert table[("overall", "basis", 1)]["norm_ratio_std"] < table[("overall", "unbiased", 1)]["norm_ratio_std"]


@pytest.mark.slow
def test_findings_quote_the_measured_numbers(table):
    overall = [row for key, row in table.items() if key[0] == "overall"]
    text = " ".join(findings(overall, ROWS))
    t = {(r["variant"], r["rank"]): r for r in overall}
    assert f"{t[('basis', ROWS)]['rel_err_mean']:.5f}" in text
    ratio = t[("uniform", 8)]["rel_err_mean"] / t[("basis", 8)]["rel_err_mean"]
    assert f"({ratio:.2f}x)" in text
    assert f"{t[('basis', 1)]['norm_ratio_mean']:.2f} +- {t[('basis', 1)]['norm_ratio_std']:.2f}" in text
    # with only the exact-at-rows variant, comparisons it cannot make are left out rather than invented
    assert not any("Uniform" in s or "Gaussian" in s for s in findings([t[("unbiased", r)] for r in RANKS], ROWS))


def test_parsing():
    assert parse_ranks("1, 8,rows") == [1, 8, "rows"]
    assert resolve_ranks([1, 64, 128, "rows"], 64) == [1, 64]
    assert parse_variants("basis,lam0,basis") == ["basis", "lam0"]
    for bad in ("0", "-1", "x", "", "4,,8"):
        with pytest.raises(DiagnoseError):
            parse_ranks(bad)
    with pytest.raises(DiagnoseError, match="unknown variant"):
        parse_variants("basis,nope")


def test_load_weights(tmp_path):
    trained, fresh = build_gpt(TINY, seed=1, method="exact"), build_gpt(TINY, seed=0, method="exact")
    torch.save({"model": trained.state_dict(), "step": 3}, tmp_path / "checkpoint.pt")
    assert load_weights(fresh, tmp_path / "checkpoint.pt")["step"] == 3
    torch.testing.assert_close(fresh.lm_head.weight, trained.lm_head.weight)
    with pytest.raises(DiagnoseError, match="not found"):
        load_weights(fresh, tmp_path / "missing.pt")


@pytest.fixture
def tiny_config(tmp_path):
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "the", "dog", "ran", "to", "the", "park", "and"]
    docs = [" ".join(words[i:] + words[:i]) * 3 for i in range(12)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = {"model": {"block_size": 8, "n_embd": 16, "n_head": 2, "n_layer": 1},
           "train": {"batch_size": 2, "device": "cpu"},
           "data": {"data_files": str(tmp_path / "docs.jsonl"), "val_protocol": "paper", "paper_val_docs": 2,
                    "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_writes_every_output(tiny_config, tmp_path):
    out = tmp_path / "out"
    args = ["--config", str(tiny_config), "--draws", "5", "--batches", "1", "--ranks", "1,4,rows",
            "--variants", "basis,unbiased,uniform", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("diagnostics.csv", "overall.csv", "summary.md", "error_vs_rank.png", "norm_ratio_vs_rank.png",
                 "meta.json"):
        assert (out / name).stat().st_size > 0, name
    meta = json.loads((out / "meta.json").read_text())
    assert meta["rows"] == 16 and meta["ranks"] == [1, 4, 16] and meta["draws"] == 5
    assert meta["layers"] == ["blocks.0.mlp.fc", "blocks.0.mlp.proj", "lm_head"]
    assert "--draws=5" in meta["command"]
    summary = (out / "summary.md").read_text()
    assert "## Findings" in summary and "16 (rows)" in summary
    assert len((out / "diagnostics.csv").read_text().splitlines()) == 1 + 3 * 3 * 3


@pytest.mark.parametrize("args, message", [
    (["--ranks", "0"], "--ranks"),
    (["--draws", "1"], "--draws must be >= 2"),
    (["--variants", "basis,bogus"], "unknown variant"),
    (["--checkpoint", "/nonexistent/checkpoint.pt"], "checkpoint not found"),
    (["--config", "/nonexistent.yaml"], "config file not found"),
])
def test_cli_user_errors_exit_2_with_one_line(args, message, tmp_path):
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output
