"""CUDA-only checks (skipped on CPU machines such as CI).

The data is the embedded corpus; on a GPU machine without the `datasets` package its token
cache travels with the repository ($BASIS_TRAIN_CACHE).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from basis_train.core.basis_linear import BasisLinear
from basis_train.training.config import apply_overrides, dump_config, load_config
from basis_train.training.train import Run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# 2 x 32 = 64 rows per step and R = 8: every draw gives a different dW, so a sketch frozen
# into a captured graph, or a sketch stream that does not continue, changes the weights.
SMALL = {"model.block_size": 32, "model.n_embd": 32, "model.n_head": 2, "model.n_layer": 1, "sketch.rank": 8,
         "train.batch_size": 2, "train.steps": 12, "train.eval_every": 4, "train.checkpoint_every": 5,
         "train.device": "cuda", "data.val_protocol": "paper"}
# Steps 2 and 3 are eager warm-up on a side stream, step 4 is the capture, then replays.
STEPS = 9


def _cfg(**overrides):
    return apply_overrides(load_config(None), {**SMALL, **overrides})


def _weights(run):
    return [p.detach().clone() for p in run.model.parameters()]


def _draws(gen):
    return torch.randint(0, 2**62, (16,), device=gen.device, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rank_equal_rows_on_cuda(dtype):
    torch.manual_seed(0)
    ref = nn.Linear(64, 32).cuda()
    basis = BasisLinear(64, 32, rank=128, lam=0.01).cuda()
    basis.load_state_dict(ref.state_dict())
    x, dy = torch.randn(128, 64, device="cuda"), torch.randn(128, 32, device="cuda")
    grads = []
    for layer in (ref, basis):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = layer(xi)
        y.backward(dy.to(y.dtype))
        grads.append((y.detach().float(), xi.grad, layer.weight.grad, layer.bias.grad))
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert grads[1][2].dtype == torch.float32
    for a, b in zip(grads[0][:2], grads[1][:2]):
        assert_close(b, a, **tol)
    # BASIS sums its sketches in float32 from the fp32 input and the (bf16/fp16) output
    # gradient, so the reference for dW is that product in float64. Under autocast the
    # rank-R product runs on tensor cores from the sketches rounded to the autocast dtype.
    expected = 0.99**2 * dy.to(dtype).double().t() @ x.double()
    if dtype == torch.float32:
        assert_close(grads[1][2].double(), expected, rtol=1e-4, atol=1e-4)
    else:  # rounding both factors to 8 (bf16) or 11 (fp16) bits: ~0.3% relative error
        assert (grads[1][2].double() - expected).norm() < 1e-2 * expected.norm()
    assert_close(grads[1][3], grads[0][3], **tol)


def test_graph_replay_k_equals_eager_step_k(tmp_path):
    """The loop's own step (TrainStep, core/graphs.py, the registered sketch generator)."""
    graphed = Run(_cfg(), tmp_path / "graphed", progress=False)
    eager = Run(_cfg(**{"train.cuda_graphs": False}), tmp_path / "eager", progress=False)
    other = Run(_cfg(**{"train.cuda_graphs": False}), tmp_path / "other", progress=False)
    other.train_step.gen.manual_seed(12345)  # control: the same run with another sketch stream
    for k in range(1, STEPS + 1):
        for run in (graphed, eager, other):
            run.train_step(run.loader.next_indices())
        for a, b in zip(_weights(graphed), _weights(eager)):
            assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"step {k}: {m}")
    assert graphed.train_step.graph is not None and eager.train_step.graph is None
    # The tolerance above separates sketch streams: a frozen sketch would have failed it.
    assert max((a - b).abs().max().item() for a, b in zip(_weights(other), _weights(eager))) > 1e-5
    # After the replays the registered generator continues the eager stream.
    assert torch.equal(_draws(graphed.train_step.gen), _draws(eager.train_step.gen))
    assert_close(graphed.train_step.loss_sum, eager.train_step.loss_sum, rtol=1e-6, atol=0)


def _train_cli(cfg_path, out, die_at=None, resume=False):
    env = dict(os.environ, BASIS_TRAIN_DIE_AT_STEP=str(die_at or 0))
    cmd = [sys.executable, "-m", "basis_train.cli", "--quiet", "--config", str(cfg_path), "--out", str(out)]
    return subprocess.run(cmd + (["--resume"] if resume else []), env=env, capture_output=True, text=True)


