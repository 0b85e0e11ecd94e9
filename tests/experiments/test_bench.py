"""The benchmark CLI end to end at tiny shapes on CPU. Timings are recorded but never asserted."""

import json

import pytest
import torch
from typer.testing import CliRunner

from basis_train.cli.bench import app
from basis_train.experiments import bench


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    # One thread: on a small shared CI box OpenMP's spinning workers can make tiny steps 100x slower.
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, [
            "--quick", "--device", "cpu", "--steps", "2", "--warmup", "1", "--sizes", "paper", "--ranks", "4",
            "--out", str(out), "--memory-table", str(out / "memory.md"),
        ])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def _rows(out):
    res = json.loads((out / "bench_paper.json").read_text())
    return res, {(r["variant"], r["rank"], r["head"]): r for r in res["rows"]}


def test_files_and_keys(bench_out):
    for name in ("bench_paper.json", "layer.json", "head.json", "bench.md", "memory.md", "memory_targets.json"):
        assert (bench_out / name).is_file(), name
    assert not list(bench_out.glob(".*.tmp"))  # atomic writes leave no temporaries behind
    res, rows = _rows(bench_out)
    assert {"gpu", "cpu", "commit", "torch", "cuda", "dtype", "argv", "date", "steps", "warmup"} <= res["meta"].keys()
    assert res["meta"]["argv"] and res["meta"]["steps"] == 2
    assert res["size"]["vocab"] == 512 and res["logits_bytes"] == 2 * 32 * 512 * 4
    assert set(rows) == {(v, r, h) for h in ("fused", "plain")
                         for v, r in (("exact", None), ("exact+ckpt", None), ("mlp+head", 4), ("all", 4))}
    for r in rows.values():
        assert r["status"] == "ok"
        assert {"median", "q25", "q75", "iqr", "all"} <= r["time_ms"].keys() and len(r["time_ms"]["all"]) == 2
        assert {"step_peak_bytes", "activation_bytes", "weight_cast_bytes", "activation_breakdown", "ratio_time_ms",
                "ratio_activation_bytes", "ratio_step_peak_bytes"} <= r.keys()
        assert sum(r["activation_breakdown"].values()) == r["activation_bytes"]
    layer = json.loads((bench_out / "layer.json").read_text())
    assert layer["shape"] == [256, 64, 128] and [r["rank"] for r in layer["rows"]] == [None, 4]
    head = json.loads((bench_out / "head.json").read_text())
    status = {r["impl"]: r["status"] for r in head["rows"]}
    assert status == {"plain": "ok", "fused": "ok", "fused-forward-grad": "ok", "fused-basis": "ok",
                      "fused-basis-forward-grad": "ok", "liger": "skipped", "cce": "skipped", "cce-exact": "skipped"}
    assert [r["rank"] for r in head["rows"] if r["impl"].startswith("fused")] == [None, None, 64, 64]
    targets = json.loads((bench_out / "memory_targets.json").read_text())
    assert all(t.keys() == {"target", "limit", "measured", "met", "command"} for t in targets)
    assert targets[0]["measured"] == rows["exact", None, "fused"]["activation_bytes"] / rows[
        "exact", None, "plain"]["activation_bytes"]


def test_ratios_and_activation_bytes(bench_out):
    _, rows = _rows(bench_out)
    for head in ("fused", "plain"):
        exact = rows["exact", None, head]
        assert exact["ratio_time_ms"] == 1.0 and exact["ratio_activation_bytes"] == 1.0
        assert exact["step_peak_bytes"] is None and exact["ratio_step_peak_bytes"] is None  # CPU: no allocator peak
        assert rows["mlp+head", 4, head]["activation_bytes"] < exact["activation_bytes"]
        assert rows["all", 4, head]["activation_bytes"] <= rows["mlp+head", 4, head]["activation_bytes"]
        assert rows["exact+ckpt", None, head]["activation_bytes"] < exact["activation_bytes"]
        assert rows["all", 4, head]["activation_breakdown"]["sketches"] > 0
        assert exact["activation_breakdown"]["sketches"] == 0
    # Cross-entropy keeps a float32 log-softmax of the logits whatever the rank; the fused head does not.
    assert rows["exact", None, "plain"]["activation_breakdown"]["head"] >= 2 * 32 * 512 * 4
    assert rows["exact", None, "fused"]["activation_breakdown"]["head"] < 2 * 32 * 512
    layer = json.loads((bench_out / "layer.json").read_text())["rows"]
    assert layer[0]["ratio_time_ms"] == 1.0 and layer[0]["ratio_activation_bytes"] == 1.0
    assert layer[1]["activation_bytes"] < layer[0]["activation_bytes"]


