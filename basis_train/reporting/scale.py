"""The GPT-2-small scale report (issues 12 and 25), built from a grid's run directories alone.

Writes results.csv (one row per run), summary.md (paired gaps to exact with CIs at the final step
and at every evaluation, memory, speed, the lr tables), val_loss.png, gap_vs_step.png, pareto.png,
memory.png and corpus.md. Configurations and their baselines: grid_stats.py.

    python -m basis_train.reporting.scale GRID_DIR --results results/scale --command "..."

GRID_DIR holds run directories (each with summary.json and metrics.jsonl), directly or under runs/.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from basis_train.reporting.grid_stats import (
    Protocol,
    RunRecord,
    label,
    read_runs,
    reference_protocol,
    summarize_settings,
)
from basis_train.reporting.report import config_label
from basis_train.reporting.step_equivalent import equivalence_table

GIB = 2 ** 30
MIB = 2 ** 20
COLUMNS = ("label", "method", "rank", "variant", "sketch_layers", "optimizer", "lr", "lr_factor", "steps",
           "data_order", "stream_fraction", "seed", "final_val_loss", "final_train_loss", "activation_bytes",
           "step_peak_bytes", "tokens_per_s", "mfu", "wall_s", "gpu", "runs_per_gpu", "tokens_seen", "epoch", "run_dir")


def run_dirs(grid: Path) -> list[Path]:
    grid = Path(grid)
    found = sorted(p.parent for p in grid.glob("runs/*/summary.json")) or \
        sorted(p.parent for p in grid.glob("*/summary.json"))
    if not found:
        raise ValueError(f"no finished runs (*/summary.json) under {grid} or {grid / 'runs'}")
    return found


def csv_rows(runs: Sequence[RunRecord], ref: Protocol) -> list[dict]:
    rows = []
    for r in sorted(runs, key=lambda r: (label(r.setting, ref), r.seed)):
        s, p = r.summary, r.setting.protocol
        rows.append({**{k: s.get(k) for k in COLUMNS}, "label": label(r.setting, ref), "variant": s.get("variant") or "",
                     "lr_factor": p.lr_factor, "data_order": p.data_order, "runs_per_gpu": s.get("runs_per_gpu", 1),
                     "run_dir": str(r.run_dir)})
    return rows


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


def _gap_cell(g: Mapping | None, digits: int = 4) -> str:
    fmt = f".{digits}f"
    if not g or not g["n"]:
        return "–"
    if g["n"] < 2:
        return f"{_f(g['mean'], fmt, True)} (1 seed)"
    return f"{_f(g['mean'], fmt, True)} [{_f(g['ci_low'], fmt, True)}, {_f(g['ci_high'], fmt, True)}]"


def _gap(e: Mapping) -> str:
    if e["setting"].is_baseline:
        return "(baseline)"
    if e["setting"].baseline.tags:  # paired with exact in its own execution mode, not the usual exact
        return _gap_vs(e) + f" vs {e['baseline_label']}"
    return _gap_vs(e)


def _gap_vs(e: Mapping) -> str:
    if not e["has_baseline"]:
        return f"no baseline ({e['baseline_label']} not run)"
    g = e["gap"]
    if not g:
        return "no common seeds"
    if g["n"] < 2:
        return f"{_f(g['mean'], sign=True)} (1 seed, no CI)"
    return f"{_gap_cell(g)} ({g['n_better']}/{g['n']} better)"


def main_table(entries: Sequence[Mapping]) -> list[str]:
    lines = ["| configuration | seeds | val loss mean ± std | Δ vs exact, paired (95% CI) | p "
             "| activation MiB | step peak GiB | tokens/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        peak, act, mfu, g = e["step_peak_bytes_mean"], e["act_bytes_mean"], e["mfu_mean"], e["gap"]
        lines.append(
            f"| {e['label']} | {e['n']} | {_f(e['val_mean'])} ± {_f(e['val_std'])} | {_gap(e)} | "
            f"{_f(g['p_value'] if g else None)} | {_f(act and act / MIB, '.1f')} | {_f(peak and peak / GIB, '.2f')} | "
            f"{_f(e['tokens_per_s_mean'], ',.0f')} | {_f(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} |")
    return lines


def gpu_table(entries: Sequence[Mapping]) -> list[str]:
    """Step peak, tokens/s and MFU per configuration and GPU, where the grid ran on more than one."""
    gpus = sorted({g for e in entries for g in e.get("by_gpu", {}) if g}, key=lambda g: g != entries[0]["gpu"])
    if len(gpus) < 2:
        return []
    lines = ["", "## Speed and step peak by GPU", "",
             "| configuration | GPU | runs | step peak GiB | tokens/s | MFU |", "|---|---|---|---|---|---|"]
    for e in entries:
        for g in gpus:
            d = e["by_gpu"].get(g)
            if d:
                peak, mfu = d["step_peak_bytes_mean"], d["mfu_mean"]
                lines.append(f"| {e['label']} | {g} | {d['n']} | {_f(peak and peak / GIB, '.2f')} | "
                             f"{_f(d['tokens_per_s_mean'], ',.0f')} | {_f(mfu and 100 * mfu, '.1f')}{'%' if mfu else ''} |")
    return lines


def gap_tables(entries: Sequence[Mapping]) -> list[str]:
    """Per protocol: rows = evaluation steps, columns = its configurations' paired gaps to exact."""
    out = []
    protocols = [e["protocol"] for e in entries if e["gap_curve"]]
    for p in dict.fromkeys(protocols):  # in table order
        cols = [e for e in entries if e["protocol"] == p and e["gap_curve"]]
        base = next(e["label"] for e in entries if e["protocol"] == p and e["setting"].is_baseline)
        steps = sorted(set().union(*(e["gap_curve"] for e in cols)))
        out += ["", f"### Gap to {base} ({_describe(p)})", "",
                "| step | " + " | ".join(e["label"] for e in cols) + " |", "|---|" + "---|" * len(cols)]
        for step in steps:
            out.append(f"| {step:,} | " + " | ".join(_gap_cell(e["gap_curve"].get(step), 3) for e in cols) + " |")
    return out


