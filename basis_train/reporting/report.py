"""Turn finished run directories into a results CSV, a seed-paired summary, markdown and plots.

Every comparison against the baseline is paired by seed: within a seed all methods share the
initial weights and batch order, so the seed-to-seed noise cancels in the difference and the
paired CI is much tighter than comparing two unpaired CIs (docs/paper.md section 3, items 1-2).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from basis_train.core.options import MEMORY_CATEGORIES as CATEGORIES
from basis_train.reporting.plotstyle import LINESTYLES, legend_below, legend_outside, series_style
from basis_train.reporting.stats import mean_ci, paired_diff

MEMORY_CATEGORIES: tuple[str, ...] = CATEGORIES
# activation_breakdown (summary.json) flattened to one column per category: act_<category>
BREAKDOWN_COLUMNS: tuple[str, ...] = tuple(f"act_{c}" for c in MEMORY_CATEGORIES)
RESULT_COLUMNS: tuple[str, ...] = (
    "method", "rank", "variant", "seed", "steps", "final_val_loss", "final_train_loss",
    "activation_bytes", "weight_cast_bytes", "step_peak_bytes", *BREAKDOWN_COLUMNS, "head", "head_kernel",
    "wall_s", "tokens_per_s", "val_protocol", "label",
)
MIB = 2 ** 20


def config_label(method: str, rank: int | None, variant: str | None = "") -> str:
    """'exact', 'basis R=32', 'basis R=8 [lam0]': one name per configuration, seed excluded."""
    label = method
    if rank is not None and method != "exact":
        label += f" R={rank}"
    if variant:
        label += f" [{variant}]"
    return label


def collect_runs(run_dirs: Iterable[str | Path]) -> list[dict]:
    """One row per finished run (a directory with summary.json); unfinished ones are skipped."""
    rows = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        path = run_dir / "summary.json"
        if not path.is_file():
            warnings.warn(f"skipping {run_dir}: no summary.json (run not finished?)", stacklevel=2)
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        row = {col: summary.get(col) for col in RESULT_COLUMNS if col != "label"}
        for cat, col in zip(MEMORY_CATEGORIES, BREAKDOWN_COLUMNS, strict=True):
            row[col] = (summary.get("activation_breakdown") or {}).get(cat)
        row["variant"] = row["variant"] or ""
        ran, asked = summary.get("rank"), summary.get("rank_requested")
        if row["method"] != "exact" and asked is not None and asked != ran:
            # R clamped to the rows of a step (training/setup.py): the configuration asked for, tagged
            row["rank"] = asked
            row["variant"] = ",".join(t for t in (row["variant"], f"ran R={ran}") if t)
        row["label"] = config_label(row["method"], row["rank"], row["variant"])
        row["run_dir"] = str(run_dir)
        rows.append(row)
    return rows


def write_results_csv(rows: Sequence[Mapping], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in RESULT_COLUMNS})


def _order_key(baseline: str, row: Mapping) -> tuple:
    # Baseline first, then exact variants, then BASIS from the largest rank down, as in Table 3.
    rank = row["rank"] if row["rank"] is not None else math.inf
    return (row["label"] != baseline, row["method"] != "exact", -rank, row["variant"])


def _normalise(row: Mapping) -> dict:
    # Rows may come from elsewhere than collect_runs; a diverged run may carry a null loss.
    row = dict(row)
    row["variant"] = row.get("variant") or ""
    row.setdefault("rank", None)
    row["label"] = row.get("label") or config_label(row["method"], row["rank"], row["variant"])
    if row.get("final_val_loss") is None:
        row["final_val_loss"] = math.nan
    return row


def _mean(values: Iterable) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs else None


def summarize(rows: Sequence[Mapping], baseline: str = "exact", level: float = 0.95) -> list[dict]:
    """Per-configuration statistics over seeds, with differences to `baseline` paired by seed.

    Raises ValueError when rows mix validation protocols or step counts (such numbers are not
    comparable) or when one configuration has two runs for the same seed (pairing is ambiguous).
    """
    for key in ("val_protocol", "steps"):
        seen = {r.get(key) for r in rows}
        if len(seen) > 1:
            raise ValueError(f"runs mix {key} values {sorted(map(str, seen))}: not comparable")
    rows = [_normalise(r) for r in rows]
    groups: dict[str, list[Mapping]] = {}
    for row in sorted(rows, key=lambda r: _order_key(baseline, r)):
        groups.setdefault(row["label"], []).append(row)
    by_seed: dict[str, dict] = {}
    for label, group in groups.items():
        seeds = [r["seed"] for r in group]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1})
        if dupes:
            raise ValueError(f"configuration '{label}' has several runs for seed(s) {dupes}")
        by_seed[label] = {r["seed"]: r for r in group}
    base = by_seed.get(baseline)
    base_act = _mean(r.get("activation_bytes") for r in base.values()) if base else None

    out = []
    for label, runs in by_seed.items():
        first = next(iter(runs.values()))
        val = mean_ci([r["final_val_loss"] for r in runs.values()], level)
        act = _mean(r.get("activation_bytes") for r in runs.values())
        entry = {
            "label": label, "method": first["method"], "rank": first["rank"],
            "variant": first["variant"], "baseline": baseline, "level": level, "n": val["n"],
            "seeds": sorted(runs),
            "val_mean": val["mean"], "val_std": val["std"],
            "val_ci_low": val["ci_low"], "val_ci_high": val["ci_high"],
            "train_mean": _mean(r.get("final_train_loss") for r in runs.values()),
            "act_bytes_mean": act,
            "act_ratio": act / base_act if act is not None and base_act else None,
            "act_breakdown_mean": {c: _mean(r.get(f"act_{c}") for r in runs.values()) for c in MEMORY_CATEGORIES},
            "weight_cast_bytes_mean": _mean(r.get("weight_cast_bytes") for r in runs.values()),
            "step_peak_bytes_mean": _mean(r.get("step_peak_bytes") for r in runs.values()),
            "tokens_per_s_mean": _mean(r.get("tokens_per_s") for r in runs.values()),
            "wall_s_mean": _mean(r.get("wall_s") for r in runs.values()),
            "diff_n": 0, "diff_mean": None, "diff_ci_low": None, "diff_ci_high": None,
            "p_value": None, "n_better": None,
        }
        common = sorted(set(runs) & set(base)) if base is not None and label != baseline else []
        if common:
            d = paired_diff([runs[s]["final_val_loss"] for s in common],
                            [base[s]["final_val_loss"] for s in common], level)
            entry.update(diff_n=d["n"], diff_mean=d["mean"], diff_ci_low=d["ci_low"],
                         diff_ci_high=d["ci_high"], p_value=d["p_value"], n_better=d["n_better"])
        out.append(entry)
    return out


def _fmt(x: float | None, digits: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "–"
    return "<0.0001" if p < 1e-4 else f"{p:.4f}"


def write_summary_md(summary: Sequence[Mapping], path: str | Path, title: str,
                     notes: Sequence[str] = (), paper_table: Mapping[str, float] | None = None,
                     ) -> None:
    """Markdown table, one row per configuration; Δ and ratio are relative to the baseline."""
    baseline = summary[0]["baseline"] if summary else "exact"
    ci = f"{100 * (summary[0]['level'] if summary else 0.95):g}% CI"
    header = ["configuration", "n", "val loss mean ± std", ci,
              f"Δ vs {baseline} (paired, {ci})", "p", "activation memory (MiB)",
              f"ratio to {baseline}", "step peak (MiB)"]
    if paper_table:
        header.append("paper val")
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for s in summary:
        if s["label"] == s["baseline"]:
            delta = "(baseline)"
        elif s["diff_n"]:
            delta = (f"{_fmt(s['diff_mean'], sign=True)} [{_fmt(s['diff_ci_low'], sign=True)}, "
                     f"{_fmt(s['diff_ci_high'], sign=True)}] (n={s['diff_n']}, "
                     f"better {s['n_better']}/{s['diff_n']})")
        else:
            delta = "no common seeds"
        act = s["act_bytes_mean"]
        cells = [
            s["label"], str(s["n"]),
            f"{_fmt(s['val_mean'])} ± {_fmt(s['val_std'])}",
            f"[{_fmt(s['val_ci_low'])}, {_fmt(s['val_ci_high'])}]",
            delta, _fmt_p(s["p_value"]),
            _fmt(act / MIB if act is not None else None, 3), _fmt(s["act_ratio"], 3),
            _fmt(s["step_peak_bytes_mean"] / MIB if s.get("step_peak_bytes_mean") is not None else None, 3),
        ]
        if paper_table:
            cells.append(_fmt(paper_table.get(s["label"]), 3))
        lines.append("| " + " | ".join(cells) + " |")
    footnote = (f"Δ = configuration − {baseline} on the same seeds; negative means lower "
                "validation loss. p: two-sided paired t-test. CIs use Student's t. Activation memory: "
                "bytes saved for backward over one training step, parameters and their casts excluded; "
                "step peak: CUDA allocator peak of a steady-state step above what the step began with "
                "(– on CPU). Definitions: basis_train/core/memory.py.")
    lines += ["", footnote]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def load_metrics(run_dir: str | Path) -> list[dict]:
    """Records of metrics.jsonl; a truncated last line (run killed mid-write) is dropped."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    return records


