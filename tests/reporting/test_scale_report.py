"""The scale report from fake run directories: paired gaps, memory names old and new, LR table."""

import csv
import json

import pytest

from basis_train.reporting.scale import write_report
from basis_train.reporting.stats import paired_diff

CORPUS = {"n_files_matched": 30, "n_files_used": 25, "n_duplicates": 3, "n_unreadable": 0, "n_not_utf8": 1,
          "n_binary": 1, "n_empty": 0, "bytes_used": 215_000, "documents": "one per file", "n_docs": 25,
          "n_tokens": 100_000}
DATA = {"protocol": "heldout", "n_docs": 25, "source": "files x", "heldout_every": 5, "n_train_docs": 20,
        "n_val_docs": 5, "n_train_tokens": 80_000, "n_val_tokens": 20_000, "corpus": CORPUS}


def fake_run(grid, name, method, rank, variant, seed, val, step_peak, new_names=True, epoch=0, **extra):
    d = grid / "runs" / name
    d.mkdir(parents=True)
    mem = ({"activation_bytes": 2**30, "step_peak_bytes": step_peak} if new_names
           else {"peak_activation_bytes": 2**30, "cuda_peak_step_bytes": step_peak})
    (d / "summary.json").write_text(json.dumps({
        "method": method, "rank": rank, "variant": variant, "seed": seed, "steps": 20, "final_val_loss": val,
        "final_train_loss": val + 0.1, "tokens_per_s": 1000.0 * (seed + 1), "wall_s": 3.0,
        "val_protocol": "heldout", "tokens_seen": 20 * 8 * 1024, "epoch": epoch, "data": DATA, **mem, **extra}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": val + 1 / s}) + "\n"
                                             for s in (10, 20)))


@pytest.fixture
def grid(tmp_path):
    g = tmp_path / "grid"
    exact = [4.00, 4.10, 3.95]
    basis = [4.05, 4.12, 4.04]
    for s in range(3):
        fake_run(g, f"exact-s{s}", "exact", None, "", s, exact[s], 8 * 2**30, new_names=s != 1)
        fake_run(g, f"basis_R256-s{s}", "basis", 256, "", s, basis[s], 7 * 2**30)
    fake_run(g, "exact_lr2x-s0", "exact", None, "lr2x", 0, 3.90, 8 * 2**30)
    fake_run(g, "basis_R256_lr2x-s0", "basis", 256, "lr2x", 0, 3.99, 7 * 2**30)
    fake_run(g, "exact_ckpt-s0", "exact", None, "ckpt", 0, 4.00, 3 * 2**30)
    return g, exact, basis


def test_scale_report_from_run_dirs(grid, tmp_path):
    g, exact, basis = grid
    res = tmp_path / "results"
    write_report(g, res, command="bash scripts/scale_grid.sh")
    for name in ("results.csv", "summary.md", "val_loss.png", "pareto.png", "corpus.md"):
        assert (res / name).stat().st_size > 0, name
    rows = list(csv.DictReader((res / "results.csv").open()))
    assert len(rows) == 9
    assert {r["step_peak_bytes"] for r in rows if r["label"] == "exact"} == {str(8 * 2**30)}  # old name read too
    md = (res / "summary.md").read_text()
    d = paired_diff(basis, exact)
    line = next(ln for ln in md.splitlines() if ln.startswith("| basis R=256 |"))
    assert f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]" in line
    assert "| 1024.0 | 7.00 | 2,000 |" in line  # activation MiB, step peak GiB, mean tokens/s
    assert "exact [ckpt] | 1 |" in md and "(1 seed, no CI)" in md
    lr = md[md.index("Learning-rate sensitivity"):]
    assert "| exact | 4.0000 | 3.9000 |" in lr and "| basis R=256 | 4.0500 | 3.9900 |" in lr
    assert "[ckpt]" not in lr
    assert "epoch at the end of every run [0]" in md and "not a single-pass" not in md
    corpus = (res / "corpus.md").read_text()
    assert "| duplicates dropped (identical bytes) | 3 |" in corpus and "| bytes per token | 2.15 |" in corpus
    assert "every 5-th document held out" in corpus and "bash scripts/scale_grid.sh" in corpus


def test_scale_report_flags_a_second_epoch(grid, tmp_path):
    g, _, _ = grid
    fake_run(g, "basis_R64-s0", "basis", 64, "", 0, 4.2, 7 * 2**30, epoch=1)
    write_report(g, tmp_path / "r")
    assert "not a single-pass grid" in (tmp_path / "r" / "summary.md").read_text()


def test_scale_report_refuses_mixed_splits(grid, tmp_path):
    g, _, _ = grid
    path = g / "runs" / "exact-s0" / "summary.json"
    s = json.loads(path.read_text())
    s["data"] = {**DATA, "n_val_tokens": 1}
    path.write_text(json.dumps(s))
    with pytest.raises(ValueError, match="different data splits"):
        write_report(g, tmp_path / "r")


def test_pareto_leaves_the_learning_rate_check_out():
    from basis_train.reporting.scale import pareto_points

    rows = [{"label": lab, "variant": var, "step_peak_bytes_mean": 1.0}
            for lab, var in (("exact", ""), ("exact [ckpt]", "ckpt"), ("exact [lr2x]", "lr2x"),
                             ("basis R=256 [lr0.5x]", "lr0.5x"), ("basis R=256", ""))]
    rows.append({"label": "no peak", "variant": "", "step_peak_bytes_mean": None})
    got = [s["label"] for s in pareto_points(rows, "step_peak_bytes_mean")]
    assert got == ["exact", "exact [ckpt]", "basis R=256"]


def test_speed_of_runs_that_shared_a_gpu_is_left_out(tmp_path):
    """tokens/s in summary.md averages only runs alone on their GPU; results.csv keeps every run's."""
    g = tmp_path / "grid"
    for s in range(3):
        fake_run(g, f"exact-s{s}", "exact", None, "", s, 4.0 + s / 10, 8 * 2**30,
                 **({"runs_per_gpu": 2} if s else {}))  # seed 0: written before the field existed
    write_report(g, tmp_path / "res")
    md = (tmp_path / "res" / "summary.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| exact |"))
    assert line.endswith("| 1,000 |"), line  # seed 0's 1000 tok/s, not the mean 2000 of all three
    rows = list(csv.DictReader((tmp_path / "res" / "results.csv").open()))
    assert sorted((r["runs_per_gpu"], r["tokens_per_s"]) for r in rows) == [
        ("1", "1000.0"), ("2", "2000.0"), ("2", "3000.0")]
