"""The GPT-2-small scale report (issue 12), built from a grid's run directories alone.

Writes results.csv, summary.md (paired gaps to exact with CIs, memory, speed), val_loss.png,
pareto.png (step peak memory vs final validation loss) and corpus.md. Memory fields are read
under their current names (activation_bytes, step_peak_bytes) or the older ones.

    python -m basis_train.reporting.scale GRID_DIR --results results/scale --command "..."
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import typer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from basis_train.reporting.report import config_label, plot_val_curves, summarize

GIB = 2 ** 30
MIB = 2 ** 20
COLUMNS = ("label", "method", "rank", "variant", "sketch_layers", "lr", "seed", "steps", "final_val_loss",
           "final_train_loss", "activation_bytes", "step_peak_bytes", "tokens_per_s", "wall_s",
           "runs_per_gpu", "tokens_seen", "epoch", "run_dir")
_RENAMED = {"activation_bytes": "peak_activation_bytes", "step_peak_bytes": "cuda_peak_step_bytes"}


def load_rows(grid: Path) -> tuple[list[dict], list[dict]]:
    """(one row per finished run, the summaries) under grid/runs/*/summary.json."""
    rows, summaries = [], []
    for path in sorted(Path(grid).glob("runs/*/summary.json")):
        s = json.loads(path.read_text(encoding="utf-8"))
        row = {k: s.get(k) for k in COLUMNS}
        for new, old in _RENAMED.items():
            row[new] = s.get(new, s.get(old))
            row[old] = row[new]  # report.summarize reads the old names
        row["variant"] = row["variant"] or ""
        row["runs_per_gpu"] = s.get("runs_per_gpu", 1)  # absent: written before basis-compare shared GPUs
        row["label"] = config_label(row["method"], row["rank"], row["variant"])
        row["run_dir"] = str(path.parent)
        row["val_protocol"] = s.get("val_protocol")
        rows.append(row)
        summaries.append(s)
    if not rows:
        raise ValueError(f"no finished runs under {Path(grid) / 'runs'}")
    return rows, summaries


def timed_rows(rows: Sequence[Mapping]) -> list[dict]:
    """The rows for the statistics, with the speed of runs that shared their GPU (runs_per_gpu > 1)
    left out: their tokens/s measures the sharing, not the configuration. Losses and memory stay."""
    return [{**r, "tokens_per_s": None, "wall_s": None} if (r.get("runs_per_gpu") or 1) > 1 else dict(r)
            for r in rows]


def write_csv(rows: Sequence[Mapping], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})


def _f(x, fmt: str = ".4f", sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, ("+" if sign else "") + fmt)


def _gap(s: Mapping) -> str:
    if s["label"] == s["baseline"]:
        return "(baseline)"
    if not s["diff_n"]:
        return "no common seeds"
    if s["diff_n"] < 2:
        return f"{_f(s['diff_mean'], sign=True)} (1 seed, no CI)"
    return (f"{_f(s['diff_mean'], sign=True)} [{_f(s['diff_ci_low'], sign=True)}, "
            f"{_f(s['diff_ci_high'], sign=True)}] ({s['n_better']}/{s['diff_n']} better)")


