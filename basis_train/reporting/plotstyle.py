"""Shared plot conventions: every series told apart by colour and line style, legends outside the
data, point labels that do not overlap.

A report may hold more series than a colour cycle has colours (a grid plus its learning-rate
variants), and printed in grey or read by a colour-blind reader colours alone do not separate
them, so each series gets a (colour, line style) pair that no other series of the plot shares.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

COLORS: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                           "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LINESTYLES: tuple[object, ...] = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def series_style(i: int) -> dict:
    """Style of the i-th series. Colours cycle every 10 series; the line style and the marker advance
    with each series and once more per full colour cycle, so series i and j (i != j, both below 60)
    never share both colour and line style, nor both colour and marker (a plot of points alone, such
    as the Pareto plot, tells them apart by those two); consecutive series differ in all three."""
    n_c, n_l, n_m = len(COLORS), len(LINESTYLES), len(MARKERS)
    if i >= n_c * n_l:
        raise ValueError(f"only {n_c * n_l} distinguishable series styles; got series {i}")
    shift = i + i // n_c
    return {"color": COLORS[i % n_c], "linestyle": LINESTYLES[shift % n_l], "marker": MARKERS[shift % n_m]}


def legend_outside(ax: Axes, **kwargs) -> None:
    """The legend to the right of the axes, where it cannot cover data (savefig with
    bbox_inches="tight" keeps it in the image)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def legend_below(fig: Figure, axes: Sequence[Axes], ncol: int = 4, **kwargs) -> None:
    """One legend for all panels of a figure, below them, each label once."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=ncol, **kwargs)