def test_markdown_is_generated_from_numbers(bench_out):
    md = (bench_out / "bench.md").read_text()
    assert "| variant | R | ms/step median [IQR] | ratio to exact | tokens/s | MFU | step peak MiB |" in md
    assert "| basis mlp+head, fused head | 4 |" in md and "| BasisLinear | 4 |" in md
    assert "| fused | - |" in md and "cce: skipped" in md
    mem = (bench_out / "memory.md").read_text()
    _, rows = _rows(bench_out)
    exact, best = rows["exact", None, "plain"], rows["all", 4, "plain"]
    share = 100 * exact["activation_breakdown"]["head"] / exact["activation_bytes"]
    assert f"logits/head {share:.1f}%" in mem
    assert f"{best['ratio_activation_bytes']:.3f}x" in mem


def test_unknown_variant_is_rejected(tmp_path):
    args = ["--quick", "--device", "cpu", "--variants", "exact,bogus", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert not list(tmp_path.iterdir())


def test_oom_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench._step_bench

    def flaky(size, variant, rank, head, device, opts):
        if variant == "all":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(size, variant, rank, head, device, opts)

    monkeypatch.setattr(bench, "_step_bench", flaky)
    args = ["--quick", "--device", "cpu", "--steps", "1", "--warmup", "0", "--sizes", "paper", "--ranks", "4",
            "--variants", "exact,all,mlp+head", "--heads", "fused", "--no-layer", "--no-head-bench",
            "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench_paper.json").read_text())["rows"]
    assert [(r["variant"], r["status"]) for r in rows] == [("exact", "ok"), ("all", "oom"), ("mlp+head", "ok")]
    assert rows[1]["ratio_activation_bytes"] is None and rows[2]["ratio_activation_bytes"] < 1
    assert "| basis all, fused head | 4 | OOM |" in (tmp_path / "bench.md").read_text()
    assert not (tmp_path / "layer.json").exists()


def test_rows_say_which_head_kernel_ran(bench_out):
    # On CPU the fused exact head is always ours; the plain head has no fused kernel.
    _, rows = _rows(bench_out)
    for (variant, rank, head), r in rows.items():
        assert r["head_kernel"] == ("native" if head == "fused" else None), (variant, rank, head)


def test_unknown_head_kernel_is_one_line_and_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["--quick", "--device", "cpu", "--head-kernel", "foo", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown head kernel 'foo'" in res.output


def test_gpt2_targets_time_exact_with_our_head_and_with_cce_only_when_installed(monkeypatch):
    from basis_train.core import head_cce
    from basis_train.experiments import bench_kernels

    seen = []

    def fake_ratios(size, variants, reps, device):
        seen.append(variants)
        return {name: 10.0 + i for i, name in enumerate(variants)}

    monkeypatch.setattr(bench_kernels, "step_ratios", fake_ratios)
    for problem, kernels in ((None, {"native", "cce"}), ("not installed", {"native"})):
        monkeypatch.setattr(head_cce, "cce_problem", lambda problem=problem: problem)
        targets = []
        bench_kernels._gpt2_targets(targets, 50, "cuda", "cmd")
        exact = {k[2] for name, k in seen[-1].items() if k[0] == "exact"}
        assert exact == kernels and len(targets) == 2 * len(kernels)
        assert all("auto" not in t["target"] for t in targets)


def test_rows_give_tokens_per_second_and_mfu(bench_out):
    """tokens/s = rows a step / the median step; MFU needs a GPU with a known peak (None on a CPU)."""
    res, rows = _rows(bench_out)
    tokens = res["size"]["batch"] * res["size"]["seq"]
    for r in rows.values():
        assert r["speed_of"] == "eager" and r["mfu"] is None
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["time_ms"]["median"] / 1e3), rel=1e-12)
    md = (bench_out / "bench.md").read_text()
    assert "| tokens/s | MFU |" in md


def test_mfu_follows_nanogpts_count():
    from basis_train.core import flops

    model = torch.nn.Linear(10, 10)  # 110 parameters, no position table
    per_token = flops.flops_per_token(model, n_layer=2, n_head=3, n_embd=12, seq=5)
    assert per_token == 6 * 110 + 12 * 2 * 3 * 4 * 5
    assert flops.mfu(1000.0, per_token, "NVIDIA H200") == pytest.approx(1000.0 * per_token / 989e12)
    assert flops.mfu(1000.0, per_token, "some CPU") is None
