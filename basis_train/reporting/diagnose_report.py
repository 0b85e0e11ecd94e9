"""Reporting for basis-diagnose: the CSV files, the markdown summary with findings written
from the measured numbers, and the error / norm-ratio plots."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass(frozen=True)
class Variant:
    hashing: str
    scalars: bool
    lam: float


DEFAULT_RANKS = "1,4,8,16,32,64,rows"  # 'rows': batch x sequence, the sketch that keeps every row
VARIANTS: dict[str, Variant] = {
    "basis": Variant("balanced", True, 0.01),  # the paper's estimator
    "lam0": Variant("balanced", True, 0.0),
    "no-scalars": Variant("balanced", False, 0.01),
    "unbiased": Variant("balanced", False, 0.0),
    "uniform": Variant("uniform", True, 0.01),
    "gaussian": Variant("gaussian", True, 0.01),
    "gaussian-unbiased": Variant("gaussian", False, 0.0),
}


def findings(overall: list[dict], rows: int) -> list[str]:
    """Sentences read off the measured overall numbers; no claim here is fixed in advance."""
    t = {(r["variant"], r["rank"]): r for r in overall}
    have, ranks = list(dict.fromkeys(r["variant"] for r in overall)), sorted({r["rank"] for r in overall})
    sub = [r for r in ranks if r < rows] or ranks
    lo, mid, at_rows = ranks[0], (8 if 8 in sub else sub[len(sub) // 2]), rows in ranks

    def m(v, r, key="rel_err_mean"):
        return t[(v, r)][key]

    def where(test, show=lambda v, rs: "") -> str:
        hits = {v: [r for r in ranks if test(v, r)] for v in have}
        listed = "; ".join(f"{v} at R={','.join(map(str, rs))}{show(v, rs)}" for v, rs in hits.items() if rs)
        return (listed or "no variant") + " (clean at every R: " + (", ".join(
            v for v, rs in hits.items() if not rs) or "none") + ")"

    out = []
    if {"basis", "uniform"} <= set(have):
        q = [m("uniform", r) / m("basis", r) for r in sub]
        out.append(f"Uniform instead of balanced bins: relative error {m('uniform', mid):.3f} vs {m('basis', mid):.3f} "
                   f"at R={mid} ({q[sub.index(mid)]:.2f}x), a ratio of {min(q):.2f}-{max(q):.2f} over R={sub[0]}-"
                   f"{sub[-1]}" + (f"; {m('uniform', rows):.3f} vs {m('basis', rows):.4f} at R=rows."
                                   if at_rows else "."))
    if {"basis", "no-scalars"} <= set(have):
        nr = {(v, r): f"{m(v, r, 'norm_ratio_mean'):.2f} +- {m(v, r, 'norm_ratio_std'):.2f}"
              for r in (lo, mid) for v in ("basis", "no-scalars")}
        dm, ds = (m("basis", lo, k) / m("no-scalars", lo, k) - 1 for k in ("norm_ratio_mean", "norm_ratio_std"))
        plain = abs(dm) < 0.05 and m("no-scalars", lo, "norm_ratio_mean") > 1
        out.append("Invariant scalars: the norm ratio ||dW^||/||dW|| is " + " and ".join(
            f"{nr[('basis', r)]} with them vs {nr[('no-scalars', r)]} without at R={r}"
            for r in dict.fromkeys((lo, mid))) + f", i.e. {dm:+.1%} on the mean and {ds:+.0%} on the spread at "
            f"R={lo}" + ("; the overshoot above 1 is the sketch's variance, not the scalars." if plain else "."))
    def span(v, rs):
        return " (" + " to ".join(dict.fromkeys(f"{f(m(v, r, 'proj_mean') for r in rs):.4f}" for f in (min, max))) + ")"

    out.append("Bias: ||mean of the draws - dW|| exceeds 4x its Monte Carlo noise floor (and 1e-6) for " + where(
        lambda v, r: m(v, r, "bias_rel") > max(4 * m(v, r, "bias_noise_rel"), 1e-6)) + "; the far less noisy "
        "mean of <dW^, dW>/||dW||^2 is off 1 by over 4 standard errors for " + where(
        lambda v, r: abs(m(v, r, "proj_mean") - 1) > max(4 * m(v, r, "proj_se"), 1e-6), span) + ".")
    if {"basis", "gaussian"} <= set(have):
        g = ", ".join(f"{m('gaussian', r) / m('basis', r):.2f}x at R={r}" for r in dict.fromkeys([lo, mid, sub[-1]]))
        out.append(f"A dense Gaussian projection with the same scalars and lam has {g} the count sketch's error"
                   + (f", and {m('gaussian', rows):.3f} vs {m('basis', rows):.4f} at R=rows." if at_rows else "."))
    if "basis" in have and at_rows:
        out.append(f"At R=rows the paper's estimator is off by {m('basis', rows):.5f}, against 1-(1-lam)^2 = "
                   f"{1 - 0.99**2:.5f} from lam shrinkage alone"
                   + (f"; with lam=0 by {m('lam0', rows):.1e}." if "lam0" in have else "."))
    v, fit = ("unbiased" if "unbiased" in have else have[0]), [r for r in ranks if r <= rows // 2]
    if len(fit) >= 2:
        slope = np.polyfit(np.log(fit), np.log([m(v, r) for r in fit]), 1)[0]
        out.append(f"The {v} error falls about as R^{slope:.2f} over R={fit[0]}-{fit[-1]} (sampling rows "
                   f"independently would give R^-0.5); at R={lo} its cosine with dW is {m(v, lo, 'cos_mean'):.3f}.")
    return out


def _plot(path: Path, overall: list[dict], key: str, ylabel: str, title: str) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    variants = list(dict.fromkeys(r["variant"] for r in overall))
    for i, v in enumerate(variants):
        rs = [r for r in overall if r["variant"] == v and r[key] > 1e-12]  # an exact R = rows is off a log axis
        x = [r["rank"] * 1.025 ** (i - len(variants) / 2) for r in rs]  # dodge: several variants coincide
        spec = VARIANTS[v]
        (line,) = ax.plot(x, [r[key] for r in rs], ls="-" if spec.scalars else "--", label=v,
                          marker={"balanced": "o", "uniform": "s", "gaussian": "^"}[spec.hashing], ms=4)
        if key == "rel_err_mean":
            ax.fill_between(x, [r["rel_err_p10"] for r in rs], [r["rel_err_p90"] for r in rs],
                            color=line.get_color(), alpha=0.1)
    if key == "rel_err_mean":
        ax.set_ylim(bottom=5e-3)  # lam0's 1e-7 at R = rows (the scalars' epsilon) would squash the rest
    else:
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="sketch rank R", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _md_table(rows: list[dict], col: str, fmt) -> list[str]:
    """Ranks down, one column per distinct value of `col` (variant or layer)."""
    t, cols = {(r[col], r["rank"]): r for r in rows}, list(dict.fromkeys(r[col] for r in rows))
    lines = ["| R | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for rank in sorted({r["rank"] for r in rows}):
        label = f"{rank} (rows)" if t[(cols[0], rank)]["is_rows"] else str(rank)
        lines.append(f"| {label} | " + " | ".join(fmt(t[(c, rank)]) for c in cols) + " |")
    return [*lines, ""]


TABLES = (
    ("Relative error ||dW^ - dW|| / ||dW|| (mean [p10, p90])",
     lambda r: f"{r['rel_err_mean']:.4g} [{r['rel_err_p10']:.3g}, {r['rel_err_p90']:.3g}]"),
    ("Cosine similarity with dW (mean +- std)", lambda r: f"{r['cos_mean']:.3f} +- {r['cos_std']:.3f}"),
    ("Norm ratio ||dW^|| / ||dW|| (mean +- std)", lambda r: f"{r['norm_ratio_mean']:.3f} +- {r['norm_ratio_std']:.3f}"),
    ("Relative bias ||mean of the draws - dW|| / ||dW|| (noise floor)",
     lambda r: f"{r['bias_rel']:.3g} ({r['bias_noise_rel']:.2g})"),
    ("Mean projection on dW, <dW^, dW> / ||dW||^2 (+- standard error; 1 if unbiased)",
     lambda r: f"{r['proj_mean']:.4f} +- {r['proj_se']:.4f}"),
)


def write_outputs(out: Path, per_layer: list[dict], overall: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("diagnostics.csv", per_layer), ("overall.csv", overall)):
        with (out / name).open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    _plot(out / "error_vs_rank.png", overall, "rel_err_mean", "relative error ||dW^-dW||/||dW|| (p10-p90 band)",
          "Error of the BASIS weight gradient vs sketch rank")
    _plot(out / "norm_ratio_vs_rank.png", overall, "norm_ratio_mean", "norm ratio ||dW^||/||dW||",
          "Norm of the BASIS weight gradient relative to exact vs sketch rank")
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    variants = list(dict.fromkeys(r["variant"] for r in overall))
    md = ["# BASIS estimator diagnostics", "", (
        f"Model: {meta['model_source']}; layers {', '.join(meta['layers'])}; {meta['batches']} training batches of "
        f"{meta['rows']} rows; {meta['draws']} draws per batch, layer, R and variant; seed {meta['seed']}; "
        f"wall time {meta['wall_s']:.0f} s ({meta['device']}, {meta['threads']} threads)."), "",
        f"Command: `{meta['command']}`", "",
        "Variants (hashing, invariant scalars, lam): " + "; ".join(
            f"{v} = {VARIANTS[v].hashing}, {'on' if VARIANTS[v].scalars else 'off'}, {VARIANTS[v].lam:g}"
            for v in variants) + ".", "", (
        "Tables pool every diagnosed layer's gradient into one vector ('overall'; per layer: diagnostics.csv). "
        "The bias noise floor is what ||mean of the draws - dW|| / ||dW|| would be for an unbiased estimator "
        "with the measured variance, sqrt(var/draws)/||dW||, averaged over batches."), ""]
    for title, fmt in TABLES:
        md += [f"## {title}", "", *_md_table(overall, "variant", fmt)]
    md += ["## Findings", "", *(f"- {s}" for s in findings(overall, meta["rows"])), ""]
    if "basis" in variants:
        md += ["## Relative error per layer, the paper's estimator (basis)", "", *_md_table(
            [r for r in per_layer if r["variant"] == "basis"], "layer", lambda r: f"{r['rel_err_mean']:.4g}")]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
