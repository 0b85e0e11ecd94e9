"""basis-compare / basis-reproduce end to end on a tiny grid, and the verdict logic."""

import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from basis_train.cli.compare import compare_app
from basis_train.experiments import compare as compare_mod
from basis_train.experiments.compare import GpuSlots, plan
from basis_train.experiments.reproduce import verdicts
from basis_train.training.config import config_hash, load_config

runner = CliRunner()


@pytest.mark.slow
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
    seen, shares = [], []
    together = threading.Barrier(2, timeout=30)  # two runs in flight at once must get different GPUs

    def fake_call(cmd, stdout, stderr, env):
        seen.append(env["CUDA_VISIBLE_DEVICES"])
        shares.append(env["BASIS_TRAIN_RUNS_PER_GPU"])
        together.wait()
        return 1  # a failed run: compare goes on and reports it

    monkeypatch.setattr(compare_mod.subprocess, "call", fake_call)
    res = runner.invoke(compare_app, ["--config", str(tiny_config), "--ranks", "8", "--seeds", "2", "--steps", "2",
                                      "--out", str(tmp_path / "c"), "--jobs", "2", "--gpus", "3,1"])
    assert sorted(seen) == ["1", "1", "3", "3"], res.output
    assert shares == ["1"] * 4  # 2 jobs over 2 GPUs: no run shared its GPU
    shares.clear()
    together = threading.Barrier(2, timeout=30)
    runner.invoke(compare_app, ["--config", str(tiny_config), "--ranks", "8", "--seeds", "2", "--steps", "2",
                                "--out", str(tmp_path / "e"), "--jobs", "2", "--gpus", "4"])
    assert shares == ["2"] * 4  # 2 jobs on one GPU
    assert res.exit_code == 1 and "none of the 4 planned runs" in res.output
    res = runner.invoke(compare_app, ["--gpus", "1,x", "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "--gpus" in res.output


def _fake_run(out, method, rank, seed=0, evals=(10.0, 9.0)):
    """A finished run directory as basis-train leaves it (the files the report reads)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"method": method, "rank": rank, "variant": "", "seed": seed, "steps": 2 * len(evals),
               "final_val_loss": evals[-1], "final_train_loss": evals[-1], "peak_activation_bytes": 1000,
               "cuda_peak_step_bytes": None, "wall_s": 1.0, "tokens_per_s": 1.0, "val_protocol": "heldout"}
    if (out / "requested.yaml").exists():  # as basis-train does: the summary names the config it ran
        summary["config_hash"] = config_hash(load_config(out / "requested.yaml"))
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": 2 * (i + 1), "val_loss": v}) + "\n"
                                               for i, v in enumerate(evals)))


def test_grid_with_a_failed_run_exits_1_and_names_it(tmp_path, tiny_config, monkeypatch):
    calls = {}

    def fake_call(cmd, stdout, stderr, env):
        run_dir = Path(cmd[cmd.index("--config") + 1]).parent
        calls[run_dir.name] = cmd[-1]
        (run_dir / "checkpoint.pt").write_bytes(b"ckpt")
        if run_dir.name.startswith("basis_R4"):
            return 2  # fails after its first checkpoint: an unfinished run
        _fake_run(run_dir, "exact" if run_dir.name.startswith("exact") else "basis",
                  None if run_dir.name.startswith("exact") else 8)
        return 0

    monkeypatch.setattr(compare_mod.subprocess, "call", fake_call)
    out = tmp_path / "g"
    (out / "runs" / "exact-s0").mkdir(parents=True)
    (out / "runs" / "exact-s0" / "checkpoint.pt").write_bytes(b"old")  # interrupted earlier: resumed
    args = ["--config", str(tiny_config), "--ranks", "8,4", "--seeds", "1", "--out", str(out), "--quiet"]
    res = runner.invoke(compare_app, args)
    assert res.exit_code == 1, res.output
    assert calls == {"exact-s0": "--resume", "basis_R8-s0": "--overwrite", "basis_R4-s0": "--overwrite"}
    assert "1 of 3 runs failed or are unfinished" in res.output and "basis R=4 seed 0" in res.output
    assert "basis R=4 seed 0" in (out / "summary.md").read_text()
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 2
    # Finished runs drop their checkpoint, the unfinished one keeps it to resume from.
    assert not (out / "runs" / "exact-s0" / "checkpoint.pt").exists()
    assert (out / "runs" / "basis_R4-s0" / "checkpoint.pt").exists()
    res = runner.invoke(compare_app, [*args, "--keep-checkpoints"])
    assert calls["basis_R4-s0"] == "--resume" and res.exit_code == 1


def test_keep_checkpoints_keeps_them_and_one_bar_counts_the_runs(tmp_path, tiny_config, monkeypatch):
    def fake_call(cmd, stdout, stderr, env):
        run_dir = Path(cmd[cmd.index("--config") + 1]).parent
        (run_dir / "checkpoint.pt").write_bytes(b"ckpt")
        _fake_run(run_dir, "exact" if run_dir.name.startswith("exact") else "basis",
                  None if run_dir.name.startswith("exact") else 8)
        return 0

    monkeypatch.setattr(compare_mod.subprocess, "call", fake_call)
    out = tmp_path / "k"
    res = runner.invoke(compare_app, ["--config", str(tiny_config), "--ranks", "8", "--seeds", "1", "--out", str(out),
                                      "--keep-checkpoints"])
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("runs/*/checkpoint.pt"))) == 2
    assert "grid: 100%" in res.output and "2/2" in res.output  # one bar over the grid: runs done of runs to do


def test_report_orders_configurations_by_rank_not_as_strings(tmp_path):
    for rank in (1, 16, 32, 64, 8, None):
        _fake_run(tmp_path / "runs" / f"r{rank}", "exact" if rank is None else "basis", rank)
    _, by_label = compare_mod.report(tmp_path, "t")
    assert list(by_label) == ["exact", "basis R=64", "basis R=32", "basis R=16", "basis R=8", "basis R=1"]


def test_r1_verdict_is_never_dropped_silently(tmp_path):
    _fake_run(tmp_path / "r1", "basis", 1, evals=(9.0,))
    base = [_summary("exact", None, None, None, 1.0)]
    assert "R=1 converges smoothly**: not tested at this length" in " ".join(verdicts(base, {"basis R=1": [tmp_path / "r1"]}))
    assert "not tested at this length (no R=1 run finished)" in " ".join(verdicts(base, {}))


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


@pytest.mark.slow
def test_tiny_reproduce_end_to_end(tmp_path, tiny_config):
    from basis_train.cli.reproduce import reproduce_app

    out = tmp_path / "repro"
    # 4 x 16 = 64 rows a step: no rank of the grid (64 down to 1) is clamped to the rows
    config = tmp_path / "tiny64.yaml"
    config.write_text(tiny_config.read_text().replace("train: {", "train: {batch_size: 4, "))
    res = runner.invoke(reproduce_app, ["--config", str(config), "--seeds", "1", "--steps", "2",
                                        "--protocols", "heldout", "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    md = (out / "heldout" / "summary.md").read_text()
    assert "paper val" in md and "6.575" in md and "## Verdicts" in md
    assert "6 of 6 planned runs finished" in md
    assert len((out / "heldout" / "results.csv").read_text().splitlines()) == 7


def test_a_finished_run_of_another_config_is_never_overwritten(tmp_path, tiny_config, monkeypatch):
    calls = []
    monkeypatch.setattr(compare_mod.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    out = tmp_path / "g"
    done = out / "runs" / "exact-s0"
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"config_hash": "made-with-another-config"}))
    (done / "metrics.jsonl").write_text('{"step": 2000}\n')
    res = runner.invoke(compare_app, ["--config", str(tiny_config), "--ranks", "8", "--seeds", "1",
                                      "--out", str(out), "--quiet"])
    assert res.exit_code == 2, res.output
    assert "another config" in res.output and "exact seed 0" in res.output
    assert calls == []  # refused before any run started
    assert json.loads((done / "summary.json").read_text()) == {"config_hash": "made-with-another-config"}
    assert (done / "metrics.jsonl").read_text() == '{"step": 2000}\n'
    # With a checkpoint it is an extension (--resume keeps its files), not a loss: allowed.
    (done / "checkpoint.pt").write_bytes(b"ckpt")
    res = runner.invoke(compare_app, ["--config", str(tiny_config), "--ranks", "8", "--seeds", "1",
                                      "--out", str(out), "--quiet"])
    assert any(c[-1] == "--resume" and "exact-s0" in c[c.index("--config") + 1] for c in calls), calls


def test_reproduce_trains_fleets_by_default_on_cuda_only(tmp_path, tiny_config, monkeypatch):
    import torch

    from basis_train.cli import reproduce as reproduce_cli
    from basis_train.experiments import reproduce as reproduce_mod

    seen = []
    monkeypatch.setattr(reproduce_mod, "run_jobs", lambda *a, fleet, **kw: seen.append(fleet) or [])
    monkeypatch.setattr(reproduce_mod, "write_reproduction", lambda *a: ([], []))
    auto = tmp_path / "auto.yaml"  # the tiny config pins the CPU; here the machine decides
    auto.write_text(tiny_config.read_text().replace("device: cpu", "device: auto"))
    args = ["--config", str(auto), "--seeds", "1", "--steps", "2", "--protocols", "heldout"]
    for cuda, extra, expected in ((False, [], False), (True, [], True), (True, ["--no-fleet"], False),
                                  (False, ["--fleet"], True)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        res = runner.invoke(reproduce_cli.reproduce_app, [*args, "--out", str(tmp_path / "r"), *extra])
        assert res.exit_code == 0, res.output
        assert seen.pop() is expected, (cuda, extra)
