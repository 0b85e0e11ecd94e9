"""Issue 25's grid driver: its plan and priorities, the SGD sweep's second phase, the time budget,
resuming and skipping across calls, the pack for the trip back; a tiny end to end run on CPU."""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from basis_train.experiments import scale_grid as sg
from basis_train.experiments import sgd_sweep as sw
from basis_train.training.config import load_config

TINY = """
model: {block_size: 16, n_embd: 32, n_head: 2, n_layer: 1}
optim: {name: adamw, lr: 1.0e-3, schedule: cosine, warmup_steps: 2, weight_decay: 0.1}
train: {steps: 4, batch_size: 2, eval_every: 2, checkpoint_every: 2, device: cpu}
data: {heldout_min_tokens: 1000, eval_batch_size: 16}
"""


def _finish(grid, name, loss):
    d = grid / "runs" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps({"final_val_loss": loss}))


def test_plan_is_the_issue_grid_in_priority_order(tmp_path):
    base = load_config("gpt2-small-code")
    jobs = sg.plan(tmp_path, base)
    groups = list(dict.fromkeys(j.group for j in jobs))
    assert groups == ["main-s0", "reference", "main-s1", "main-s2", "lr", "sgd-exact", "tf32", "methods", "long-s0",
                      "long-s1", "layers"]
    assert [j.name for j in jobs[:8]] == ["exact-s0", "basis_R1024-s0", "basis_R256-s0", "basis_R1024_all-s0",
                                          "basis_R64-s0", "basis_R4096-s0", "exact_ckpt-s0", "exact_eager-s0"]
    assert jobs[7].overrides == {"train.method": "exact", "train.compile": False, "train.seed": 0}
    assert jobs[8].overrides == {"train.method": "exact", "train.compile": False, "train.cuda_graphs": False,
                                 "train.seed": 0}
    assert len(jobs) == 21 + 2 + 6 + 4 + 2 + 8 + 4 + 3 and len({j.name for j in jobs}) == len(jobs)
    # TF32 on, seed 1: exact's run reruns exact-s1's configuration (how far a rerun drifts), BASIS's tells TF32's effect
    assert {j.name: j.overrides for j in jobs if j.group == "tf32"} == {
        "exact_tf32-s1": {"train.method": "exact", "train.tf32": True, "train.seed": 1},
        "basis_R1024_tf32-s1": {"train.method": "basis", "sketch.rank": 1024, "train.tf32": True, "train.seed": 1}}
    methods = {j.name: j.overrides for j in jobs if j.group == "methods"}
    assert sorted(methods) == sorted(["exact_eager-s1", "exact_eager-s2", *(f"{m}-s{s}" for s in (0, 1, 2)
                                                                            for m in ("exact_int8", "basis_R1024_int8"))])
    assert all(o["train.compile"] is False for o in methods.values())
    assert methods["basis_R1024_int8-s2"] == {"train.method": "basis", "sketch.rank": 1024,
                                              "train.saved_activations": "int8", "train.compile": False,
                                              "train.seed": 2}
    with_ref = sg.plan(tmp_path, base, nanogpt=True)
    assert [(j.name, j.kind) for j in with_ref[7:11]] == [("nanogpt-s0", "nanogpt"), ("exact_eager-s0", "train"),
                                                         ("exact_eager_nographs-s0", "train"),
                                                         ("nanogpt_eager-s0", "nanogpt")]
    assert with_ref[10].overrides == {"train.seed": 0, "train.compile": False}
    # nanoGPT on seeds 1 and 2 too, right after each seed's main grid, on that seed's batches
    later = [(i, j) for i, j in enumerate(with_ref) if j.kind == "nanogpt" and j.name.endswith(("-s1", "-s2"))]
    assert [(j.name, j.overrides) for _, j in later] == [("nanogpt-s1", {"train.seed": 1}), ("nanogpt-s2", {"train.seed": 2})]
    assert [with_ref[i - 1].name for i, _ in later] == ["exact_ckpt-s1", "exact_ckpt-s2"]
    assert not any(j.kind == "nanogpt" for j in jobs)
    lr = {j.name: j.overrides["optim.lr_factor"] for j in jobs if j.group == "lr"}
    assert lr == {"exact_lr0.25x-s0": 0.25, "basis_R1024_lr0.25x-s0": 0.25, "exact_lr0.5x-s0": 0.5,
                  "basis_R1024_lr0.5x-s0": 0.5, "exact_lr2x-s0": 2.0, "basis_R1024_lr2x-s0": 2.0}
    long = next(j for j in jobs if j.name == "basis_R1024_8000-s0").overrides
    assert long["train.steps"] == 8000 and long["optim.warmup_steps"] == 4 * base.optim.warmup_steps
    assert long["train.eval_every"] == 1000 and base.train.eval_every == 250
    assert long["sketch.rank"] == 1024 and long["train.method"] == "basis"
    # the MLPs alone, paired with mlp+head R = 1024 of the same seeds: what the head's sketch costs
    assert {j.name: j.overrides for j in jobs if j.group == "layers"} == {
        f"basis_R1024_mlp-s{s}": {"train.method": "basis", "sketch.rank": 1024, "sketch.layers": "mlp",
                                  "train.seed": s} for s in (0, 1, 2)}
    sgd = [j.overrides for j in jobs if j.group == "sgd-exact"]
    assert [o["optim.lr"] for o in sgd] == [0.03, 0.1, 0.3, 1.0]
    assert all(o["optim.name"] == "sgd" and o["optim.momentum"] == 0.9 for o in sgd)


