"""The benchmark CLI end to end at tiny shapes on CPU. Timings are recorded but never asserted."""

import json

import pytest
import torch
from typer.testing import CliRunner

from basis_train.experiments import bench
from basis_train.experiments.bench import app


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
    return res, {(r["variant"], r["rank"]): r for r in res["rows"]}


def test_files_and_keys(bench_out):
    for name in ("bench_paper.json", "layer.json", "bench.md", "memory.md"):
        assert (bench_out / name).is_file(), name
    assert not list(bench_out.glob(".*.tmp"))  # atomic writes leave no temporaries behind
    res, rows = _rows(bench_out)
    assert {"gpu", "torch", "cuda", "dtype", "argv", "date", "steps", "warmup"} <= res["meta"].keys()
    assert res["meta"]["argv"] and res["meta"]["steps"] == 2
    assert res["size"]["vocab"] == 512 and res["logits_bytes"] == 2 * 32 * 512 * 4
    assert set(rows) == {("exact", None), ("exact+ckpt", None), ("mlp+head", 4), ("all", 4)}
    for r in rows.values():
        assert r["status"] == "ok"
        assert {"median", "q25", "q75", "iqr", "all"} <= r["time_ms"].keys() and len(r["time_ms"]["all"]) == 2
        assert {"cuda_peak_bytes", "saved_bytes", "saved_top", "saved_by_category", "ratio_time_ms",
                "ratio_saved_bytes", "ratio_cuda_peak_bytes"} <= r.keys()
        assert 0 < len(r["saved_top"]) <= 5
        assert [e["bytes"] for e in r["saved_top"]] == sorted((e["bytes"] for e in r["saved_top"]), reverse=True)
        assert sum(r["saved_by_category"].values()) == r["saved_bytes"]
    layer = json.loads((bench_out / "layer.json").read_text())
    assert layer["shape"] == [256, 64, 128] and [r["rank"] for r in layer["rows"]] == [None, 4]


def test_ratios_and_saved_bytes(bench_out):
    _, rows = _rows(bench_out)
    exact = rows["exact", None]
    assert exact["ratio_time_ms"] == 1.0 and exact["ratio_saved_bytes"] == 1.0
    assert exact["cuda_peak_bytes"] is None and exact["ratio_cuda_peak_bytes"] is None  # CPU: no allocator peak
    assert rows["mlp+head", 4]["saved_bytes"] < exact["saved_bytes"]
    assert rows["all", 4]["saved_bytes"] <= rows["mlp+head", 4]["saved_bytes"]
    assert rows["exact+ckpt", None]["saved_bytes"] < exact["saved_bytes"]
    # Cross-entropy keeps a float32 log-softmax of the logits whatever the rank: the classifier must find it.
    logits = [e for e in exact["saved_by_shape"] if e["category"].startswith("logits")]
    assert sum(e["bytes"] for e in logits) == 2 * 32 * 512 * 4
    sketches = [sum(nb for c, nb in r["saved_by_category"].items() if c.startswith("BASIS sketches"))
                for r in (rows["all", 4], exact)]
    assert sketches[0] > 0 and sketches[1] == 0
    layer = json.loads((bench_out / "layer.json").read_text())["rows"]
    assert layer[0]["ratio_time_ms"] == 1.0 and layer[0]["ratio_saved_bytes"] == 1.0
    assert layer[1]["saved_bytes"] < layer[0]["saved_bytes"]


def test_markdown_is_generated_from_numbers(bench_out):
    md = (bench_out / "bench.md").read_text()
    assert "| variant | R | ms/step median [IQR] | ratio to exact | CUDA peak MiB |" in md
    assert "| basis mlp+head | 4 |" in md and "| BasisLinear | 4 |" in md
    mem = (bench_out / "memory.md").read_text()
    _, rows = _rows(bench_out)
    exact, best = rows["exact", None], rows["all", 4]
    logits = sum(nb for c, nb in exact["saved_by_category"].items() if c.startswith("logits"))
    share = 100 * logits / exact["saved_bytes"]
    assert f"{share:.1f}%" in mem
    assert f"{best['ratio_saved_bytes']:.3f}x exact" in mem


def test_unknown_variant_is_rejected(tmp_path):
    args = ["--quick", "--device", "cpu", "--variants", "exact,bogus", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert not list(tmp_path.iterdir())


def test_oom_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    real = bench._step_bench

    def flaky(size, variant, rank, device, opts):
        if variant == "all":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(size, variant, rank, device, opts)

    monkeypatch.setattr(bench, "_step_bench", flaky)
    args = ["--quick", "--device", "cpu", "--steps", "1", "--warmup", "0", "--sizes", "paper", "--ranks", "4",
            "--variants", "exact,all,mlp+head", "--no-layer", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "bench_paper.json").read_text())["rows"]
    assert [(r["variant"], r["status"]) for r in rows] == [("exact", "ok"), ("all", "oom"), ("mlp+head", "ok")]
    assert rows[1]["ratio_saved_bytes"] is None and rows[2]["ratio_saved_bytes"] < 1
    assert "| basis all | 4 | OOM |" in (tmp_path / "bench.md").read_text()
    assert not (tmp_path / "layer.json").exists()