def _describe(p: Protocol) -> str:
    lr = f"lr {p.lr * p.lr_factor:.3g}" + (f" = {p.lr_factor:g} x {p.lr:g}" if p.lr_factor != 1 else "")
    return f"{p.optimizer}, {lr}, {p.steps:,} steps, {p.data_order} order"


def lr_tables(entries: Sequence[Mapping]) -> list[str]:
    """Seed 0's final loss over the effective lr (lr x lr factor), one table per optimiser and length
    that was run at more than one lr; a BASIS cell adds its gap to exact at the same lr."""
    out = []
    families: dict[tuple, list[Mapping]] = {}
    for e in entries:
        if 0 in e["final"]:
            p = e["protocol"]
            families.setdefault((p.optimizer, p.steps, p.data_order), []).append(e)
    for (opt, steps, order), fam in sorted(families.items()):
        lrs = sorted({e["protocol"].lr * e["protocol"].lr_factor for e in fam})
        if len(lrs) < 2:
            continue
        cells: dict[tuple, dict[float, str]] = {}
        exact = {e["protocol"].lr * e["protocol"].lr_factor: e["final"][0] for e in fam if e["setting"].is_baseline}
        for e in fam:
            s, lr = e["setting"], e["protocol"].lr * e["protocol"].lr_factor
            if s.method == "exact" and not s.is_baseline:
                continue  # checkpointing and the like: their own rows in the main table
            v = e["final"][0]
            text = _f(v) + (f" ({_f(v - exact[lr], '.3f', True)})" if not s.is_baseline and lr in exact else "")
            cells.setdefault((s.method != "exact", -(s.rank or 0), s.tags, _row_name(s)), {})[lr] = text
        best = min(exact, key=exact.get) if exact else None
        out += ["", f"### {opt}, {steps:,} steps, {order} order: final validation loss of seed 0 by lr", "",
                "| configuration | " + " | ".join(f"lr {lr:.3g}" + (" (exact's best)" if lr == best else "")
                                                 for lr in lrs) + " |",
                "|---|" + "---|" * len(lrs)]
        for key in sorted(cells):
            out.append(f"| {key[3]} | " + " | ".join(cells[key].get(lr, "–") for lr in lrs) + " |")
        out.append("")
        out.append("BASIS cells: (gap to exact at the same lr, seed 0).")
    return out


def _row_name(s) -> str:
    return config_label(s.method, s.rank, s.tags)


