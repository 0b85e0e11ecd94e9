"""basis-train end to end on CPU: outputs, pairing, resume after a kill, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from basis_train.cli.train import train_app

runner = CliRunner()
TIMING = {"tokens_per_s", "ms_per_step", "eval_s", "wall_s", "train_s"}


def train(*args):
    return runner.invoke(train_app, ["--quiet", *map(str, args)])


def read(out):
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), metrics


def drop_timing(d):
    return {k: v for k, v in d.items() if k not in TIMING}


def test_outputs_and_keys(tmp_path, tiny_config):
    out = tmp_path / "run"
    res = train("--config", tiny_config, "--out", out)
    assert res.exit_code == 0, res.output
    summary, metrics = read(out)
    for key in ("method", "rank", "seed", "steps", "final_val_loss", "final_train_loss",
                "activation_bytes", "weight_cast_bytes", "activation_breakdown", "step_peak_bytes",
                "wall_s", "tokens_per_s", "val_protocol"):
        assert key in summary
    assert summary["method"] == "basis" and summary["rank"] == 4 and summary["steps"] == 12
    assert [m["step"] for m in metrics] == [4, 8, 12]
    for m in metrics:
        assert {"step", "train_loss", "val_loss", "tokens_per_s"} <= m.keys()
    assert summary["final_val_loss"] == metrics[-1]["val_loss"]
    assert (out / "checkpoint.pt").exists()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["sketch"]["rank"] == 4 and cfg["train"]["steps"] == 12
    assert summary["data"]["protocol"] == "heldout" and summary["data"]["n_val_tokens"] >= 1000


def test_exact_is_paired_and_saves_more(tmp_path, tiny_config):
    res = train("--config", tiny_config, "--out", tmp_path / "e", "--method", "exact", "--steps", 2, "--eval-every", 1)
    assert res.exit_code == 0, res.output
    res = train("--config", tiny_config, "--out", tmp_path / "b", "--steps", 2, "--eval-every", 1, "--rank", 8)
    assert res.exit_code == 0, res.output
    (exact, e_metrics), (basis, b_metrics) = read(tmp_path / "e"), read(tmp_path / "b")
    assert exact["method"] == "exact" and exact["rank"] is None
    assert basis["activation_bytes"] < exact["activation_bytes"]
    # Same seed: same initial weights and first batch, so the loss of step 1 (before any
    # update) is identical; step 2 follows a sketched (R = 8 < 16 rows) update and is not.
    assert e_metrics[0]["train_loss"] == b_metrics[0]["train_loss"]
    assert e_metrics[1]["train_loss"] != b_metrics[1]["train_loss"]


def test_evaluating_changes_no_training(tmp_path, tiny_config):
    """The 8,000-step grid runs evaluate every 1,000 steps instead of every 250: that must change
    nothing but which losses get logged (BASIS, so the sketch's random stream is in play too)."""
    for every in (1, 6):
        res = train("--config", tiny_config, "--out", tmp_path / f"e{every}", "--steps", 6, "--eval-every", every)
        assert res.exit_code == 0, res.output
    (often, m_often), (once, m_once) = read(tmp_path / "e1"), read(tmp_path / "e6")
    assert [m["step"] for m in m_often] == [1, 2, 3, 4, 5, 6] and [m["step"] for m in m_once] == [6]
    assert often["final_val_loss"] == once["final_val_loss"]
    weights = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("e1", "e6")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_checkpoints_between_evaluations_are_off_the_clock(tmp_path, tiny_config, slow_checkpoint_saves):
    """The run's loop pauses its clock (tests/training/test_throughput.py) while it writes a checkpoint
    that no evaluation follows."""
    slow_checkpoint_saves(1.0)
    res = train("--config", tiny_config, "--out", tmp_path / "ck", "--steps", 4, "--eval-every", 4, "--checkpoint-every", 1)
    assert res.exit_code == 0, res.output
    summary, _ = read(tmp_path / "ck")
    # 3 s of checkpoints fall inside the one interval (steps 1-3); 4 steps of the tiny model take far less
    assert summary["train_s"] < 1.5, summary["train_s"]
    assert summary["wall_s"] > 3.0


def test_says_what_it_is_doing(tmp_path, tiny_config):
    out = tmp_path / "talk"
    res = runner.invoke(train_app, ["--config", str(tiny_config), "--out", str(out), "--steps", "4"])
    assert res.exit_code == 0, res.output
    text = res.output
    for needle in ("parameters", "cpu float32", "validation documents", "tokens (heldout protocol)",
                   f"output: {out}/", f"wrote {out}/", "summary.json", "checkpoint.pt", "metrics.jsonl"):
        assert needle in text, (needle, text)


def test_paper_val_protocol(tmp_path, tiny_config):
    res = train("--config", tiny_config, "--out", tmp_path / "p", "--val-protocol", "paper")
    assert res.exit_code == 0, res.output
    summary, metrics = read(tmp_path / "p")
    assert summary["val_protocol"] == "paper" and "val_restarts" in metrics[-1]


def _cli(*args, env=None):
    return [sys.executable, "-m", "basis_train.cli", "--quiet", *map(str, args)]


def _reference(tmp_path, tiny_config):
    ref = tmp_path / "ref"
    assert train("--config", tiny_config, "--out", ref).exit_code == 0
    return read(ref)


def _assert_same_run(a, b):
    (sa, ma), (sb, mb) = a, b
    assert drop_timing(sa) == drop_timing(sb)
    assert [drop_timing(m) for m in ma] == [drop_timing(m) for m in mb]


def test_resume_after_kill_between_checkpoints(tmp_path, tiny_config):
    out = tmp_path / "killed"
    env = dict(os.environ, BASIS_TRAIN_DIE_AT_STEP="7")  # dies like kill -9, after the step-5 checkpoint
    proc = subprocess.run(_cli("--config", tiny_config, "--out", out), env=env, capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 5
    res = train("--config", tiny_config, "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    resumed = read(out)
    _assert_same_run(resumed, _reference(tmp_path, tiny_config))
    ref_state = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]
    for k, v in torch.load(out / "checkpoint.pt", weights_only=False)["model"].items():
        assert torch.equal(v, ref_state[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_real_signal_then_resume(tmp_path, tiny_config, sig):
    out = tmp_path / "sig"
    proc = subprocess.Popen(_cli("--config", tiny_config, "--out", out, "--steps", 150, "--eval-every", 50,
                                 "--checkpoint-every", 10), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert "checkpoint saved" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    step = torch.load(out / "checkpoint.pt", weights_only=False)["step"]
    assert 0 < step < 150
    res = train("--config", tiny_config, "--out", out, "--steps", 150, "--eval-every", 50,
                "--checkpoint-every", 10, "--resume")
    assert res.exit_code == 0, res.output
    ref = tmp_path / "ref150"
    assert train("--config", tiny_config, "--out", ref, "--steps", 150, "--eval-every", 50,
                 "--checkpoint-every", 10).exit_code == 0
    _assert_same_run(read(out), read(ref))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_config):
    out = tmp_path / "nan"
    res = train("--config", tiny_config, "--out", out, "--lr", 1e6, "--checkpoint-every", 1, "--steps", 40)
    assert res.exit_code == 3, res.output
    assert "non-finite" in res.output and "last good checkpoint" in res.output
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] < 40
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_loss_says_when_no_checkpoint_was_kept(tmp_path, tiny_config):
    out = tmp_path / "nan0"
    res = train("--config", tiny_config, "--out", out, "--lr", 1e6, "--checkpoint-every", 1000, "--steps", 40)
    assert res.exit_code == 3, res.output
    assert "no checkpoint had been written" in res.output and "last good checkpoint" not in res.output
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "rank"),
    (["--steps", "0"], "steps"),
    (["--eval-every", "-1"], "eval_every"),
    (["--config", "/does/not/exist.yaml"], "not found"),
    (["--data-files", "/no/such/*.txt"], "no files"),
    (["--method", "sideways"], "sideways"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, needle):
    res = train("--out", tmp_path / "x", "--device", "cpu", *args)
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_bad_files_and_yaml(tmp_path, tiny_config):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf8 \xc3")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("train: {steps: [1,\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train: {stpes: 3}\n")
    for args in (["--data-files", empty], ["--data-files", bad], ["--config", broken_yaml], ["--config", unknown]):
        res = train("--out", tmp_path / "y", "--device", "cpu", *args)
        assert res.exit_code == 2, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
        assert not (tmp_path / "y").exists(), args  # a failed start leaves no half-made run behind
    assert "did you mean 'steps'" in res.output


def test_existing_run_is_never_silently_replaced(tmp_path, tiny_config):
    out = tmp_path / "o"
    assert train("--config", tiny_config, "--out", out, "--steps", 2).exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    res = train("--config", tiny_config, "--out", out, "--steps", 2)
    assert res.exit_code == 2 and "--resume" in res.output and "--overwrite" in res.output
    assert (out / "metrics.jsonl").read_text() == before
    res = train("--config", tiny_config, "--out", out, "--steps", 4, "--lr", 0.02, "--resume")
    assert res.exit_code == 2 and "different config" in res.output
    res = train("--config", tiny_config, "--out", out, "--steps", 3, "--overwrite")
    assert res.exit_code == 0, res.output
    assert read(out)[0]["steps"] == 3


def test_resume_raises_the_steps_of_a_finished_run(tmp_path, tiny_config):
    out = tmp_path / "grow"
    assert train("--config", tiny_config, "--out", out, "--steps", 8).exit_code == 0
    res = train("--config", tiny_config, "--out", out, "--steps", 12, "--resume")
    assert res.exit_code == 0, res.output
    summary, metrics = read(out)
    assert summary["steps"] == 12 and [m["step"] for m in metrics] == [4, 8, 12]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 12
    # Identical to a run that was asked for 12 steps from the start (its step-8 eval falls on eval_every).
    ref = tmp_path / "ref12"
    assert train("--config", tiny_config, "--out", ref, "--steps", 12).exit_code == 0
    _assert_same_run((summary, metrics), read(ref))
    res = train("--config", tiny_config, "--out", out, "--steps", 10, "--resume")
    assert res.exit_code == 2 and "may only be raised" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(tmp_path, tiny_config):
    res = train("--config", tiny_config, "--out", tmp_path / "c", "--device", "cuda")
    assert res.exit_code == 2 and "no CUDA GPU" in res.output


def test_wandb_offline_run(tmp_path, tiny_config, monkeypatch):
    wandb = pytest.importorskip("wandb")
    import warnings

    said = []  # wandb tells deprecations (e.g. a boolean `reinit`) through termwarn, which WANDB_SILENT hides
    monkeypatch.setattr(wandb, "termwarn", lambda msg, *a, **k: said.append(msg))
    out = tmp_path / "w"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = train("--config", tiny_config, "--out", out, "--steps", 4, "--wandb", "offline")
    assert res.exit_code == 0, res.output
    runs = list(out.glob("wandb/offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    assert not [m for m in said if "deprecat" in m.lower()], said
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


def _run(tmp_path, tiny_config, **overrides):
    from basis_train.training.config import apply_overrides, load_config
    from basis_train.training.train import Run

    cfg = apply_overrides(load_config(tiny_config), overrides)
    return Run(cfg, tmp_path / "direct", progress=False)


def test_float16_inf_gradient_skips_the_step_and_lowers_the_scale(tmp_path, tiny_config):
    run = _run(tmp_path, tiny_config, **{"train.dtype": "float16"})
    step, params = run.train_step, list(run.model.parameters())
    step(run.loader.next_indices())  # the first step also initialises the scale and momentum
    scale = step.scaler.get_scale()
    before = [p.detach().clone() for p in params]
    momenta = [run.train_step.opt.state[p]["momentum_buffer"].clone() for p in params]
    hook = run.model.lm_head.weight.register_hook(lambda g: g * float("inf"))
    step(run.loader.next_indices())
    hook.remove()
    assert step.scaler.get_scale() == scale / 2
    for p, b, m in zip(params, before, momenta):  # no parameter moved, not even the finite ones
        assert torch.equal(p, b) and torch.equal(run.train_step.opt.state[p]["momentum_buffer"], m)
    step(run.loader.next_indices())
    assert step.scaler.get_scale() == scale / 2
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before[0])
    run.step = 3
    run.save()  # the lowered scale survives a resume
    run.close()  # a Run holds its --out until it ends
    from basis_train.training.train import Run

    resumed = Run(run.cfg, run.out, resume=True, progress=False)
    assert resumed.train_step.scaler.get_scale() == scale / 2


def test_rank_above_the_rows_of_a_step_warns_and_records_the_rank_that_ran(tmp_path, tiny_config, capsys):
    from basis_train.training.config import apply_overrides, load_config
    from basis_train.training.train import train as train_run

    cfg = apply_overrides(load_config(str(tiny_config)), {"sketch.rank": 100, "train.steps": 1, "train.eval_every": 1})
    summary = train_run(cfg, tmp_path / "r", progress=False)
    err = capsys.readouterr().err
    # batch_size 1 x block_size 16 rows: the sketch cannot have more bins than that
    assert summary["rank"] == 16 and summary["rank_requested"] == 100
    assert "warning: sketch.rank 100 >= the 16 rows of a step" in err and "BASIS saves nothing" in err, err


def test_the_ddp_wrapper_is_gone_when_the_process_group_closes(tmp_path, tiny_config, monkeypatch):
    # DDP's reducer holds the process group: alive when the group is destroyed, it is freed later
    # (at exit), where gloo's teardown can abort the process. Every reference must be dropped first.
    import gc
    import weakref

    from basis_train.training import distributed
    from basis_train.training import train as train_mod
    from basis_train.training.config import load_config

    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, model):
            super().__init__()
            self.module = model

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    refs, alive_at_close = [], []

    def wrap(self, model):
        w = Wrapper(model)
        refs.append(weakref.ref(w))
        return w

    def close(self):
        gc.collect()
        alive_at_close.append([r() is not None for r in refs])

    monkeypatch.setattr(distributed.Dist, "wrap", wrap)
    monkeypatch.setattr(distributed.Dist, "close", close)
    train_mod.train(load_config(tiny_config), tmp_path / "out", progress=False)
    assert alive_at_close == [[False]]


def test_closing_collects_cycles_before_destroying_the_group(monkeypatch):
    """DDP is freed only by the cycle collector: Dist.close must run it before the group goes."""
    import gc
    import weakref

    from basis_train.training import distributed

    class Holder:
        pass

    seen = []
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: True)
    gc.disable()  # no collection but close's own between here and the check
    try:
        h = Holder()
        h.me = h  # a cycle, as DDP's hooks make one: dropping the name does not free it
        ref = weakref.ref(h)
        del h
        monkeypatch.setattr(distributed.tdist, "destroy_process_group", lambda: seen.append(ref() is None))
        distributed.Dist(world_size=2, owns_group=True).close()
    finally:
        gc.enable()
    assert seen == [True]