def summary_md(summary: Sequence[Mapping], rows: Sequence[Mapping], title: str) -> str:
    lines = [f"# {title}", "",
             "| configuration | seeds | val loss mean ± std | Δ vs exact, paired (95% CI) | p "
             "| activation MiB | step peak GiB | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        step_peak = s.get("step_peak_bytes_mean")
        lines.append(
            f"| {s['label']} | {s['n']} | {_f(s['val_mean'])} ± {_f(s['val_std'])} | {_gap(s)} | "
            f"{_f(s['p_value'])} | {_f(s['act_bytes_mean'] and s['act_bytes_mean'] / MIB, '.1f')} | "
            f"{_f(step_peak and step_peak / GIB, '.2f')} | {_f(s['tokens_per_s_mean'], ',.0f')} |")
    lines += ["", "Δ = configuration − exact on the same seeds (same initial weights and batches); negative "
              "means lower validation loss. CIs: Student's t over seeds. Activation: bytes saved for "
              "backward by one training step; step peak: CUDA memory peak of one step above the "
              "allocations before it; tokens/s: mean over the evaluation intervals, over the runs that had "
              "their GPU to themselves (results.csv: runs_per_gpu = 1)."]
    lr = _lr_table(rows)
    if lr:
        lines += ["", "## Learning-rate sensitivity (seed 0, final validation loss)", ""] + lr
    epochs = sorted({r["epoch"] for r in rows if r.get("epoch") is not None})
    seen = [r["tokens_seen"] for r in rows if r.get("tokens_seen") is not None]
    lines += ["", f"Single pass: epoch at the end of every run {epochs or '(not recorded)'}"
              + (f"; tokens seen per run {min(seen):,}–{max(seen):,}." if seen else ".")]
    if any(e != 0 for e in epochs):
        lines.append("**Some runs saw training tokens twice (epoch > 0): not a single-pass grid.**")
    return "\n".join(lines) + "\n"


def _lr_factor(variant: str) -> float | None:
    """'lr0.5x' -> 0.5; '' -> 1.0; any other tag ('ckpt', 'layers=all') -> None."""
    tags = [t for t in variant.split(",") if t]
    lr = [t for t in tags if t.startswith("lr") and t.endswith("x")]
    rest = [t for t in tags if t not in lr]
    if rest:
        return None
    return float(lr[0][2:-1]) if lr else 1.0


def _lr_table(rows: Sequence[Mapping]) -> list[str]:
    """Rows: exact and each BASIS config that has lr variants; columns: lr factors; seed 0 only."""
    cells: dict[str, dict[float, float]] = {}
    for r in rows:
        factor = _lr_factor(r["variant"])
        if r["seed"] != 0 or factor is None:
            continue
        cells.setdefault(config_label(r["method"], r["rank"]), {})[factor] = r["final_val_loss"]
    cells = {k: v for k, v in cells.items() if len(v) > 1}
    if not cells:
        return []
    factors = sorted({f for v in cells.values() for f in v})
    out = ["| configuration | " + " | ".join(f"lr x {f:g}" for f in factors) + " |",
           "|---|" + "---|" * len(factors)]
    for label, v in sorted(cells.items(), key=lambda kv: kv[0] != "exact"):
        out.append(f"| {label} | " + " | ".join(_f(v.get(f)) for f in factors) + " |")
    return out


def pareto_points(summary: Sequence[Mapping], key: str) -> list[Mapping]:
    """The configurations pareto.png shows: those with a `key` figure, learning-rate check left out
    (it has its own table; its points would sit on their configuration's)."""
    return [s for s in summary if s.get(key) is not None and _lr_factor(s.get("variant") or "") in (None, 1.0)]


def plot_pareto(summary: Sequence[Mapping], path: Path) -> None:
    """One point per configuration: step peak (or activation bytes off CUDA) vs final val loss."""
    have_peak = all(s.get("step_peak_bytes_mean") for s in summary)
    key, xlabel = (("step_peak_bytes_mean", "CUDA step peak memory (GiB)") if have_peak
                   else ("act_bytes_mean", "activation bytes saved for backward (GiB; no CUDA step peak)"))
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s in pareto_points(summary, key):
        x, y = s[key] / GIB, s["val_mean"]
        err = None
        if s["n"] > 1 and s["val_ci_high"] is not None and not math.isnan(s["val_ci_high"]):
            err = [[y - s["val_ci_low"]], [s["val_ci_high"] - y]]
        ax.errorbar([x], [y], yerr=err, fmt="o", capsize=3)
        tok = s.get("tokens_per_s_mean")
        ax.annotate(f"{s['label']}\n{tok:,.0f} tok/s" if tok else s["label"], (x, y),
                    textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final validation loss (mean over seeds, 95% CI)")
    ax.set_title("Memory vs loss per configuration")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "–"


def corpus_md(summaries: Sequence[Mapping], command: str) -> str:
    data = summaries[0].get("data") or {}
    for s in summaries[1:]:  # every run must have trained and validated on the same split
        other = s.get("data") or {}
        if {k: other.get(k) for k in ("n_train_tokens", "n_val_tokens", "source")} != \
                {k: data.get(k) for k in ("n_train_tokens", "n_val_tokens", "source")}:
            raise ValueError("runs of this grid used different data splits: not comparable")
    c = data.get("corpus") or {}
    lines = ["# Corpus of the scale grid", "", f"Source: {data.get('source', '–')}", "",
             "| quantity | value |", "|---|---|"]
    table = [("files matched", c.get("n_files_matched")), ("files used (distinct, UTF-8, non-empty)",
             c.get("n_files_used")), ("bytes used", c.get("bytes_used")),
             ("duplicates dropped (identical bytes)", c.get("n_duplicates")),
             ("skipped: unreadable / non-UTF-8 / binary / empty",
              " / ".join(str(c.get(k, "–")) for k in ("n_unreadable", "n_not_utf8", "n_binary", "n_empty"))
              if c else None),
             ("documents", data.get("n_docs")), ("how files became documents", c.get("documents")),
             ("tokens (GPT-2 BPE, one end-of-text per document)", c.get("n_tokens")),
             ("validation", f"every {data.get('heldout_every')}-th document held out, evaluated in full"
              if data.get("protocol") == "heldout" else data.get("protocol")),
             ("train documents / tokens", f"{_n(data.get('n_train_docs'))} / {_n(data.get('n_train_tokens'))}"),
             ("validation documents / tokens", f"{_n(data.get('n_val_docs'))} / {_n(data.get('n_val_tokens'))}")]
    for name, value in table:
        if value is not None:
            lines.append(f"| {name} | {value:,} |" if isinstance(value, int) else f"| {name} | {value} |")
    if c.get("bytes_used") and c.get("n_tokens"):
        lines.append(f"| bytes per token | {c['bytes_used'] / c['n_tokens']:.2f} |")
    lines += ["", "Produced by:", "", "```", command or "(command not given)", "```"]
    return "\n".join(lines) + "\n"


def write_report(grid: Path, results: Path, command: str = "") -> list[dict]:
    rows, summaries = load_rows(grid)
    results.mkdir(parents=True, exist_ok=True)
    write_csv(rows, results / "results.csv")
    summary = summarize(timed_rows(rows))
    title = f"BASIS at GPT-2 small ({len(rows)} runs)"
    (results / "summary.md").write_text(summary_md(summary, rows, title), encoding="utf-8")
    by_label: dict[str, list[Path]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(Path(r["run_dir"]))
    plot_val_curves(by_label, results / "val_loss.png")
    plot_pareto(summary, results / "pareto.png")
    (results / "corpus.md").write_text(corpus_md(summaries, command), encoding="utf-8")
    return summary


def main(grid: Path = typer.Argument(..., help="grid directory holding runs/*/summary.json"),
         results: Path = typer.Option(Path("runs/scale-report"), help="where the report files go"),
         command: str = typer.Option("", help="the command that produced the grid, quoted in corpus.md")):
    """Write results.csv, summary.md, val_loss.png, pareto.png and corpus.md for a scale grid."""
    try:
        write_report(grid, results, command)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    print(f"wrote {results}/summary.md")


if __name__ == "__main__":
    typer.run(main)
