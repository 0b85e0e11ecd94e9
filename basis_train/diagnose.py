"""Estimator diagnostics: how far is a BASIS weight gradient from the exact one?

An exact model runs real training batches; each sketchable layer's input X and output gradient dY
are captured and many BASIS estimates of dW = dY^T X drawn per rank R and variant (PAPER.md
section 3 ablations) to measure relative error, cosine, norm ratio and bias.

Speed: every metric is a Frobenius norm or inner product of dW^ and dW. Writing X = Xc Q^T with
orthonormal Q (a QR; Xc has at most `rows` columns) changes none of them, nor the sketch norms the
invariant scalars use (S X = (S Xc) Q^T). So sketch.py's count_sketch and _rescale run on rows x rows
matrices instead of e.g. the 64 x 50257 lm_head gradient, with the real estimator's metrics to
float64 rounding (tested against `estimate`, the uncompressed estimator).
"""

from __future__ import annotations

import csv
import json
import pickle
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from basis_train.config import Config, ConfigError, apply_overrides, config_to_dict, load_config
from basis_train.data import DataError, TrainLoader, load_tokens, make_splits
from basis_train.model import GPT, GPTConfig, build_gpt
from basis_train.sketch import _rescale, count_sketch, draw_seed


@dataclass(frozen=True)
class Variant:
    hashing: str
    scalars: bool
    lam: float


VARIANTS: dict[str, Variant] = {
    "basis": Variant("balanced", True, 0.01),  # the paper's estimator
    "lam0": Variant("balanced", True, 0.0),
    "no-scalars": Variant("balanced", False, 0.01),
    "unbiased": Variant("balanced", False, 0.0),
    "uniform": Variant("uniform", True, 0.01),
    "gaussian": Variant("gaussian", True, 0.01),
    "gaussian-unbiased": Variant("gaussian", False, 0.0),
}
DEFAULT_RANKS = "1,4,8,16,32,64,rows"
METRICS = ("rel_err_mean", "rel_err_std", "rel_err_p10", "rel_err_p90", "cos_mean", "cos_std",
           "norm_ratio_mean", "norm_ratio_std", "bias_rel", "bias_noise_rel")
_CPU = torch.device("cpu")


class DiagnoseError(Exception):
    """A user error, shown as one line."""


def parse_ranks(text: str) -> list[int | str]:
    out: list[int | str] = []
    for item in (s.strip().lower() for s in text.split(",")):
        if item != "rows" and not (item.isdigit() and int(item) >= 1):
            raise DiagnoseError(f"--ranks: {item!r} is neither an integer >= 1 nor 'rows'")
        out.append(item if item == "rows" else int(item))
    return out


def resolve_ranks(spec: list[int | str], rows: int) -> list[int]:
    # BasisLinearFunction clips R to the number of rows, so larger ranks duplicate R = rows.
    return sorted({rows if r == "rows" else min(int(r), rows) for r in spec})


def parse_variants(text: str) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    for name in names or [text]:
        if name not in VARIANTS:
            raise DiagnoseError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return names


