"""basis-compare / basis-reproduce end to end on a tiny grid, and the verdict logic."""

import json
import threading

from typer.testing import CliRunner

from basis_train.experiments import compare as compare_mod
from basis_train.experiments.compare import GpuSlots, compare_app, plan
from basis_train.experiments.reproduce import verdicts

runner = CliRunner()


def test_tiny_compare_writes_everything_and_resumes(tmp_path, tiny_config):
    out = tmp_path / "cmp"
    args = ["--config", str(tiny_config), "--ranks", "8,4", "--seeds", "2", "--steps", "4", "--eval-every", "2",
            "--out", str(out), "--jobs", "2", "--variants", "lam0,lr-matched"]
    res = runner.invoke(compare_app, args)
    assert res.exit_code == 0, res.output
    for name in ("results.csv", "summary.md", "val_loss.png", "memory.png"):
        assert (out / name).stat().st_size > 0, name
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (2 + 2 * 2)  # header + seeds x (exact, lr-matched, 2 ranks x 2 variants)
    header = rows[0].split(",")
    for col in ("method", "rank", "variant", "seed", "steps", "final_val_loss", "final_train_loss",
                "activation_bytes", "weight_cast_bytes", "step_peak_bytes", "act_head", "wall_s", "tokens_per_s"):
        assert col in header
    md = (out / "summary.md").read_text()
    assert "basis R=8 [lam0]" in md and "exact [lr-matched]" in md and "Δ vs exact" in md
    # The lr-matched baseline really scales the sketchable weights' lr by 0.9801.
    cfg = (out / "runs" / "exact_lr-matched-s0" / "config.yaml").read_text()
    assert "lr_scale_sketched: 0.9801" in cfg
    before = json.loads((out / "runs" / "basis_R8-s1" / "summary.json").read_text())
    res = runner.invoke(compare_app, args)
    assert res.exit_code == 0 and res.output.count("skip (finished)") == 12, res.output
    assert json.loads((out / "runs" / "basis_R8-s1" / "summary.json").read_text()) == before


def test_compare_bad_variant(tmp_path):
    res = runner.invoke(compare_app, ["--variants", "sideways", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown variant" in res.output


def test_plan_without_baselines_holds_only_variants(tmp_path):
    labels = {j.label for j in plan({}, [32, 8], [0, 1], ["lam0", "lr-matched"], tmp_path, baselines=False)}
    assert labels == {"exact [lr-matched]", "basis R=32 [lam0]", "basis R=8 [lam0]"}
    with_base = {j.label for j in plan({}, [32], [0], ["lam0"], tmp_path)}
    assert with_base == {"exact", "basis R=32", "basis R=32 [lam0]"}


def test_gpu_slots_spread_runs_over_the_least_busy_gpu():
    slots = GpuSlots([2, 5])
    taken = [slots.take() for _ in range(5)]
    assert taken == [2, 5, 2, 5, 2]
    slots.give(5)
    slots.give(5)
    assert [slots.take() for _ in range(4)] == [5, 5, 5, 2]  # 3 : 0 busy, then ties go to the lower index
    assert GpuSlots(None).take() is None


def test_compare_sets_cuda_visible_devices_per_run(tmp_path, tiny_config, monkeypatch):
    seen = []
    together = threading.Barrier(2, timeout=30)  # two runs in flight at once must get different GPUs

    def fake_call(cmd, stdout, stderr, env):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        together.wait()
        return 1  # a failed run: compare goes on and reports it

    monkeypatch.setattr(compare_mod.subprocess, "call", fake_call)
    res = runner.invoke(compare_app, ["--config", str(tiny_config), "--ranks", "8", "--seeds", "2", "--steps", "2",
                                      "--out", str(tmp_path / "c"), "--jobs", "2", "--gpus", "3,1"])
    assert sorted(seen) == ["1", "1", "3", "3"], res.output
    assert "4 runs failed" in res.output
    res = runner.invoke(compare_app, ["--gpus", "1,x", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--gpus" in res.output


def _summary(label, diff, lo, hi, ratio, n=5):
    return {"label": label, "diff_mean": diff, "diff_ci_low": lo, "diff_ci_high": hi, "diff_n": n,
            "act_ratio": ratio}


def test_verdicts_follow_the_numbers():
    base = [_summary("exact", None, None, None, 1.0)]
    worse = base + [_summary("basis R=32", 0.07, 0.03, 0.11, 0.99), _summary("basis R=16", 0.13, 0.05, 0.2, 0.98),
                    _summary("basis R=8", 0.2, 0.1, 0.3, 0.97)]
    text = " ".join(verdicts(worse, {}))
    assert "NOT supported" in text and "contradicted" in text and "monotone in R" in text
    assert "claimed 2x, measured 1.010x" in text
    better = base + [_summary("basis R=32", -0.06, -0.09, -0.03, 0.5)]
    text = " ".join(verdicts(better, {}))
    assert "supported (R=32 is better" in text and "claimed 2x, measured 2.000x" in text
    unclear = base + [_summary("basis R=32", 0.01, -0.2, 0.22, 0.99)]
    assert "inconclusive" in " ".join(verdicts(unclear, {}))


def test_tiny_reproduce_end_to_end(tmp_path, tiny_config):
    from basis_train.experiments.reproduce import reproduce_app

    out = tmp_path / "repro"
    res = runner.invoke(reproduce_app, ["--config", str(tiny_config), "--seeds", "1", "--steps", "2",
                                        "--protocols", "heldout", "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    md = (out / "heldout" / "summary.md").read_text()
    assert "paper val" in md and "6.575" in md and "## Verdicts" in md
    assert "6 of 6 planned runs finished" in md
    assert len((out / "heldout" / "results.csv").read_text().splitlines()) == 7