def test_sgd_basis_waits_for_the_sweep_then_takes_the_best_and_its_neighbours(tmp_path):
    for lr, loss in ((0.03, 5.0), (0.1, 4.5), (0.3, 4.7)):
        _finish(tmp_path, f"exact_sgd{lr:g}-s0", loss)
    assert sw.sgd_basis_lrs(tmp_path) == []  # lr 1 not finished
    _finish(tmp_path, "exact_sgd1-s0", 6.0)
    assert sw.sgd_basis_lrs(tmp_path) == [0.03, 0.1, 0.3]
    names = [j.name for j in sg.plan(tmp_path, load_config("gpt2-small-code")) if j.group == "sgd-basis"]
    assert names == ["basis_R1024_sgd0.03-s0", "basis_R1024_sgd0.1-s0", "basis_R1024_sgd0.3-s0"]


def test_a_best_lr_at_the_end_of_the_sweep_extends_it(tmp_path):
    for lr, loss in ((0.03, 5.0), (0.1, 4.8), (0.3, 4.6), (1.0, 4.4)):
        _finish(tmp_path, f"exact_sgd{lr:g}-s0", loss)
    lrs, _ = sw.sgd_sweep(tmp_path)
    assert lrs == [0.03, 0.1, 0.3, 1.0, 3.0] and sw.sgd_basis_lrs(tmp_path) == []
    _finish(tmp_path, "exact_sgd3-s0", 4.5)
    assert sw.sgd_basis_lrs(tmp_path) == [0.3, 1.0, 3.0]


def test_the_lr_ladder():
    assert [sw.ladder_step(x, up=True) for x in (0.03, 0.1, 0.3, 1.0, 3.0)] == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert [sw.ladder_step(x, up=False) for x in (0.03, 0.1, 0.3, 1.0)] == [0.01, 0.03, 0.1, 0.3]