def capture(model: nn.Module, batches, names: list[str]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per batch, {layer: (X, dY)} in float64, rows = batch x sequence, from one exact backward."""
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules.get(n), nn.Linear):
            raise DiagnoseError(f"{n!r} is not a linear layer of this model")
    cur: dict[str, list] = {}

    def fwd(mod, inputs, output, name):
        cur[name] = [inputs[0].detach().reshape(-1, mod.in_features).double(), None]
        output.register_hook(lambda g: cur[name].__setitem__(1, g.reshape(-1, mod.out_features).double()))

    handles = [modules[n].register_forward_hook(partial(fwd, name=n)) for n in names]
    out = []
    try:
        for idx, targets in batches:
            model.zero_grad(set_to_none=True)
            model(idx, targets)[1].backward()
            out.append({n: tuple(cur.pop(n)) for n in names})
    finally:
        for h in handles:
            h.remove()
    return out


def estimate(x: torch.Tensor, dy: torch.Tensor, seed: torch.Tensor, rank: int, variant: Variant) -> torch.Tensor:
    """One BASIS estimate of dW = dY^T X, computed as BasisLinearFunction does."""
    r = min(rank, x.shape[0])
    xs = _rescale(count_sketch(x, seed, r, variant.hashing), x, variant.lam, variant.scalars)
    gs = _rescale(count_sketch(dy, seed, r, variant.hashing), dy, variant.lam, variant.scalars)
    return gs.t() @ xs


def _compress(m: torch.Tensor) -> torch.Tensor:
    if m.shape[1] <= m.shape[0]:
        return m
    return torch.linalg.qr(m.t(), mode="r").R.t()  # m = R^T Q^T, so R^T has m's row Gram


def run_draws(captures, names, ranks, variants, draws, seed=0, progress=False) -> dict[str, np.ndarray]:
    """Squared norms per draw, unreduced so that layers pool exactly into 'overall'.

    err2, nrm2, dot: ||dW^ - dW||^2, ||dW^||^2, <dW^, dW>, axes (layer, rank, variant, batch, draw);
    bias2: ||mean of the draws - dW||^2 (no draw axis); g2: ||dW||^2, axes (layer, batch).
    Draw d shares its seed across ranks and variants (common random numbers sharpen comparisons).
    """
    if draws < 2:
        raise DiagnoseError(f"--draws must be >= 2 to estimate a noise floor, got {draws}")
    specs = [VARIANTS[v] for v in variants]
    hashings = list(dict.fromkeys(s.hashing for s in specs))
    shape = (len(names), len(ranks), len(specs), len(captures), draws)
    err2, nrm2, dot = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    bias2, g2 = np.zeros(shape[:-1]), np.zeros((len(names), len(captures)))
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=len(captures) * len(names) * len(ranks), disable=not progress, unit="rank", desc="diagnose")
    for k, cap in enumerate(captures):
        for li, name in enumerate(names):
            xc, dyc = (_compress(m) for m in cap[name])
            dw = dyc.t() @ xc
            g2[li, k] = dw.square().sum().item()
            joint, n_x = torch.cat([xc, dyc], 1), xc.shape[1]  # one sketch call serves X and dY
            seeds = [draw_seed(_CPU, gen).to(xc.device) for _ in range(draws)]
            chunk = max(1, min(draws, 2**22 // dw.numel()))  # bounds the stacked estimates to 32 MB
            for ri, r in enumerate(ranks):
                sums = [torch.zeros_like(dw) for _ in specs]
                for lo in range(0, draws, chunk):
                    xs, gs = [[] for _ in specs], [[] for _ in specs]
                    for s in seeds[lo:lo + chunk]:
                        for h in hashings:
                            sk = count_sketch(joint, s, r, h)
                            for vi, v in enumerate(specs):
                                if v.hashing == h:
                                    xs[vi].append(_rescale(sk[:, :n_x], xc, v.lam, v.scalars))
                                    gs[vi].append(_rescale(sk[:, n_x:], dyc, v.lam, v.scalars))
                    for vi in range(len(specs)):
                        est = torch.bmm(torch.stack(gs[vi]).transpose(1, 2), torch.stack(xs[vi]))
                        at = (li, ri, vi, k, slice(lo, lo + len(est)))
                        err2[at] = (est - dw).square().sum((1, 2)).cpu().numpy()
                        nrm2[at] = est.square().sum((1, 2)).cpu().numpy()
                        dot[at] = (est * dw).sum((1, 2)).cpu().numpy()
                        sums[vi] += est.sum(0)
                for vi in range(len(specs)):
                    bias2[li, ri, vi, k] = (sums[vi] / draws - dw).square().sum().item()
                bar.update()
    bar.close()
    return {"err2": err2, "nrm2": nrm2, "dot": dot, "bias2": bias2, "g2": g2}


def _stats(err2, nrm2, dot, bias2, g2) -> dict[str, float]:
    d = err2.shape[-1]
    g = np.sqrt(g2)[:, None]
    rel, ratio = np.sqrt(err2) / g, np.sqrt(nrm2) / g
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (np.sqrt(nrm2) * g)
    # sum_d ||dW^_d - mean||^2, taken from errors about dW so R = rows does not cancel badly
    spread = np.maximum(err2.sum(-1) - d * bias2, 0.0)
    p10, p90 = np.percentile(rel, [10, 90])
    # bias_noise_rel: what bias_rel would be for an unbiased estimator with this variance
    vals = (rel.mean(), rel.std(), p10, p90, np.nanmean(cos), np.nanstd(cos), ratio.mean(), ratio.std(),
            np.mean(np.sqrt(bias2 / g2)), np.mean(np.sqrt(spread / (d - 1) / d / g2)))
    return dict(zip(METRICS, map(float, vals), strict=True))


def tabulate(raw: dict[str, np.ndarray], names, ranks, variants, rows: int) -> tuple[list[dict], list[dict]]:
    """(per-layer rows, overall rows); 'overall' concatenates all layers' gradients into one vector."""
    def rows_for(layer, err2, nrm2, dot, bias2, g2):
        return [{"layer": layer, "rank": r, "is_rows": r == rows, "variant": v, **asdict(VARIANTS[v]),
                 "rows": rows, "batches": err2.shape[2], "draws": err2.shape[3],
                 **_stats(err2[ri, vi], nrm2[ri, vi], dot[ri, vi], bias2[ri, vi], g2)}
                for ri, r in enumerate(ranks) for vi, v in enumerate(variants)]
    keys = ("err2", "nrm2", "dot", "bias2", "g2")
    per_layer = [row for li, n in enumerate(names) for row in rows_for(n, *(raw[k][li] for k in keys))]
    return per_layer, rows_for("overall", *(raw[k].sum(0) for k in keys))


def findings(overall: list[dict], rows: int) -> list[str]:
    """Sentences read off the measured overall numbers; no claim here is fixed in advance."""
    t = {(r["variant"], r["rank"]): r for r in overall}
    have, ranks = list(dict.fromkeys(r["variant"] for r in overall)), sorted({r["rank"] for r in overall})
    sub = [r for r in ranks if r < rows] or ranks
    lo, mid = ranks[0], (8 if 8 in sub else sub[len(sub) // 2])
    at_rows = rows in ranks

    def m(v, r, key="rel_err_mean"):
        return t[(v, r)][key]

    out = []
    if {"basis", "uniform"} <= set(have):
        q = [m("uniform", r) / m("basis", r) for r in sub]
        out.append(f"Uniform instead of balanced bins: relative error {m('uniform', mid):.3f} vs {m('basis', mid):.3f} "
                   f"at R={mid} ({q[sub.index(mid)]:.2f}x), a ratio of {min(q):.2f}-{max(q):.2f} over "
                   f"R={sub[0]}-{sub[-1]}" + (f"; at R=rows={rows} {m('uniform', rows):.3f} vs "
                                              f"{m('basis', rows):.4f}." if at_rows else "."))
    if {"basis", "no-scalars"} <= set(have):
        nr = [f"{m(v, r, 'norm_ratio_mean'):.2f} +- {m(v, r, 'norm_ratio_std'):.2f}"
              for r in (lo, mid) for v in ("basis", "no-scalars")]
        out.append(f"Invariant scalars: the norm ratio ||dW^||/||dW|| is {nr[0]} with them vs {nr[1]} without at "
                   f"R={lo}, {nr[2]} vs {nr[3]} at R={mid}; the mean estimate's relative bias at R={lo} is "
                   f"{m('basis', lo, 'bias_rel'):.3f} vs {m('no-scalars', lo, 'bias_rel'):.3f} (noise floors "
                   f"{m('basis', lo, 'bias_noise_rel'):.3f}, {m('no-scalars', lo, 'bias_noise_rel'):.3f}).")
    biased = {v: [r for r in ranks if m(v, r, "bias_rel") > max(4 * m(v, r, "bias_noise_rel"), 1e-6)] for v in have}
    flagged = "; ".join(f"{v} at R={','.join(map(str, rs))}" for v, rs in biased.items() if rs)
    clean = ", ".join(v for v, rs in biased.items() if not rs)
    out.append(f"Bias above both 4x its Monte Carlo noise floor and 1e-6: {flagged or 'none'}"
               + (f"; within the floor at every R: {clean}." if clean else "."))
    if {"basis", "gaussian"} <= set(have):
        g = ", ".join(f"{m('gaussian', r) / m('basis', r):.2f}x at R={r}" for r in dict.fromkeys([lo, mid, sub[-1]]))
        out.append(f"A dense Gaussian projection with the same scalars and lam has {g} the count sketch's error"
                   + (f", and {m('gaussian', rows):.3f} vs {m('basis', rows):.4f} at R=rows." if at_rows else "."))
    if "basis" in have and at_rows:
        s = (f"At R=rows the paper's estimator is off by {m('basis', rows):.5f}, against 1-(1-lam)^2 = "
             f"{1 - 0.99 ** 2:.5f} from lam shrinkage alone")
        out.append(s + (f"; with lam=0 by {m('lam0', rows):.1e}." if "lam0" in have else "."))
    v = "unbiased" if "unbiased" in have else have[0]
    fit = [r for r in ranks if r <= rows // 2]
    if len(fit) >= 2:
        slope = np.polyfit(np.log(fit), np.log([m(v, r) for r in fit]), 1)[0]
        out.append(f"The {v} error falls about as R^{slope:.2f} over R={fit[0]}-{fit[-1]} (sampling rows "
                   f"independently would give R^-0.5); at R={lo} its cosine with dW is {m(v, lo, 'cos_mean'):.3f}.")
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)


def _plot(path: Path, overall: list[dict], key: str, ylabel: str) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for v in dict.fromkeys(r["variant"] for r in overall):
        rs = [r for r in overall if r["variant"] == v and r[key] > 1e-12]  # an exact R = rows is off a log axis
        (line,) = ax.plot([r["rank"] for r in rs], [r[key] for r in rs], marker="o", label=v)
        if key == "rel_err_mean":
            ax.fill_between([r["rank"] for r in rs], [r["rel_err_p10"] for r in rs], [r["rel_err_p90"] for r in rs],
                            color=line.get_color(), alpha=0.12)
    if key != "rel_err_mean":
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="sketch rank R", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _md_table(rows: list[dict], col: str, fmt) -> list[str]:
    """Ranks down, one column per distinct value of `col` (variant or layer)."""
    t = {(r[col], r["rank"]): r for r in rows}
    cols = list(dict.fromkeys(r[col] for r in rows))
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
    ("Relative bias of the mean estimate (noise floor)", lambda r: f"{r['bias_rel']:.3g} ({r['bias_noise_rel']:.2g})"),
)


def write_outputs(out: Path, per_layer: list[dict], overall: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "diagnostics.csv", per_layer)
    _write_csv(out / "overall.csv", overall)
    _plot(out / "error_vs_rank.png", overall, "rel_err_mean", "relative error ||dW^-dW||/||dW|| (p10-p90 band)")
    _plot(out / "norm_ratio_vs_rank.png", overall, "norm_ratio_mean", "norm ratio ||dW^||/||dW||")
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str) + "\n", encoding="utf-8")
    variants = list(dict.fromkeys(r["variant"] for r in overall))
    md = ["# BASIS estimator diagnostics", "", (
        f"Model: {meta['model_source']}; layers {', '.join(meta['layers'])}; {meta['batches']} training batches of "
        f"{meta['rows']} rows; {meta['draws']} draws per batch, layer, R and variant; seed {meta['seed']}; "
        f"wall time {meta['wall_s']:.0f} s on {meta['threads']} {meta['device']} threads."), "",
        f"Command: `{meta['command']}`", "",
        "Variants (hashing, invariant scalars, lam): " + "; ".join(
            f"{v} = {VARIANTS[v].hashing}, {'on' if VARIANTS[v].scalars else 'off'}, {VARIANTS[v].lam:g}"
            for v in variants) + ".", "", (
        "Tables pool every diagnosed layer's gradient into one vector ('overall'; per layer: diagnostics.csv). "
        "Bias is ||mean of the draws - dW|| / ||dW||, averaged over batches; its noise floor is the value an "
        "unbiased estimator with the measured variance would show, sqrt(var/draws)/||dW||."), ""]
    for title, fmt in TABLES:
        md += [f"## {title}", "", *_md_table(overall, "variant", fmt)]
    md += ["## Findings", "", *(f"- {s}" for s in findings(overall, meta["rows"])), ""]
    if "basis" in variants:
        md += ["## Relative error per layer, the paper's estimator (basis)", "",
               *_md_table([r for r in per_layer if r["variant"] == "basis"], "layer", lambda r: f"{r['rel_err_mean']:.4g}")]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")


