from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from basis_train.reporting.report import (
    RESULT_COLUMNS,
    collect_runs,
    config_label,
    load_metrics,
    plot_memory,
    plot_val_curves,
    summarize,
    write_results_csv,
    write_summary_md,
)

MIB = 2 ** 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (method, rank, variant, seed, final val loss, activation MiB)
RUNS = [
    ("exact", None, "", 0, 6.60, 4.0),
    ("exact", None, "", 1, 6.70, 4.0),
    ("exact", None, "", 2, 6.65, 4.0),
    ("basis", 32, "", 0, 6.58, 3.0),
    ("basis", 32, "", 1, 6.69, 3.0),
    ("basis", 32, "", 2, 6.62, 3.0),
    ("basis", 8, "lam0", 0, 6.80, 2.0),
    ("basis", 8, "lam0", 1, 6.95, 2.0),
]


def make_run(root: Path, method, rank, variant, seed, val, act_mib, steps=(0, 10, 20)) -> Path:
    d = root / f"{method}-{rank}-{variant or 'default'}-s{seed}"
    d.mkdir(parents=True)
    summary = {
        "method": method, "rank": rank, "variant": variant, "seed": seed, "steps": 20,
        "final_val_loss": val, "final_train_loss": val + 0.1,
        "activation_bytes": int(act_mib * MIB), "weight_cast_bytes": 0, "step_peak_bytes": None,
        "activation_breakdown": {"head": int(act_mib * MIB) // 2,
                                 "attention": int(act_mib * MIB) - int(act_mib * MIB) // 2},
        "wall_s": 10.0 + seed, "tokens_per_s": 1000.0, "val_protocol": "heldout",
    }
    (d / "summary.json").write_text(json.dumps(summary))
    with (d / "metrics.jsonl").open("w") as fh:
        for i, step in enumerate(steps):
            rec = {"step": step, "train_loss": 10.0 - i, "val_loss": val + 2.0 - i,
                   "tokens_per_s": 1000.0}
            fh.write(json.dumps(rec) + "\n")
    return d


@pytest.fixture
def runs(tmp_path):
    return [make_run(tmp_path / "runs", *r) for r in RUNS]


def test_config_label():
    assert config_label("exact", None, "") == "exact"
    assert config_label("basis", 32, "") == "basis R=32"
    assert config_label("basis", 8, "lam0") == "basis R=8 [lam0]"
    assert config_label("exact", None, "lr0.02") == "exact [lr0.02]"
    assert config_label("basis", 8, None) == "basis R=8"


def test_collect_and_csv(runs, tmp_path):
    unfinished = tmp_path / "runs" / "crashed"
    unfinished.mkdir()
    with pytest.warns(UserWarning, match="no summary.json"):
        rows = collect_runs([*runs, unfinished])
    assert len(rows) == 8
    assert rows[0]["label"] == "exact" and rows[6]["label"] == "basis R=8 [lam0]"
    write_results_csv(rows, tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == RESULT_COLUMNS
        out = list(reader)
    assert list(RESULT_COLUMNS[:10]) == [
        "method", "rank", "variant", "seed", "steps", "final_val_loss", "final_train_loss",
        "activation_bytes", "weight_cast_bytes", "step_peak_bytes"]
    assert {"act_head", "act_attention", "act_sketches", "head"} <= set(RESULT_COLUMNS)
    assert len(out) == 8
    assert out[0]["rank"] == "" and out[0]["step_peak_bytes"] == ""
    assert int(out[0]["act_head"]) + int(out[0]["act_attention"]) == int(out[0]["activation_bytes"])
    assert out[0]["act_sketches"] == ""
    assert out[3]["rank"] == "32" and float(out[3]["final_val_loss"]) == 6.58
    assert out[7]["variant"] == "lam0" and out[7]["label"] == "basis R=8 [lam0]"


def test_summarize_numbers(runs):
    summary = summarize(collect_runs(runs))
    assert [s["label"] for s in summary] == ["exact", "basis R=32", "basis R=8 [lam0]"]
    ex, r32, r8 = summary

    # exact: 6.60, 6.70, 6.65 -> mean 6.65, std 0.05, half width t_{.975,2} * 0.05 / sqrt(3)
    assert ex["n"] == 3 and ex["seeds"] == [0, 1, 2]
    assert ex["val_mean"] == pytest.approx(6.65) and ex["val_std"] == pytest.approx(0.05)
    half = 4.3026527 * 0.05 / math.sqrt(3)
    assert ex["val_ci_low"] == pytest.approx(6.65 - half, abs=1e-6)
    assert ex["val_ci_high"] == pytest.approx(6.65 + half, abs=1e-6)
    assert ex["train_mean"] == pytest.approx(6.75)
    assert ex["act_bytes_mean"] == 4 * MIB and ex["act_ratio"] == 1.0
    assert ex["diff_mean"] is None and ex["p_value"] is None

    # R=32 minus exact per seed: -0.02, -0.01, -0.03 -> mean -0.02, std 0.01, t = -2 sqrt(3)
    assert r32["diff_n"] == 3 and r32["diff_mean"] == pytest.approx(-0.02)
    half = 4.3026527 * 0.01 / math.sqrt(3)
    assert r32["diff_ci_low"] == pytest.approx(-0.02 - half, abs=1e-6)
    assert r32["diff_ci_high"] == pytest.approx(-0.02 + half, abs=1e-6)
    t = 2 * math.sqrt(3)  # df = 2: p = 1 - |t| / sqrt(2 + t^2)
    assert r32["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert r32["n_better"] == 3
    assert r32["act_ratio"] == pytest.approx(0.75)

    # R=8 [lam0] has seeds 0, 1 only: diffs 0.20, 0.25 -> mean 0.225, sem 0.025, t = 9, df = 1
    assert r8["n"] == 2 and r8["diff_n"] == 2
    assert r8["diff_mean"] == pytest.approx(0.225)
    assert r8["diff_ci_high"] - r8["diff_mean"] == pytest.approx(12.7062047 * 0.025, abs=1e-6)
    assert r8["p_value"] == pytest.approx(1 - 2 * math.atan(9.0) / math.pi, rel=1e-9)
    assert r8["n_better"] == 0 and r8["act_ratio"] == pytest.approx(0.5)


def test_summarize_rejects_mixed_or_duplicate(runs, tmp_path):
    rows = collect_runs(runs)
    mixed = [dict(rows[0], val_protocol="paper"), *rows[1:]]
    with pytest.raises(ValueError, match="val_protocol"):
        summarize(mixed)
    with pytest.raises(ValueError, match="seed"):
        summarize([*rows, dict(rows[0])])


def test_summarize_without_baseline(runs):
    summary = summarize(collect_runs(runs[3:]))
    assert all(s["diff_mean"] is None and s["act_ratio"] is None for s in summary)


def test_summary_markdown(runs, tmp_path):
    summary = summarize(collect_runs(runs))
    path = tmp_path / "out" / "summary.md"
    write_summary_md(summary, path, "BASIS vs exact", notes=["3 seeds", "heldout validation"],
                     paper_table={"exact": 6.616, "basis R=32": 6.575})
    text = path.read_text()
    assert text.startswith("# BASIS vs exact\n")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| configuration"))
    assert "Δ vs exact (paired, 95% CI)" in header and header.endswith("| paper val |")
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["exact"].startswith("| exact | 3 | 6.6500 ± 0.0500 | [6.5258, 6.7742] |")
    assert "(baseline)" in rows["exact"] and rows["exact"].endswith("| 4.000 | 1.000 | – | 6.616 |")
    r32 = rows["basis R=32"]
    assert "| -0.0200 [-0.0448, +0.0048] (n=3, better 3/3) | 0.0742 |" in r32
    assert r32.endswith("| 3.000 | 0.750 | – | 6.575 |")
    assert rows["basis R=8 [lam0]"].endswith("| 2.000 | 0.500 | – | – |")
    assert "- 3 seeds" in text and "- heldout validation" in text


def test_markdown_without_paper_column(runs, tmp_path):
    summary = summarize(collect_runs(runs[:3]))
    write_summary_md(summary, tmp_path / "s.md", "t")
    text = (tmp_path / "s.md").read_text()
    assert "paper val" not in text and "| exact | 3 |" in text


def test_load_metrics_tolerates_truncated_tail(runs):
    path = runs[0] / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 30, "val_l')
    assert [r["step"] for r in load_metrics(runs[0])] == [0, 10, 20]
    path.write_text('{"step": 0\n' + path.read_text())
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        load_metrics(runs[0])


def test_plots_are_png(runs, tmp_path):
    by_label: dict[str, list[Path]] = {}
    for row in collect_runs(runs):
        by_label.setdefault(row["label"], []).append(Path(row["run_dir"]))
    # a seed that stopped early: the curve keeps only steps every seed reached
    by_label["exact"].append(make_run(tmp_path / "extra", "exact", None, "", 3, 6.6, 4.0,
                                      steps=(0, 10)))
    curves = tmp_path / "plots" / "val.png"
    plot_val_curves(by_label, curves)
    memory = tmp_path / "plots" / "memory.png"
    plot_memory(summarize(collect_runs(runs)), memory)
    for path in (curves, memory):
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_ranks_clamped_to_the_rows_stay_apart(tmp_path):
    """R = 64 and R = 32 on 16 rows a step both run R = 16 (summary.json: rank 16, rank_requested
    64 / 32): two configurations, each tagged with the R that ran, not one with two runs a seed."""
    dirs = []
    for asked in (64, 32, 16):
        d = tmp_path / f"r{asked}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"method": "basis", "rank": 16, "rank_requested": asked,
                                                    "variant": "", "seed": 0, "final_val_loss": 1.0}))
        dirs.append(d)
    assert [r["label"] for r in collect_runs(dirs)] == ["basis R=64 [ran R=16]", "basis R=32 [ran R=16]", "basis R=16"]