def test_the_extension_stops_after_two(tmp_path):
    for lr, loss in ((0.03, 5.0), (0.1, 4.8), (0.3, 4.6), (1.0, 4.4), (3.0, 4.3), (10.0, 4.2)):
        _finish(tmp_path, f"exact_sgd{lr:g}-s0", loss)
    assert sw.sgd_sweep(tmp_path)[0] == [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    assert sw.sgd_basis_lrs(tmp_path) == [3.0, 10.0]


def _driver(tmp_path, corpus, *args, budget=600, env=None):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    cmd = [sys.executable, "-m", "basis_train.experiments.scale_grid", "--grid", str(tmp_path / "grid"),
           "--config", str(config), "--data-files", str(corpus), "--startup-s", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TIME_BUDGET": str(budget), **(env or {})})


def test_nothing_starts_that_the_budget_cannot_finish(tmp_path, small_corpus):
    proc = _driver(tmp_path, small_corpus, "--only", "main-s0", "--default-s-per-step", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "start " not in proc.stdout and "finished 0 of 7 planned runs" in proc.stdout


def _grid(tmp_path, budget, s_per_step):
    args = argparse.Namespace(grid=tmp_path / "grid", config="gpt2-small-code", overrides={}, budget=budget,
                              default_s_per_step=s_per_step, startup_s=5.0, gpus="", call_s=600.0)
    return sg.Grid(args)


def test_a_run_that_a_full_call_could_finish_waits_for_one(tmp_path):
    """At the end of a short call a 2,000-step run was started, stopped at the deadline with its
    checkpoint, and lost with the machine: a run is started partway only if no call could finish it."""
    grid = _grid(tmp_path, budget=125, s_per_step=0.04)  # 80 s usable; the run: 5 + 2000 x 0.04 = 85 s
    job = sg.Job("basis_R64-s2", "main-s2", {"train.method": "basis", "sketch.rank": 64, "train.seed": 2})
    cfg = grid.cfg(job)
    left = grid.deadline - time.monotonic()
    assert left <= 80
    assert not grid.fits(job, cfg, 2000, left)
    assert grid.fits(job, cfg, 2000, left=85.0)
    assert not grid.fits(job, cfg, 8000, left=300.0)  # 325 s: a full call (555 s) finishes it
    assert grid.fits(job, cfg, 8000, left=330.0)
    slow = _grid(tmp_path, budget=125, s_per_step=0.1)  # 8,000 steps: 805 s, more than any call
    # started partway only with time to reach its checkpoint at step 500: 5 + 500 x 0.1 = 55 s, x 1.2 margin
    assert not slow.fits(job, cfg, 8000, left=65.0)
    assert slow.fits(job, cfg, 8000, left=66.1)


def test_a_gpu_named_twice_runs_two_at_once_and_they_say_so(tmp_path, small_corpus):
    # Two runs sharing a GPU are slower than alone: summary.json records it, and the scale report leaves
    # their speed out. (The tiny config trains on the CPU; the GPU's name only travels in the environment.)
    proc = _driver(tmp_path, small_corpus, "--only", "exact-s0,basis_R256-s0", "--gpus", "7,7")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    starts = [i for i, ln in enumerate(lines) if "] start " in ln and "GPU 7" in ln]
    first_done = next(i for i, ln in enumerate(lines) if "] done: " in ln)
    assert len(starts) == 2 and max(starts) < first_done, proc.stdout  # both started before either ended
    runs = [json.loads((tmp_path / "grid" / "runs" / n / "summary.json").read_text()) for n in ("exact-s0", "basis_R256-s0")]
    assert [r["runs_per_gpu"] for r in runs] == [2, 2]


def test_only_takes_run_names_and_groups(tmp_path, small_corpus):
    proc = _driver(tmp_path, small_corpus, "--only", "basis_R256-s1,exact-s1,reference", "--default-s-per-step", "1000")
    assert proc.returncode == 0, proc.stderr
    # The grid's order, not the list's; the reference group without --nanogpt has its two eager runs.
    assert "finished 0 of 4 planned runs" in proc.stdout
    assert "still to run: exact_eager-s0, exact_eager_nographs-s0, exact-s1, basis_R256-s1" in proc.stdout


def test_only_refuses_a_name_the_grid_does_not_hold(tmp_path, small_corpus):
    # a misspelt run selects nothing: the call would end "finished 0 of 0" having spent its GPU time
    proc = _driver(tmp_path, small_corpus, "--only", "exact-s1,exact-s9,nanogpt-s1", "--default-s-per-step", "1000")
    assert proc.returncode == 2 and "start " not in proc.stdout
    assert "no run or group of this grid: exact-s9, nanogpt-s1 (nanoGPT's runs need --nanogpt)" in proc.stderr
    # the SGD BASIS runs, group or name, are known before exact's sweep has placed them
    proc = _driver(tmp_path, small_corpus, "--only", "sgd-basis,basis_R1024_sgd0.1-s0", "--default-s-per-step", "1000")
    assert proc.returncode == 0, proc.stderr


def test_end_to_end_resumes_skips_and_packs(tmp_path, small_corpus):
    grid = tmp_path / "grid"
    # An interrupted run: killed after its step-2 checkpoint.
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    base = sg.apply_overrides(load_config(config), {"data.data_files": str(small_corpus)})
    job = sg.plan(grid, base)[0]
    run = grid / "runs" / job.name
    cfg = sg.apply_overrides(base, {**job.overrides, "log.out": str(run)})
    run.mkdir(parents=True)
    sg.dump_config(cfg, run / "requested.yaml")
    subprocess.run([sys.executable, "-m", "basis_train.experiments.scale_grid", "--child",
                    str(run / "requested.yaml"), str(run)], env={**os.environ, "BASIS_TRAIN_DIE_AT_STEP": "3"},
                   capture_output=True, timeout=300)
    assert (run / "checkpoint.pt").is_file() and not (run / "summary.json").exists()

    proc = _driver(tmp_path, small_corpus, "--only", "main-s0", "--pack", str(tmp_path / "p.tgz"),
                   "--report", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    assert "start exact-s0 (main-s0, resume, 2 steps" in proc.stdout
    assert "finished 7 of 7 planned runs" in proc.stdout
    summaries = [json.loads(p.read_text()) for p in grid.glob("runs/*/summary.json")]
    assert len(summaries) == 7 and {s["data_order"] for s in summaries} == {"shuffled"}
    assert not list(grid.glob("runs/*/checkpoint.pt"))
    assert (tmp_path / "report" / "summary.md").is_file()
    with tarfile.open(tmp_path / "p.tgz") as tar:
        names = tar.getnames()
    assert "runs/basis_R4096-s0/summary.json" in names and not [n for n in names if n.endswith(".pt")]

    again = _driver(tmp_path, small_corpus, "--only", "main-s0")
    assert "start " not in again.stdout and "finished 7 of 7" in again.stdout
    # A fresh machine: the packed runs seed an empty grid, and nothing is run twice.
    (tmp_path / "unpacked").mkdir()
    with tarfile.open(tmp_path / "p.tgz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    fresh = [sys.executable, "-m", "basis_train.experiments.scale_grid", "--grid", str(tmp_path / "fresh"),
             "--config", str(config), "--data-files", str(small_corpus), "--only", "main-s0",
             "--seed-from", str(tmp_path / "unpacked")]
    out = subprocess.run(fresh, capture_output=True, text=True, timeout=300).stdout
    assert "copied 7 finished runs" in out and "start " not in out


@pytest.mark.parametrize("value", ["1.0e-3", "true", "[0.9, 0.99]"])
def test_set_reads_yaml_values(value):
    import yaml

    assert sg._overrides([f"optim.lr={value}"]) == {"optim.lr": yaml.safe_load(value)}


def test_a_diverged_run_is_a_result_not_a_run_to_retry(tmp_path, small_corpus):
    """Exact SGD at too high an lr stops on a non-finite loss: diverged.json, the worst loss of the
    sweep, skipped by later calls, packed and named in the report."""
    from basis_train.experiments.grid_state import diverged, final_loss, pack, settled_dirs

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    grid = tmp_path / "grid"
    base = sg.apply_overrides(load_config(config), {"data.data_files": str(small_corpus)})
    job = next(j for j in sg.plan(grid, base) if j.name == "exact_sgd1-s0")
    run = grid / "runs" / job.name
    cfg = sg.apply_overrides(base, {**job.overrides, "optim.lr": 1e6, "log.out": str(run)})
    run.mkdir(parents=True)
    sg.dump_config(cfg, run / "requested.yaml")
    assert sg.child(run / "requested.yaml", run, resume=False) == 3
    assert diverged(run, cfg) and not diverged(run, base) and final_loss(run) == float("inf")
    for lr, loss in ((0.03, 5.0), (0.1, 4.5), (0.3, 4.7)):
        _finish(grid, f"exact_sgd{lr:g}-s0", loss)
    assert sw.sgd_basis_lrs(grid) == [0.03, 0.1, 0.3]
    assert run in settled_dirs(grid / "runs")
    pack(grid, tmp_path / "p.tgz")
    with tarfile.open(tmp_path / "p.tgz") as tar:
        assert "runs/exact_sgd1-s0/diverged.json" in tar.getnames()


def test_a_compiled_nanogpt_run_is_not_taken_for_the_eager_one(tmp_path):
    base = load_config("gpt2-small-code")
    jobs = {j.name: j for j in sg.plan(tmp_path, base, nanogpt=True)}
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"seed": 0, "steps": base.train.steps, "compile": True}))
    for name, done in (("nanogpt-s0", True), ("nanogpt_eager-s0", False)):
        cfg = sg.apply_overrides(base, jobs[name].overrides)
        assert sg.Grid.done(jobs[name], run, cfg) is done