def _val_curve(run_dir: Path) -> dict[int, float]:
    curve = {}
    for rec in load_metrics(run_dir):
        v = rec.get("val_loss")
        if v is not None and "step" in rec and math.isfinite(float(v)):
            curve[int(rec["step"])] = float(v)
    return curve


def plot_val_curves(run_dirs_by_label: Mapping[str, Sequence[str | Path]], path: str | Path,
                    title: str = "Validation loss (mean over seeds, ±1 std)") -> Figure:
    """Mean val loss over seeds vs step, with a ±1 std band; only steps every seed reached."""
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (label, dirs) in enumerate(run_dirs_by_label.items()):
        curves = [_val_curve(Path(d)) for d in dirs]
        curves = [c for c in curves if c]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        stats = [mean_ci([c[s] for c in curves]) for s in steps]
        mean = [st["mean"] for st in stats]
        style = series_style(i)  # by position in the table, so a label keeps its style across plots
        (line,) = ax.plot(steps, mean, label=f"{label} (n={len(curves)})", color=style["color"],
                          linestyle=style["linestyle"], linewidth=1.4)
        if len(curves) > 1:
            std = [st["std"] for st in stats]
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    legend_outside(ax, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


_COLORS = {"head": "tab:red", "attention": "tab:orange", "mlp_hidden": "tab:green", "width_d": "tab:blue",
           "sketches": "tab:purple", "seeds": "tab:brown", "other": "tab:gray"}


# Grey lines for exact's configurations, apart from the coloured bars of the categories; the first four
# line styles in the order the committed memory plots drew them.
_REFERENCE_GREYS = ("black", "dimgray", "darkgray")
_REFERENCE_STYLES = ("-", "--", ":", "-.", *(s for s in LINESTYLES if s not in ("-", "--", ":", "-.")))


def reference_line_style(j: int) -> dict:
    """The j-th horizontal reference line's colour and line style, a pair no other line has (j < 18)."""
    n = len(_REFERENCE_STYLES)
    if j >= n * len(_REFERENCE_GREYS):
        raise ValueError(f"only {n * len(_REFERENCE_GREYS)} distinguishable reference lines; got line {j}")
    return {"color": _REFERENCE_GREYS[j // n], "linestyle": _REFERENCE_STYLES[j % n]}


def plot_memory(summary: Sequence[Mapping], path: str | Path, lines: Mapping[str, float] | None = None,
                title: str = "Activation memory vs R (saved for backward, mean over seeds)") -> Figure:
    """BASIS activation bytes vs R, stacked by category, one panel per BASIS variant; exact
    configurations (and `lines`, e.g. exact with checkpointing: label -> bytes) as horizontal lines."""
    basis = [s for s in summary if s["method"] != "exact" and s.get("act_bytes_mean") is not None]
    exact = {s["label"]: s["act_bytes_mean"] for s in summary
             if s["method"] == "exact" and s.get("act_bytes_mean") is not None}
    exact.update(lines or {})
    variants = sorted({s["variant"] for s in basis}) or [""]
    fig = Figure(figsize=(5.5 * len(variants), 4.5))
    FigureCanvasAgg(fig)
    for i, variant in enumerate(variants):
        ax = fig.add_subplot(1, len(variants), i + 1)
        entries = sorted((s for s in basis if s["variant"] == variant), key=lambda s: s["rank"])
        xs = list(range(len(entries)))
        bottom = [0.0] * len(entries)
        for cat in MEMORY_CATEGORIES:
            h = [((s.get("act_breakdown_mean") or {}).get(cat) or 0.0) / MIB for s in entries]
            if any(h):
                ax.bar(xs, h, bottom=bottom, color=_COLORS[cat], label=cat)
                bottom = [b + v for b, v in zip(bottom, h, strict=True)]
        for j, (label, nbytes) in enumerate(exact.items()):
            ax.axhline(nbytes / MIB, **reference_line_style(j), label=label)
        ax.set_xticks(xs, [f"R={s['rank']}" for s in entries])
        ax.set_xlabel("sketch rows R")
        ax.set_ylabel("activation memory (MiB)")
        ax.set_title(f"BASIS [{variant}]" if variant else "BASIS")
    # One legend for all panels, below them: inside a panel it covers the bars.
    legend_below(fig, fig.axes, ncol=4, fontsize=8)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
