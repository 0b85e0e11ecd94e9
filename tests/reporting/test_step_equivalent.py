"""Exact's steps to a configuration's final loss: the crossing of exact's curve, and the report's table."""

import pytest

from basis_train.reporting.scale import write_report
from basis_train.reporting.step_equivalent import steps_to_reach
from tests.reporting.test_scale_report import fake_run


def test_steps_to_reach_reads_the_curve_as_straight_lines():
    curve = {750: 3.5, 250: 5.0, 500: 4.0}  # any order: the steps sort it
    assert steps_to_reach(curve, 4.5) == (375.0, False)
    assert steps_to_reach(curve, 3.75) == (625.0, False)
    assert steps_to_reach(curve, 4.0) == (500.0, False)  # on an evaluation: that step
    assert steps_to_reach(curve, 6.0) == (250.0, True)  # there at the first evaluation: a bound only
    assert steps_to_reach(curve, 3.4) is None  # below the whole curve
    assert steps_to_reach({}, 3.0) is None


def test_a_curve_that_rises_again_counts_its_first_crossing():
    assert steps_to_reach({100: 5.0, 200: 4.0, 300: 4.6, 400: 3.0}, 4.5) == (150.0, False)


def _table(md):
    lines = md[md.index("## Exact's steps"):].splitlines()
    return {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1:] for ln in lines if ln.startswith("| ") and "---" not in ln}


def test_the_report_gives_each_seeds_step_the_mean_fraction_and_the_time(tmp_path):
    g = tmp_path / "grid" / "runs"
    for s in (0, 1):
        fake_run(g, f"exact-s{s}", "exact", None, "", s, 3.0, curve={10: 5.0, 20: 3.0}, tokens_per_s=1000.0)
    # seed 0: 4.5 is reached at step 12.5, seed 1: 3.5 at 17.5 -> fractions 0.625, 0.875, mean 0.75
    fake_run(g, "basis_R64-s0", "basis", 64, "", 0, 4.5, curve={10: 6.0, 20: 4.5}, tokens_per_s=800.0)
    fake_run(g, "basis_R64-s1", "basis", 64, "", 1, 3.5, curve={10: 6.0, 20: 3.5}, tokens_per_s=800.0)
    # one seed below exact's whole curve, the other there at exact's first evaluation
    fake_run(g, "basis_R8-s0", "basis", 8, "", 0, 2.9, tokens_per_s=900.0)
    fake_run(g, "basis_R8-s1", "basis", 8, "", 1, 5.5, tokens_per_s=900.0)
    write_report(tmp_path / "grid", tmp_path / "results")
    rows = _table((tmp_path / "results" / "summary.md").read_text())
    assert rows["basis R=64"] == ["2", "12 / 18", "0.75", "0.60 |"]  # 0.75 x 800 / 1000
    # no mean where a seed was not reached: it would understate what the configuration is worth
    assert rows["basis R=8"] == ["2", "not reached / ≤ 10", "–", "– |"]
    assert "exact" not in rows  # the baseline has no row of its own


@pytest.mark.parametrize("speed", [None, 0.0])
def test_no_time_without_both_speeds(tmp_path, speed):
    g = tmp_path / "grid" / "runs"
    fake_run(g, "exact-s0", "exact", None, "", 0, 3.0, curve={10: 5.0, 20: 3.0})
    fake_run(g, "basis_R64-s0", "basis", 64, "", 0, 4.0, curve={10: 6.0, 20: 4.0}, tokens_per_s=speed)
    write_report(tmp_path / "grid", tmp_path / "results")
    assert _table((tmp_path / "results" / "summary.md").read_text())["basis R=64"] == ["1", "15", "0.75", "– |"]
