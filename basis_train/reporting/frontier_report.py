"""The memory frontier's report (experiments/frontier.py's results): a table per budget, and a figure of
the largest batch and the longest context against the budget, one series per method."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import BinaryIO

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from basis_train.fsutil import atomic_write_bytes, atomic_write_text
from basis_train.reporting.plotstyle import COLORS, legend_below, series_style
from basis_train.torch_floor import counts_selective_cache

GIB = 2**30
DPI = 120
# The frontier has more methods than plotstyle has colours: the ones past them get colours and markers of
# their own, so that no two series share a colour.
EXTRA_STYLES = (("black", "h"), ("gold", "p"), ("navy", "d"), ("lime", "8"))
AXES = {"batch": ("largest batch", "batch size (sequences of {seq:,} tokens)", "largest batch at T = {seq:,}"),
        "context": ("longest context", "context length (tokens)", "longest context at batch {batch}")}


def budget_key(gib: float) -> str:
    """A budget's key in frontier.json: "8", "0.5"."""
    return f"{gib:g}"


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f} GiB" if x >= 0.1 * GIB else f"{x / 2**20:.2f} MiB"


def size_cell(r: dict | None, spec: dict) -> str:
    """The answer of one search, in words: the size, or why there is none or why it is a bound."""
    if r is None:
        return "-"
    if not r["best"]:
        return "nothing fits"
    text = f"{r['best']:,}"
    if r["capped"]:
        text += f" (the search cap, {spec['cap']:,}: more may fit)"
    elif r["exhausted"]:
        text = f"at least {text} (probe limit reached)"
    if "host-memory" in r.get("stopped_by", []):
        text += " (limited by host memory for the offloaded copies)"
    if r.get("timed_status", "ok") != "ok":
        text += f" (the timed rerun: {r['timed_status']})"
    return text


def _speed(r: dict | None) -> str:
    tps = (r or {}).get("tokens_per_s")
    return "-" if tps is None else f"{tps:,.0f}"


def method_style(i: int) -> dict:
    """The i-th method's style: plotstyle's (colour, line style, marker), a colour no other method has."""
    style = series_style(i)
    if i >= len(COLORS):
        style["color"], style["marker"] = EXTRA_STYLES[(i - len(COLORS)) % len(EXTRA_STYLES)]
    return style


def md_row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def reference_cells(meth: dict, torch_version: str) -> list[str]:
    """A method at the reference size: step peak, saved for backward, offloaded, tokens/s, MFU (or why not).
    `torch_version`: the frontier's, which decides whether a selective checkpoint's cache was counted."""
    r = meth.get("reference")
    if meth["status"] != "ok" or not r:
        return [meth["status"] if meth["status"] != "ok" else "not measured", "", "", "", ""]
    if r["status"] != "ok":
        return [r["status"], "", "", "", ""]
    mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
    saved = _gib(r.get("activation_bytes"))
    if meth.get("overrides", {}).get("model.checkpoint_policy") == "selective" and not counts_selective_cache(torch_version):
        saved += f" + its cache, not counted under torch {torch_version}"
    return [_gib(r["peak_bytes"]), saved, _gib(r.get("offloaded_bytes") or None), _speed(r), mfu]


def peak_words(meta: dict) -> str:
    """What the frontier's peak is, for a figure's title."""
    if meta["peak_kind"] == "cuda_max_memory_allocated":
        return "CUDA allocator peak"
    return "CPU estimate of the peak (saved tensors + parameters, gradients, optimiser state), not an allocator peak"


def _axis(m: dict, axis: str, key: str) -> dict | None:
    return ((m.get(axis) or {}).get("per_budget") or {}).get(key)


def _setting(res: dict, axis: str) -> dict:
    return res["settings"]["axes"][axis]


