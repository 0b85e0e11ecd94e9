"""The memory methods side by side (issue 27): each frontier method's step peak and tokens/s at the study's
size (experiments/frontier.py's reference point) beside what it costs in final held-out loss, read from a
grid's quality runs (grid_stats.py).

    python -m basis_train.reporting.methods FRONTIER_DIR --runs RUNS_DIR [--out DIR]

writes pareto.png (step peak against tokens/s, one point per method) and methods.md into OUT
(default FRONTIER_DIR).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from basis_train.fsutil import atomic_write_bytes, atomic_write_text
from basis_train.reporting.frontier_report import DPI, GIB, md_row, method_style, peak_words, reference_cells
from basis_train.reporting.grid_stats import MODE_TAG_NAMES, read_runs, summarize_settings
from basis_train.reporting.plotstyle import legend_outside
from basis_train.reporting.scale import run_dirs

GradientKey = tuple[str, int | None, frozenset[str]]
EXACT_KEY: GradientKey = ("exact", None, frozenset())


def _changes_gradients(tag: str) -> bool:
    # Checkpointing recomputes in backward the very tensors the forward saved, and offload copies them to the
    # host and back: the gradients are those of the same configuration without them, to float rounding
    # (tests/core/test_saved_activations.py::test_checkpointing_and_offload_change_no_gradient), so their loss
    # is that configuration's. torch.compile and CUDA graphs (grid_stats's mode tags) must change no result either.
    checkpointing = tag == "ckpt" or tag.startswith(("ckpt=", "ckpt-every"))
    return not (checkpointing or tag == "act=offload" or tag in MODE_TAG_NAMES)


def gradient_key(method: str, rank: int | None, tags: str | Iterable[str]) -> GradientKey:
    """What decides a configuration's gradients: method, BASIS's rank, and the tags that change them."""
    tags = tags.split(",") if isinstance(tags, str) else tags
    return method, rank if method == "basis" else None, frozenset(t for t in tags if t and _changes_gradients(t))


def frontier_key(meth: Mapping, rank: int) -> GradientKey:
    """A frontier method's key, from the method and tags the frontier recorded from its config."""
    return gradient_key(meth["method"], rank, meth["variant"])


def entry_key(entry: Mapping) -> GradientKey:
    """A grid configuration's key (summarize_settings's entry)."""
    return gradient_key(entry["method"], entry["rank"], entry["variant"])


def _cost(gap: Mapping) -> str:
    if gap["n"] < 2 or math.isnan(gap["ci_low"]):
        return f"{gap['mean']:+.3f}, n={gap['n']} (no CI)"
    return f"{gap['mean']:+.3f} [{gap['ci_low']:+.3f}, {gap['ci_high']:+.3f}], n={gap['n']}"


def methods_quality(res: Mapping, entries: Sequence[Mapping]) -> dict[str, str]:
    """Each frontier method's final-loss cost in words, from the grid configuration with its gradients."""
    rank = res["settings"]["rank"]
    # Only the main protocol's runs (the one most runs share, as grid_stats.reference_protocol): an SGD or
    # lr-scaled run has a method's gradients too, but its gap says nothing about this method's cost.
    weights = Counter()
    for e in entries:
        weights[e["protocol"]] += e["n"]
    main = weights.most_common(1)[0][0] if weights else None
    by_key: dict[GradientKey, list[Mapping]] = {}
    for e in entries:
        if e["protocol"] == main and e["gap"] is not None:
            by_key.setdefault(entry_key(e), []).append(e)
    out = {}
    for mid, meth in res["methods"].items():
        if "method" not in meth:  # refused by the config: nothing ran
            out[mid] = f"config refused: {meth.get('reason', '?')}"
            continue
        key = frontier_key(meth, rank)
        if mid == "exact":
            out[mid] = "reference"
        elif key == EXACT_KEY:
            out[mid] = "exact gradients"
        elif found := by_key.get(key):
            # a method run twice (compiled and eager, say): the more seeds, then the usual execution mode
            best = max(found, key=lambda e: (e["gap"]["n"], not set(e["variant"].split(",")) & MODE_TAG_NAMES))
            out[mid] = _cost(best["gap"])
        else:
            out[mid] = f"no quality run at R = {rank}" if key[0] == "basis" else "no quality run"
    return out


