"""Plots a reader can read: every series its own colour and line style, legends off the data."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from basis_train.reporting.plotstyle import legend_outside, series_style
from basis_train.reporting.report import collect_runs, plot_memory, plot_val_curves, summarize
from tests.reporting.test_report import RUNS, make_run


def _key(style) -> tuple:
    return style["color"], str(style["linestyle"])


def test_series_styles_are_distinct():
    styles = [series_style(i) for i in range(60)]
    assert len({_key(s) for s in styles}) == 60
    # points without lines (the Pareto plot) are told apart by colour and marker alone
    assert len({(s["color"], s["marker"]) for s in styles}) == 60
    for a, b in zip(styles, styles[1:], strict=False):
        assert a["color"] != b["color"] and str(a["linestyle"]) != str(b["linestyle"]) and a["marker"] != b["marker"]


def _axes_with_data():
    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], label="a")
    return fig, ax


def test_legend_outside_does_not_cover_the_axes():
    fig, ax = _axes_with_data()
    legend_outside(ax)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))


def _runs(tmp_path: Path, n_labels: int) -> dict[str, list[Path]]:
    return {f"basis R={r}": [make_run(tmp_path / "runs", "basis", r, "", s, 6.5 + r / 1000, 3.0)
                             for s in range(2)] for r in range(1, n_labels + 1)}


def test_val_curves_every_series_distinguishable(tmp_path):
    fig = plot_val_curves(_runs(tmp_path, 12), tmp_path / "val.png")  # more series than colours
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    assert len(lines) == 12
    assert len({(ln.get_color(), str(ln.get_linestyle())) for ln in lines}) == 12
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    assert ax.get_xlabel() and "nats" in ax.get_ylabel()


def test_memory_legend_is_off_the_bars(tmp_path):
    runs = [make_run(tmp_path / "runs", *r) for r in RUNS]
    fig = plot_memory(summarize(collect_runs(runs)), tmp_path / "memory.png")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert not any(ax.get_legend() for ax in fig.axes)  # no legend inside a panel
    (legend,) = fig.legends
    for ax in fig.axes:
        assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
        assert "MiB" in ax.get_ylabel() and ax.get_xlabel()


def test_memory_reference_lines_are_each_their_own(tmp_path):
    # exact's configurations (eager, checkpointed, 8-bit, ...) as lines: the fifth repeated the first
    runs = [make_run(tmp_path / "runs", *r) for r in RUNS]
    lines = {f"exact [variant {j}]": (1000 + j) * 2**20 for j in range(8)}
    fig = plot_memory(summarize(collect_runs(runs)), tmp_path / "memory.png", lines=lines)
    drawn = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("exact")]
    # get_linestyle() names every dash tuple "--"; the dash pattern itself tells them apart
    assert len(drawn) == 9 and len({(ln.get_color(), str(ln._unscaled_dash_pattern)) for ln in drawn}) == 9