def _read(out):
    timing = {"tokens_per_s", "ms_per_step", "eval_s", "wall_s", "train_s", "by_rank"}
    summary = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if k not in timing}
    metrics = [{k: v for k, v in json.loads(x).items() if k not in timing}
               for x in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics, torch.load(out / "checkpoint.pt", weights_only=False)


def test_resume_with_cuda_graphs_equals_uninterrupted(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    dump_config(_cfg(), cfg_path)
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    proc = _train_cli(cfg_path, killed, die_at=7)  # graphed from step 4, checkpoint at 5, killed at 7
    assert proc.returncode == 137, proc.stderr
    proc = _train_cli(cfg_path, killed, resume=True)
    assert proc.returncode == 0, proc.stderr
    proc = _train_cli(cfg_path, ref)
    assert proc.returncode == 0, proc.stderr
    (s1, m1, c1), (s2, m2, c2) = _read(killed), _read(ref)
    assert s1["cuda_graphs"] and s2["cuda_graphs"]
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [4, 8, 12]
    for a, b in zip(m1, m2):
        assert_close(a["train_loss"], b["train_loss"], rtol=1e-6, atol=0)
        assert_close(a["val_loss"], b["val_loss"], rtol=1e-6, atol=0)
    for k, v in c2["model"].items():
        assert_close(c1["model"][k], v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    gens = []
    for c in (c1, c2):
        g = torch.Generator(device="cuda")
        g.set_state(c["gen"])
        gens.append(_draws(g))
    assert torch.equal(*gens)


def test_graphed_cuda_run_matches_cpu_run(tmp_path):
    """A whole graphed CUDA run (exact gradients, fp32, TF32 off) trains as the CPU loop does:
    same batches, same updates, same evaluations, to float rounding."""
    cfg = {"train.method": "exact", "train.steps": 40, "train.eval_every": 10}
    gpu = Run(_cfg(**cfg), tmp_path / "gpu", progress=False).run()
    cpu = Run(_cfg(**cfg, **{"train.device": "cpu"}), tmp_path / "cpu", progress=False).run()
    assert gpu["cuda_graphs"] and not cpu["cuda_graphs"]
    assert gpu["step_peak_bytes"] > 0
    gm, cm = (_read(tmp_path / d)[1] for d in ("gpu", "cpu"))
    assert [m["step"] for m in gm] == [10, 20, 30, 40]
    for a, b in zip(gm, cm):
        assert_close(a["train_loss"], b["train_loss"], rtol=1e-4, atol=0)
        assert_close(a["val_loss"], b["val_loss"], rtol=1e-4, atol=0)
    assert gm[-1]["val_loss"] < gm[0]["val_loss"]  # and it learns


def test_bench_times_the_graphed_step(tmp_path):
    from typer.testing import CliRunner

    from basis_train.cli.bench import app

    res = CliRunner().invoke(app, ["--quick", "--device", "cuda", "--sizes", "paper,gpt2-small", "--ranks", "8",
                                   "--steps", "3", "--warmup", "1", "--no-layer", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for size in ("paper", "gpt2-small"):  # SGD and fp32; AdamW (capturable) and bf16 autocast
        rows = json.loads((tmp_path / f"bench_{size}.json").read_text())["rows"]
        for r in rows:
            assert r["graphed_time_ms"]["median"] > 0, (size, r["variant"], r["graphed_time_ms"])
    assert "CUDA-graph replay" in (tmp_path / "bench.md").read_text()


def test_float16_run_on_cuda_scales_the_loss(tmp_path):
    run = Run(_cfg(**{"train.dtype": "float16", "train.steps": 20, "train.eval_every": 10}), tmp_path / "fp16",
              progress=False)
    summary = run.run()
    assert not summary["cuda_graphs"]  # the scaler decides on the host whether a step is skipped
    assert run.train_step.scaler is not None and run.train_step.scaler.get_scale() > 0
    metrics = _read(tmp_path / "fp16")[1]
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_loss"]) for m in metrics)
    assert "scaler" in torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=False)