def _point(meth: Mapping) -> Mapping | None:
    r = meth.get("reference") if meth["status"] == "ok" else None
    ok = r and r["status"] == "ok" and r.get("peak_bytes") is not None and r.get("tokens_per_s") is not None
    return r if ok else None


def _size(res: Mapping) -> str:
    ref = res["settings"]["reference"]
    return f"B {ref['batch']} x T {ref['seq']:,}"


def methods_pareto_png(res: Mapping, quality: Mapping[str, str], path: str | Path | BinaryIO) -> list[str]:
    """Step peak against tokens/s at the reference size, a point per method measured there; returns the
    legend's texts ("label: quality")."""
    # no constrained layout: it would shrink the axes to make room for the legend beside them, which
    # savefig's tight bounding box keeps anyway
    fig = Figure(figsize=(7, 5), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (mid, meth) in enumerate(res["methods"].items()):  # frontier.png's colours: styles by position
        if (r := _point(meth)) is None:
            continue
        style = method_style(i)
        ax.plot([r["peak_bytes"] / GIB], [r["tokens_per_s"]], linestyle="none", color=style["color"],
                marker=style["marker"], markersize=9, label=f"{meth['label']}: {quality.get(mid, '-')}")
    ax.set_xlabel(f"step peak at {_size(res)} (GiB)")
    ax.set_ylabel("tokens/s (eager training step)")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.grid(True, alpha=0.3)
    meta = res["meta"]
    ax.set_title(f"Memory methods at {_size(res)}, {meta['gpu'] or meta['device']}\n{peak_words(meta)}", fontsize=10)
    legend_outside(ax, fontsize=8, title="method: final-loss cost vs exact (paired, 95% CI)", title_fontsize=8)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def methods_md(res: Mapping, quality: Mapping[str, str], runs: str | Path) -> str:
    meta, rank = res["meta"], res["settings"]["rank"]
    lines = [
        f"# Memory methods at {_size(res)}: memory, speed and final-loss cost", "",
        f"Frontier: `{meta['command']}` ({meta['gpu'] or meta['device']}, {meta['date']}); {meta['step']}.", "",
        f"Memory: {meta['peak']}.", "",
        "| method | step peak | saved for backward | offloaded | tokens/s | MFU | final-loss cost (paired, 95% CI) |",
        "|---|---|---|---|---|---|---|",
        *(md_row([meth["label"], *reference_cells(meth, meta["torch"]), quality.get(mid, "-")])
          for mid, meth in res["methods"].items()),
        "",
        (f"Final-loss cost: the final held-out loss minus exact's of the same seed, mean and 95% CI over the seeds, "
         f"from the quality runs in `{runs}` (their main protocol) with the method's gradients; the frontier's BASIS "
         f"rank is R = {rank}, so a BASIS method is read from runs at R = {rank}. Checkpointing and offload recompute "
         "or copy the tensors exact saves, so their gradients are exact's (\"exact gradients\"); with BASIS they "
         "are the BASIS run's of the same rank and layers. A run in another execution mode (not compiled, for the "
         "8-bit hooks) is paired with exact's run in that mode."),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    # argparse, not typer, as the other reports: the GPU machine's Python has no typer
    p = argparse.ArgumentParser(prog="python -m basis_train.reporting.methods", description=__doc__.split("\n\n")[0])
    p.add_argument("frontier", type=Path, help="the frontier's directory (experiments/frontier.py's --out)")
    p.add_argument("--runs", type=Path, required=True, help="the quality runs: run directories, directly or under runs/")
    p.add_argument("--out", type=Path, default=None, help="where pareto.png and methods.md go [default: FRONTIER]")
    a = p.parse_args(argv)
    if not (a.frontier / "frontier.json").is_file():
        p.error(f"no frontier.json in {a.frontier} (python -m basis_train.experiments.frontier --out DIR writes it)")
    if not a.runs.is_dir():
        p.error(f"--runs {a.runs}: no such directory")
    try:
        entries = summarize_settings(read_runs(run_dirs(a.runs)))
    except ValueError as e:
        p.error(str(e))
    res = json.loads((a.frontier / "frontier.json").read_text())
    quality = methods_quality(res, entries)
    out = a.out or a.frontier
    atomic_write_bytes(out / "pareto.png", lambda f: methods_pareto_png(res, quality, f))
    atomic_write_text(out / "methods.md", methods_md(res, quality, a.runs))
    print(f"wrote {out / 'pareto.png'} and {out / 'methods.md'}")


if __name__ == "__main__":
    main()
