"""head_bench's targets: the head-alone targets compare the exact head basis-train runs on CUDA."""

import json
import sys

import pytest

from basis_train.experiments import bench, head_bench
from basis_train.experiments.head_bench import bench_command, targets


def _row(impl, ms, peak):
    return {"impl": impl, "status": "ok", "time_ms": {"median": ms}, "step_peak_bytes": peak}


def _head_targets(rows):
    res = {"meta": {"argv": ["basis-bench", "--device", "cuda"]}, "rows": rows}
    return {(t["target"].split(" at most")[0], t["limit"]): t for t in targets([], res)}


def test_head_targets_use_cce_exact_when_it_ran():
    rows = [_row("fused", 30.0, 600), _row("fused-basis", 27.0, 700), _row("cce", 6.0, 90),
            _row("cce-exact", 7.5, 100)]
    got = _head_targets(rows)
    t = got["head alone: the exact head we run on CUDA (cce-exact)", "<= 1.5"]
    assert t["measured"] == 7.5 / 6.0 and t["met"] is True
    p = got["head alone: the exact head we run on CUDA (cce-exact)", "<= 2.0"]
    assert p["measured"] == 100 / 90 and p["met"] is True
    # the sketched head stays compared with our exact head (it is always ours)
    assert got["head alone: the sketched (BASIS) fused head", "<= 1.0"]["measured"] == 27.0 / 30.0


def test_head_targets_fall_back_to_ours_without_cce_exact():
    rows = [_row("fused", 30.0, 600), _row("cce", 6.0, 90), {"impl": "cce-exact", "status": "skipped"}]
    t = _head_targets(rows)["head alone: the exact head we run on CUDA (fused)", "<= 1.5"]
    assert t["measured"] == 30.0 / 6.0 and t["met"] is False


def test_the_command_is_quoted_as_a_shell_reads_it():
    # an empty --sizes (the head alone) must stay an argument, or the command typed again fails
    meta = {"argv": ["/venv/bin/basis-bench", "--sizes", "", "--no-layer", "--out", "a b"]}
    assert bench_command(meta) == "basis-bench --sizes '' --no-layer --out 'a b'"


def test_ours_exact_against_cce_exact_for_both_orders_of_the_gradient():
    rows = [_row("fused", 16.0, 700), _row("fused-forward-grad", 11.0, 700), _row("cce-exact", 12.0, 90)]
    got = _head_targets(rows)
    fused = got["head alone: ours exact (fused)", "<= 1.0"]
    ahead = got["head alone: ours exact (fused-forward-grad)", "<= 1.0"]
    assert (fused["measured"], fused["met"]) == (16.0 / 12.0, False)
    assert (ahead["measured"], ahead["met"]) == (11.0 / 12.0, True)
    # without CCE (a CPU run) neither is measured
    assert _head_targets(rows[:2])["head alone: ours exact (fused)", "<= 1.0"]["met"] is None


def test_the_module_entry_runs_the_head_rows_and_records_its_own_command(tmp_path, monkeypatch):
    # the GPU machine's Python has no typer: `python -m basis_train.experiments.bench head OUT` stands in
    monkeypatch.setattr(sys, "argv", [bench.__file__, "head", str(tmp_path), "--quick", "--steps", "1", "--warmup", "0",
                                      "--device", "cpu"])
    with pytest.raises(SystemExit) as done:
        bench.main()
    assert done.value.code == 0
    res = json.loads((tmp_path / "head.json").read_text())
    assert [r["impl"] for r in res["rows"] if r["status"] == "ok"] == list(head_bench.HEAD_IMPLS[:5])
    command = f"python -m basis_train.experiments.bench head {tmp_path} --quick --steps 1 --warmup 0 --device cpu"
    assert res["meta"]["command"] == command and f"`{command}`" in (tmp_path / "bench.md").read_text()
    assert not (tmp_path / "layer.json").exists()
