"""The scale report's figures: validation curves, paired gaps over training, memory vs loss.

Curves come in panels, one per family of protocols (the main grid; the other lrs of its optimiser;
each other optimiser; each other length), so no panel holds more series than it can tell apart.
Within a panel every series has its own colour and line style.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from basis_train.reporting.grid_stats import Protocol
from basis_train.reporting.plotstyle import legend_outside, series_style
from basis_train.reporting.stats import mean_ci

GIB = 2 ** 30
DPI = 120  # one resolution for drawing and saving: labels are placed on the drawn figure


def panel_of(p: Protocol, ref: Protocol) -> tuple[int, str]:
    """(sort order, title) of the panel a protocol's curves go to."""
    if p == ref:
        return 0, f"main grid: {p.optimizer}, lr {p.lr:g}, {p.steps:,} steps"
    if (p.optimizer, p.steps, p.data_order) == (ref.optimizer, ref.steps, ref.data_order):
        return 1, f"{p.optimizer} at other lrs, {p.steps:,} steps"
    if p.steps == ref.steps:
        return 2, f"{p.optimizer}, {p.steps:,} steps, lr sweep"
    return 3, f"{p.optimizer}, {p.steps:,} steps"


def panels(entries: Sequence[Mapping], ref: Protocol) -> list[tuple[str, list[Mapping]]]:
    """The entries by panel, in table order; the main grid's panel split by `_split_main`."""
    out: dict[tuple[int, str], list[Mapping]] = {}
    for e in entries:
        out.setdefault(panel_of(e["protocol"], ref), []).append(e)
    groups: list[tuple[str, list[Mapping]]] = []
    for (order, title), es in sorted(out.items()):
        groups += _split_main(title, es) if order == 0 else [(title, es)]
    return groups


def _split_main(title: str, es: list[Mapping]) -> list[tuple[str, list[Mapping]]]:
    """The main grid in two panels once it holds both BASIS and other configurations (exact's other
    modes and memory methods, the outside references), whose curves lie within a few hundredths of
    exact's and hid each other among BASIS's. Exact itself is drawn in both."""
    def basis(e: Mapping) -> bool:
        return e["method"] == "basis"

    def exact(e: Mapping) -> bool:
        return e["method"] == "exact" and e["setting"].is_baseline

    if not any(map(basis, es)) or all(basis(e) or exact(e) for e in es):
        return [(title, es)]
    return [(f"{title}: BASIS", [e for e in es if basis(e) or exact(e)]),
            (f"{title}: exact's other modes and methods, outside references", [e for e in es if not basis(e)])]


def _figure(n_panels: int, width: float = 7.5, height: float = 4.8) -> tuple[Figure, list]:
    cols = 1 if n_panels == 1 else 2
    rows = math.ceil(n_panels / cols)
    # constrained: the legends beside each panel get their own room instead of covering a neighbour
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n_panels)]


def plot_val_loss(entries: Sequence[Mapping], ref: Protocol, path: Path) -> list[tuple[list, tuple[float, float]]]:
    """Mean validation loss over seeds with a ±1 std band; returns each panel's (colour, style) pairs
    and its y-limits."""
    groups = panels(entries, ref)
    fig, axes = _figure(len(groups))
    used = []
    for ax, (title, es) in zip(axes, groups, strict=True):
        styles, tops, firsts = [], [], []
        for i, e in enumerate(es):
            curves = [c for c in e["curves"].values() if c]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            stats = [mean_ci([c[s] for c in curves]) for s in steps]
            mean = [st["mean"] for st in stats]
            st = series_style(i)
            styles.append((st["color"], st["linestyle"]))
            ax.plot(steps, mean, label=f"{e['label']} (n={len(curves)})", linewidth=1.4, color=st["color"],
                    linestyle=st["linestyle"])
            if len(curves) > 1:
                std = [s["std"] for s in stats]
                ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                                [m + s for m, s in zip(mean, std, strict=True)], color=st["color"], alpha=0.15,
                                linewidth=0)
            if len(mean) >= 4:
                tops.append(mean[1])
                firsts.append(mean[0])
        if tops:
            low = min(min(e["val_mean"] for e in es if not math.isnan(e["val_mean"])), min(tops))
            # A first evaluation far above the rest (near init) would flatten every curve: the axis then
            # starts at the second; otherwise every point is shown.
            top = max(tops) if max(firsts) - low > 2 * (max(tops) - low) else max(firsts)
            ax.set_ylim(low - 0.05 * (top - low + 0.1), top + 0.05 * (top - low + 0.1))
        used.append((styles, ax.get_ylim()))
        ax.set(xlabel="step", ylabel="validation loss (nats/token)", title=title)
        ax.grid(True, alpha=0.3)
        legend_outside(ax, fontsize=7)
    fig.suptitle("Validation loss (mean over seeds, ±1 std)")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return used


