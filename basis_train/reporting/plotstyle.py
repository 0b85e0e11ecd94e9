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
from matplotlib.text import Text

COLORS: tuple[str, ...] = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                           "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
LINESTYLES: tuple[object, ...] = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def series_style(i: int) -> dict:
    """Style of the i-th series. Colours cycle every 10 series and the line style advances with each
    series and once more per full colour cycle, so series i and j (i != j, both below 60) never share
    both colour and line style; consecutive series differ in both."""
    n_c, n_l = len(COLORS), len(LINESTYLES)
    if i >= n_c * n_l:
        raise ValueError(f"only {n_c * n_l} distinguishable series styles; got series {i}")
    return {"color": COLORS[i % n_c], "linestyle": LINESTYLES[(i + i // n_c) % n_l],
            "marker": MARKERS[i % len(MARKERS)]}


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


def label_box(note, renderer):
    """A label's text box on screen, without its leader line (an annotation's own extent includes
    the line, which always touches its point)."""
    return Text.get_window_extent(note, renderer)


def label_points(ax: Axes, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: float = 8, max_rounds: int = 200) -> list:
    """Annotate each point with its label, then move labels apart until no two label boxes overlap
    and no label box covers another point's marker. Returns the annotations (tests read their
    extents). Labels move vertically in screen space, in steps of a fraction of a label's height."""
    fig = ax.figure
    notes = [ax.annotate(text, (x, y), xytext=(6, 4), textcoords="offset points", fontsize=fontsize,
                         arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.4"})
             for x, y, text in zip(xs, ys, labels, strict=True)]
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(list(zip(xs, ys, strict=True))) if notes else []
    for _ in range(max_rounds):
        boxes = [label_box(n, renderer) for n in notes]
        moved = False
        for i, note in enumerate(notes):
            hits = [b for j, b in enumerate(boxes) if j < i and b.overlaps(boxes[i])]
            covers = any(boxes[i].contains(px, py) for j, (px, py) in enumerate(points) if j != i)
            if hits or covers:
                dx, dy = note.get_position()
                step = boxes[i].height * 72.0 / fig.dpi * 0.6  # pixels -> points
                note.set_position((dx, dy - step if i % 2 else dy + step))
                boxes[i] = label_box(note, renderer)
                moved = True
        if not moved:
            break
    return notes
