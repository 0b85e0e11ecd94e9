"""basis-bench's CUDA-graphed step table, from made-up rows (the GPU test measures real ones)."""

from basis_train.reporting.bench_report import graphed_md


def _t(ms):
    return {"median": ms, "q25": ms, "q75": ms}


def test_graphed_table_ratios_and_failures():
    res = {"rows": [
        {"variant": "exact", "rank": None, "status": "ok", "time_ms": _t(1.0), "graphed_time_ms": _t(0.5)},
        {"variant": "mlp+head", "rank": 8, "status": "ok", "time_ms": _t(2.0), "graphed_time_ms": _t(0.6)},
        {"variant": "all", "rank": 8, "status": "ok", "time_ms": _t(2.0), "graphed_time_ms": {"status": "error"}},
        {"variant": "exact+ckpt", "rank": None, "status": "oom"},
    ]}
    lines = graphed_md(res)
    assert "| exact | - | 0.500 [0.500, 0.500] | 1.000 | 2.000 |" in lines
    assert "| basis mlp+head | 8 | 0.600 [0.600, 0.600] | 1.200 | 3.333 |" in lines
    assert "| basis all | 8 | ERROR | - | - |" in lines
    assert not any("exact+ckpt" in line for line in lines)


def test_no_table_without_graphed_timings():  # CPU runs
    assert graphed_md({"rows": [{"variant": "exact", "rank": None, "status": "ok", "time_ms": _t(1.0)}]}) == []
