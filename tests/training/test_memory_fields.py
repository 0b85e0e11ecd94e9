"""summary.json's memory fields: measured on the right step, old fields gone, --head."""

import json

from typer.testing import CliRunner

from basis_train.cli.train import train_app
from basis_train.core.memory import CATEGORIES
from basis_train.training.config import load_config
from basis_train.training.train import Run

runner = CliRunner()


def test_step_peak_is_taken_after_warmup(tmp_path, tiny_config):
    run = Run(load_config(tiny_config), tmp_path / "run", progress=False)
    seen = []

    def fake_peak(step, device):
        # what a steady-state step has: optimizer state already there, earlier steps done
        seen.append((run.step, sum(len(s) for s in run.train_step.opt.state.values())))
        step()
        return 12345

    run.train_step.step_peak = fake_peak
    summary = run.run()
    assert len(seen) == 1
    at_step, opt_state = seen[0]
    assert at_step >= 2 and opt_state > 0
    assert summary["step_peak_bytes"] == 12345


def test_summary_memory_fields(tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("BASIS_TRAIN_RUNS_PER_GPU", "3")  # as basis-compare sets it for runs sharing a GPU
    res = runner.invoke(train_app, ["--quiet", "--config", str(tiny_config), "--out", str(out), "--steps", "3"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["runs_per_gpu"] == 3
    assert s["head"] == "fused" and s["step_peak_bytes"] is None  # CPU
    assert s["head_kernel"] == "native"  # on CPU the exact fused head is always ours (core/head_cce.py)
    assert s["activation_bytes"] > 0 and s["weight_cast_bytes"] == 0
    assert set(s["activation_breakdown"]) == set(CATEGORIES)
    assert sum(s["activation_breakdown"].values()) == s["activation_bytes"]
    for old in ("peak_activation_bytes", "cuda_peak_step_bytes", "saved_top"):
        assert old not in s
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k in m for m in metrics for k in ("peak_activation_bytes", "cuda_peak_step_bytes"))


def test_bad_head_is_one_line_exit_2(tmp_path, tiny_config):
    res = runner.invoke(train_app, ["--quiet", "--config", str(tiny_config), "--out", str(tmp_path / "r"),
                                    "--head", "foo"])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "head" in lines[0], res.output


def test_summary_records_the_head_kernel_that_ran(tmp_path, tiny_config):
    """Exact fused head on CPU: ours ("native"); the plain head has no fused kernel (null)."""
    for head, expected in (("fused", "native"), ("plain", None)):
        out = tmp_path / head
        res = runner.invoke(train_app, ["--quiet", "--config", str(tiny_config), "--out", str(out), "--steps", "2",
                                        "--eval-every", "2", "--method", "exact", "--head", head])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "summary.json").read_text())["head_kernel"] == expected, head