def frontier_md(res: dict) -> str:
    m, s = res["meta"], res["settings"]
    b, c = _setting(res, "batch"), _setting(res, "context")
    model = m["model"]
    lines = [
        "# Memory frontier: the largest batch and the longest context under a fixed memory budget", "",
        f"`{m['command']}`", "",
        f"{m['gpu'] or m['device']}, torch {m['torch']}, CUDA {m['cuda']}, {m['date']}.", "",
        (f"Model: {s['config']}'s ({model['arch']} architecture, width {model['n_embd']}, {model['n_layer']} layers, "
         f"{model['n_head']} heads, vocabulary {model['vocab_size']:,}, {model['head']} head); {m['dtype']}; "
         f"{m['optimizer']}; {m['step']} (no torch.compile, no CUDA graph); BASIS rank R = {s['rank']}."), "",
        f"Memory: {m['peak']}.", "",
        (f"A method fits a budget at a size when its training step's memory is at most the budget and no step ran "
         f"out of memory. Largest batch: at context {b['seq']:,}, batch sizes up to {b['cap']:,}. Longest context: "
         f"at batch {c['batch']}, multiples of {c['step']:,} tokens up to {c['cap']:,} (the position table grows "
         "with it). Each search starts where a line through the peaks measured so far meets the budget, gallops "
         "outward to a size that fits and one that does not, then bisects; tokens/s is the median of "
         f"{s['timed_steps']} timed step(s) at the answer. Probes: sizes the search asked about (batch + context)."),
    ]
    if m.get("host_limit_bytes"):
        lines += ["", f"Offload is not run at sizes that would pin more than {_gib(m['host_limit_bytes'])} of host "
                      "memory (predicted from the bytes per token smaller sizes pinned; --host-limit-gib, by default half "
                      "of the host memory available at the start): such a size counts as not fitting."]
    if ref := s.get("reference"):
        lines += ["", f"## Every method at B {ref['batch']} x T {ref['seq']:,}", "",
                  "| method | step peak | saved for backward | offloaded to host | tokens/s | MFU |", "|---|---|---|---|---|---|"]
        lines += [md_row([meth["label"], *reference_cells(meth, m["torch"])]) for meth in res["methods"].values()]
    for gib in res["budgets_gib"]:
        key = budget_key(gib)
        lines += ["", f"## {key} GiB", "",
                  f"| method | largest batch at T = {b['seq']:,} | tokens/s | peak | longest context at batch "
                  f"{c['batch']} | tokens/s | peak | probes |", "|---|---|---|---|---|---|---|---|"]
        for meth in res["methods"].values():
            if meth["status"] != "ok":
                why = (meth.get("reason") or meth.get("error") or "?").splitlines()[0].replace("|", "\\|")
                lines.append(f"| {meth['label']} | {meth['status']}: {why} | | | | | | |")
                continue
            rb, rc = _axis(meth, "batch", key), _axis(meth, "context", key)
            probes = " + ".join(str(r["probes"]) if r else "-" for r in (rb, rc))
            lines.append(f"| {meth['label']} | {size_cell(rb, b)} | {_speed(rb)} | {_gib((rb or {}).get('peak_bytes'))} "
                         f"| {size_cell(rc, c)} | {_speed(rc)} | {_gib((rc or {}).get('peak_bytes'))} | {probes} |")
    return "\n".join(lines) + "\n"


def frontier_png(res: dict, f: BinaryIO) -> None:
    """Two panels, budget on x: the largest batch and the longest context; a method's point is left
    out where nothing fits."""
    fig = Figure(figsize=(12, 5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    budgets = res["budgets_gib"]
    for ax, axis in zip(axes, AXES, strict=True):
        spec = _setting(res, axis)
        _, ylabel, title = AXES[axis]
        for i, meth in enumerate(res["methods"].values()):  # styles by position: stable across budgets
            pts = [(g, r["best"]) for g in budgets if (r := _axis(meth, axis, budget_key(g))) and r["best"]]
            if meth["status"] == "ok" and pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=meth["label"], markersize=6, linewidth=1.5, **method_style(i))
        ax.axhline(spec["cap"], color="0.5", linewidth=0.8, linestyle=(0, (2, 4)), label="search cap")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(budgets, [f"{g:g}" for g in budgets])
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("memory budget (GiB)")
        ax.set_ylabel(ylabel.format(**spec))
        ax.set_title(title.format(**spec))
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(f"Memory frontier, {res['meta']['gpu'] or res['meta']['device']}: {peak_words(res['meta'])}",
                 fontsize=10)
    legend_below(fig, axes, ncol=3, fontsize=8)
    fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")


def write_report(out: Path, res: dict) -> None:
    """OUT/frontier.md and OUT/frontier.png from a frontier's results."""
    atomic_write_text(out / "frontier.md", frontier_md(res))
    atomic_write_bytes(out / "frontier.png", lambda f: frontier_png(res, f))


def main(argv: list[str] | None = None) -> None:
    """`python -m basis_train.reporting.frontier_report DIR`: DIR's frontier.md and frontier.png written again
    from its frontier.json, as this version of the report writes them (no probe runs)."""
    p = argparse.ArgumentParser(prog="python -m basis_train.reporting.frontier_report", description=main.__doc__)
    p.add_argument("frontier", type=Path, help="the frontier's directory (experiments/frontier.py's --out)")
    a = p.parse_args(argv)
    if not (a.frontier / "frontier.json").is_file():
        p.error(f"no frontier.json in {a.frontier} (python -m basis_train.experiments.frontier --out DIR writes it)")
    write_report(a.frontier, json.loads((a.frontier / "frontier.json").read_text()))
    print(f"wrote {a.frontier / 'frontier.md'} and {a.frontier / 'frontier.png'}")


if __name__ == "__main__":
    main()