def summary_md(entries: Sequence[Mapping], runs: Sequence[RunRecord], title: str, diverged: Sequence[str] = ()) -> str:
    ref = reference_protocol(runs)
    lines = [f"# {title}", "", f"Reference protocol (labels name departures from it): {_describe(ref)}.", "",
             *main_table(entries), "",
             "Δ = configuration − exact of the same protocol (optimiser, lr, lr factor, steps, data order) on the "
             "same seeds (same initial weights and batches); negative means lower validation loss. CIs: Student's "
             "t over seeds (paired). Activation: bytes saved for backward by one training step; step peak: CUDA "
             "memory peak of one step above the allocations before it; tokens/s and MFU: means over the runs that "
             "had their GPU to themselves (results.csv: runs_per_gpu = 1)"
             + (f"; step peak, tokens/s and MFU: the runs on {entries[0]['gpu']}, the GPU most runs used."
                if entries and entries[0].get("gpu") else "."),
             *gpu_table(entries), "",
             "## Paired gap to exact at every evaluation (95% CI over seeds)", *gap_tables(entries),
             *equivalence_table(entries)]
    lr = lr_tables(entries)
    if lr:
        lines += ["", "## Learning-rate sensitivity", *lr]
    summaries = [r.summary for r in runs]
    epochs = sorted({s["epoch"] for s in summaries if s.get("epoch") is not None})
    orders = sorted({r.setting.protocol.data_order for r in runs})
    frac = [s["stream_fraction"] for s in summaries if s.get("stream_fraction") is not None]
    lines += ["", f"Data order: {', '.join(orders)}. Epoch at the end of every run: {epochs or '(not recorded)'}"
              + (f"; fraction of the training stream seen per run: {min(frac):.3f}–{max(frac):.3f}." if frac else ".")]
    if any(e != 0 for e in epochs):
        lines.append("**Some runs saw training tokens twice (epoch > 0): not a single-pass grid.**")
    if diverged:
        lines += ["", f"Diverged (non-finite training loss, no final loss, left out above): {', '.join(diverged)}."]
    return "\n".join(lines) + "\n"


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "–"


def corpus_md(summaries: Sequence[Mapping], command: str) -> str:
    keys = ("n_train_tokens", "n_val_tokens", "source")
    data = summaries[0].get("data") or {}
    for s in summaries[1:]:  # every run must have trained and validated on the same split
        if {k: (s.get("data") or {}).get(k) for k in keys} != {k: data.get(k) for k in keys}:
            raise ValueError("runs of this grid used different data splits: not comparable")
    c = data.get("corpus") or {}
    lines = ["# Corpus of the scale grid", "", f"Source: {data.get('source', '–')}", "",
             "| quantity | value |", "|---|---|"]
    orders = sorted({s.get("data_order") or "not recorded" for s in summaries})
    frac = [s["stream_fraction"] for s in summaries if s.get("stream_fraction") is not None]
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
             ("train chunks (block_size + 1 tokens each)", data.get("n_train_chunks")),
             ("validation documents / tokens", f"{_n(data.get('n_val_docs'))} / {_n(data.get('n_val_tokens'))}"),
             ("order of the training chunks", ", ".join(orders)),
             ("fraction of the training stream a run saw",
              f"{min(frac):.3f}–{max(frac):.3f}" if frac else None)]
    for name, value in table:
        if value is not None:
            lines.append(f"| {name} | {value:,} |" if isinstance(value, int) else f"| {name} | {value} |")
    if c.get("bytes_used") and c.get("n_tokens"):
        lines.append(f"| bytes per token | {c['bytes_used'] / c['n_tokens']:.2f} |")
    lines += ["", "Produced by:", "", "```", command or "(command not given)", "```"]
    return "\n".join(lines) + "\n"


def write_report(grid: Path, results: Path, command: str = "") -> list[dict]:
    from basis_train.reporting.report import plot_memory
    from basis_train.reporting.scale_plots import plot_gap_vs_step, plot_pareto, plot_val_loss

    runs = read_runs(run_dirs(grid))
    ref = reference_protocol(runs)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    write_csv(csv_rows(runs, ref), results / "results.csv")
    entries = summarize_settings(runs)
    title = f"BASIS at GPT-2 small ({len(runs)} runs)"
    # written by the grid driver for a run stopped by a non-finite loss (experiments/grid_state.py)
    diverged = sorted(p.parent.name for p in [*Path(grid).glob("*/diverged.json"), *Path(grid).glob("runs/*/diverged.json")])
    (results / "summary.md").write_text(summary_md(entries, runs, title, diverged), encoding="utf-8")
    plot_val_loss(entries, ref, results / "val_loss.png")
    plot_gap_vs_step(entries, ref, results / "gap_vs_step.png")
    main = [e for e in entries if e["protocol"] == ref]
    plot_pareto(main, results / "pareto.png")
    plot_memory(main, results / "memory.png")
    (results / "corpus.md").write_text(corpus_md([r.summary for r in runs], command), encoding="utf-8")
    return entries


def main(argv: list[str] | None = None) -> int:
    # argparse, not typer: the GPU machine's Python writes this report too and has no typer.
    ap = argparse.ArgumentParser(prog="python -m basis_train.reporting.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("grid", type=Path, help="directory of run directories (or holding runs/)")
    ap.add_argument("--results", type=Path, default=Path("runs/scale-report"), help="where the report files go")
    ap.add_argument("--command", default="", help="the command that produced the grid, quoted in corpus.md")
    args = ap.parse_args(argv)
    try:
        write_report(args.grid, args.results, args.command)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.results}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