def plot_gap_vs_step(entries: Sequence[Mapping], ref: Protocol, path: Path) -> None:
    """Each configuration's paired gap to its exact baseline over training: mean, 95% CI band."""
    groups = [(t, [e for e in es if e["gap_curve"]]) for t, es in panels(entries, ref)]
    groups = [(t, es) for t, es in groups if es]
    fig, axes = _figure(max(1, len(groups)))
    for ax, (title, es) in zip(axes, groups, strict=False):
        for i, e in enumerate(es):
            steps = sorted(e["gap_curve"])
            g = [e["gap_curve"][s] for s in steps]
            st = series_style(i)
            n = min(x["n"] for x in g)
            ax.plot(steps, [x["mean"] for x in g], markersize=3, linewidth=1.4, label=f"{e['label']} (n={n})", **st)
            band = [(s, x) for s, x in zip(steps, g, strict=True) if x["n"] > 1 and not math.isnan(x["ci_low"])]
            if band:
                ax.fill_between([s for s, _ in band], [x["ci_low"] for _, x in band], [x["ci_high"] for _, x in band],
                                color=st["color"], alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set(xlabel="step", ylabel="val loss − exact's, same seed (nats)", title=title)
        ax.grid(True, alpha=0.3)
        legend_outside(ax, fontsize=7)
    if not groups:
        axes[0].text(0.5, 0.5, "no configuration has an exact baseline", ha="center", transform=axes[0].transAxes)
    fig.suptitle("Paired gap to exact over training (mean over seeds, 95% CI band)")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def plot_pareto(entries: Sequence[Mapping], path: Path) -> list[str]:
    """One point per configuration of the main grid: step peak memory (activation bytes where no
    CUDA peak was measured) vs final validation loss with its 95% CI. Each point has its own colour
    and marker and is named in the legend beside the plot with its tokens/s: with points close
    together, labels beside them overlap or need leader lines that cross. Returns the legend texts."""
    # Off CUDA no run has a step peak; a run without one (the outside reference) is left out.
    have_peak = any(e.get("step_peak_bytes_mean") for e in entries)
    key, xlabel = (("step_peak_bytes_mean", "CUDA step peak memory (GiB)") if have_peak
                   else ("act_bytes_mean", "activation bytes saved for backward (GiB; no CUDA step peak)"))
    fig = Figure(figsize=(9.5, 5.5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = [e for e in entries if e.get(key) is not None and not math.isnan(e["val_mean"])]
    for i, e in enumerate(points):
        x, y = e[key] / GIB, e["val_mean"]
        err = None
        if e["n"] > 1 and not math.isnan(e["val_ci_high"]):
            err = [[y - e["val_ci_low"]], [e["val_ci_high"] - y]]
        st = series_style(i)
        tok = e.get("tokens_per_s_mean")
        speed = f"{tok:,.0f} tok/s" if tok else "tokens/s not measured alone"
        ax.errorbar([x], [y], yerr=err, fmt=st["marker"], color=st["color"], capsize=3, markersize=7,
                    label=f"{e['label']} (n={e['n']}): {speed}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (mean over seeds, 95% CI)")
    ax.set_title("Memory vs loss per configuration (main grid)")
    ax.grid(True, alpha=0.3)
    legend_outside(ax, fontsize=7)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []
