"""scripts/profile_diff.py on tables laid out as torch.profiler's key_averages table with CUDA activity
(the header of results/bench/h100_gpt2/profile/profile.txt; a CPU-only table has no CUDA columns)."""

import pytest

from tests.scripts_module import load_script

HEADER = ("                              Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg  "
          "   Self CUDA   Self CUDA %    CUDA total  CUDA time avg    # of Calls  ")


def _script():
    return load_script("profile_diff")


def _row(name: str, self_cuda: str, calls: int) -> str:
    cells = ["0.00%", "0.000us", "0.00%", "0.000us", "0.000us", self_cuda, "1.00%", self_cuda, "1.000us", str(calls)]
    return f"{name:>34}" + "".join(f"{c:>14}" for c in cells)


def _section(title: str, steps: int, rows: list[str], total: str) -> str:
    rule = "-" * 40
    return "\n".join([f"## {title} ({steps} steps)", "", rule, HEADER, rule, *rows, rule,
                      "Self CPU time total: 1.000ms", f"Self CUDA time total: {total}", ""])


def test_sections_and_diff_per_step_with_inductor_numbers_merged():
    pd = _script()
    exact = _section("exact", 3, [_row("nvjet_dw_NTN", "900.000us", 24),
                                  _row("triton_poi_fused_gelu_view_10", "3.000ms", 36)], "60.000ms")
    basis = _section("basis", 2, [_row("_gather_kernel", "2.000ms", 98), _row("triton_poi_fused_gelu_view_17", "1.000ms", 12),
                                  _row("triton_poi_fused_gelu_view_4", "1.000ms", 12)], "44.000ms")
    text = f"\n{exact}\n{basis}"
    secs = pd.sections(text)
    assert set(secs) == {"exact", "basis"}
    assert secs["exact"][pd.TOTAL][0] == pytest.approx(20.0) and secs["basis"][pd.TOTAL][0] == pytest.approx(22.0)
    assert secs["basis"]["triton_poi_fused_gelu_view"] == (pytest.approx(1.0), 12)  # two numbers, one kernel
    rows = pd.diff(secs["exact"], secs["basis"])
    assert [r[0] for r in rows] == ["_gather_kernel", "nvjet_dw_NTN", "triton_poi_fused_gelu_view"]
    assert rows[0][1:] == (0.0, pytest.approx(1.0), 0, 49)
    assert rows[1][1:] == (pytest.approx(0.3), 0.0, 8, 0)