def gpt_config(cfg: Config) -> GPTConfig:
    m, s = cfg.model, cfg.sketch
    return GPTConfig(vocab_size=m.vocab_size, block_size=m.block_size, n_embd=m.n_embd, n_head=m.n_head,
                     n_layer=m.n_layer, mlp_ratio=m.mlp_ratio, sketch_layers=s.layers, rank=s.rank,
                     hashing=s.hashing, invariant_scalars=s.invariant_scalars, lam=s.lam)


def load_weights(model: GPT, path: Path) -> dict:
    if not path.is_file():
        raise DiagnoseError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a basis-train checkpoint the user named, holding non-tensor state
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise DiagnoseError(f"{path}: no model state_dict inside")
    try:
        model.load_state_dict({k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as exc:
        raise DiagnoseError(f"{path} does not fit the config: {str(exc).splitlines()[-1].strip()}") from None
    return ckpt


def _trained_checkpoint(cfg: Config, steps: int, seed: int, device: str, out: Path) -> Path:
    try:
        from basis_train.train import train
    except ImportError:
        raise DiagnoseError("--after-steps needs basis_train.train, which is not available; use --checkpoint") from None
    run_dir = out / "after_steps_run"
    train(apply_overrides(cfg, {"train.steps": steps, "train.seed": seed, "log.out": str(run_dir),
                                "log.wandb": "off", "train.device": device}))
    return run_dir / "checkpoint.pt"


def _batches(cfg: Config, n: int, batch_size: int, device, seed: int, skip: int) -> tuple[list, dict]:
    d = cfg.data
    corpus = load_tokens(d.dataset, d.data_files, d.max_docs, d.cache_dir)
    splits = make_splits(corpus, d.val_protocol, cfg.model.block_size, paper_val_docs=d.paper_val_docs,
                         heldout_every=d.heldout_every, heldout_min_tokens=d.heldout_min_tokens)
    loader = TrainLoader(splits.train_tokens, batch_size, cfg.model.block_size, device, shuffle=d.shuffle, seed=seed)
    for _ in range(skip):  # a trained model is diagnosed on the batches training would see next
        loader.next_indices()
    return [loader.next() for _ in range(n)], splits.info


def _command(options: dict) -> str:
    if Path(sys.argv[0]).name == "diagnose.py":
        return shlex.join(["python", "-m", "basis_train.diagnose", *sys.argv[1:]])
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if v is not None and k != "progress"]
    return shlex.join(["basis-diagnose", *flags])


app = typer.Typer(add_completion=False)
Opt = typer.Option


@app.command()
def run(
    config: Annotated[str | None, Opt(help="YAML config or a name in configs/ [default: the paper's]")] = None,
    checkpoint: Annotated[Path | None, Opt(help="load the 'model' state_dict of this checkpoint")] = None,
    after_steps: Annotated[int, Opt(min=0, help="first train this many steps (basis_train.train)")] = 0,
    seed: Annotated[int | None, Opt(help="init and sketch seed [default: the config's train.seed]")] = None,
    ranks: Annotated[str, Opt(help="comma list of sketch ranks; 'rows' = batch x sequence")] = DEFAULT_RANKS,
    variants: Annotated[str, Opt(help="comma list of: " + ", ".join(VARIANTS))] = ",".join(VARIANTS),
    draws: Annotated[int, Opt(help="estimates per batch, layer, rank and variant")] = 200,
    batches: Annotated[int, Opt(min=1, help="real training batches")] = 4,
    batch_size: Annotated[int | None, Opt(min=1, help="sequences per batch [default: the config's]")] = None,
    sketch_layers: Annotated[str | None, Opt(help="mlp+head, all, or a comma list of layer names")] = None,
    device: Annotated[str, Opt(help="auto, cpu or cuda")] = "auto",
    out: Annotated[Path, Opt(help="output directory")] = Path("results/diagnostics"),
    progress: Annotated[bool, Opt(help="show a progress bar")] = True,
) -> None:
    """Measure error, cosine, norm and bias of BASIS weight-gradient estimates against exact backprop."""
    start, options = time.time(), dict(locals())
    try:
        rank_spec, variant_list = parse_ranks(ranks), parse_variants(variants)
        if checkpoint and after_steps:
            raise DiagnoseError("use --checkpoint or --after-steps, not both")
        if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise DiagnoseError(f"--device {device}: choose auto, cpu or cuda (cuda needs a GPU)")
        dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
        named = Path(__file__).resolve().parent.parent / "configs" / f"{config}.yaml"
        cfg = load_config(named if config and not Path(config).exists() and named.is_file() else config)
        if sketch_layers in ("mlp+head", "all", "none"):
            cfg = apply_overrides(cfg, {"sketch.layers": sketch_layers})
        seed = cfg.train.seed if seed is None else seed
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the paper's T4 had none
        model = build_gpt(gpt_config(cfg), seed, method="exact")
        source, skip = f"fresh init (seed {seed})", after_steps
        if after_steps:
            checkpoint = _trained_checkpoint(cfg, after_steps, seed, device, out)
            source = f"after {after_steps} {cfg.train.method} training steps (seed {seed})"
        if checkpoint:
            ckpt = load_weights(model, checkpoint)
            source = source if after_steps else f"checkpoint {checkpoint}"
            skip = skip or (ckpt["step"] if isinstance(ckpt.get("step"), int) else 0)
        model.to(dev).train()
        names = model.sketchable_names()
        if sketch_layers and sketch_layers not in ("mlp+head", "all", "none"):
            names = [n.strip() for n in sketch_layers.split(",") if n.strip()]
        if not names:
            raise DiagnoseError("no layers to diagnose: the sketch layers select none")
        data, data_info = _batches(cfg, batches, batch_size or cfg.train.batch_size, dev, seed, skip)
        caps = capture(model, data, names)
        rows = data[0][0].numel()
        rank_list = resolve_ranks(rank_spec, rows)
        raw = run_draws(caps, names, rank_list, variant_list, draws, seed, progress)
        per_layer, overall = tabulate(raw, names, rank_list, variant_list, rows)
    except (DiagnoseError, ConfigError, DataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    modules = dict(model.named_modules())
    meta = {"command": _command(options), "options": options, "config": config_to_dict(cfg), "model_source": source,
            "seed": seed, "batches": batches, "batch_size": batch_size or cfg.train.batch_size, "rows": rows,
            "skipped_batches": skip, "draws": draws, "ranks": rank_list, "variants": variant_list, "layers": names,
            "layer_shapes": {n: list(modules[n].weight.shape) for n in names}, "data": data_info,
            "torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(),
            "wall_s": round(time.time() - start, 1)}
    write_outputs(out, per_layer, overall, meta)
    typer.echo(f"wrote {out}/ (summary.md, diagnostics.csv, overall.csv, plots) in {meta['wall_s']:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
