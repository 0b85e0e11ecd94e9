"""Estimator diagnostics: how far is a BASIS weight gradient from the exact one?

An exact model runs real training batches; each sketchable layer's input X and output gradient dY
are captured and many BASIS estimates of dW = dY^T X drawn per rank R and variant (docs/paper.md
section 3 ablations) to measure relative error, cosine, norm ratio and bias.

Speed: every metric is a Frobenius norm or inner product of dW^ and dW. Writing X = Xc Q^T with
orthonormal Q (a QR; Xc has at most `rows` columns) changes none of them, nor the sketch norms the
invariant scalars use (S X = (S Xc) Q^T). So sketch.py's sketch_stats and rescale run on rows x rows
matrices instead of e.g. the 64 x 50257 lm_head gradient, with the real estimator's metrics to
float64 rounding (tested against `estimate`, the uncompressed estimator).
"""

from __future__ import annotations

import pickle
import shutil
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from basis_train.core.model import GPT, build_gpt
from basis_train.core.options import SKETCH_LAYERS
from basis_train.core.sketch import draw_seed, rescale, sketch_stats
from basis_train.data.corpus import load_tokens
from basis_train.data.loaders import TrainLoader, make_splits
from basis_train.reporting.diagnose_report import (  # noqa: F401  (public API)
    DEFAULT_RANKS,
    VARIANTS,
    Variant,
    findings,
    write_outputs,
)
from basis_train.training.config import Config, apply_overrides, config_to_dict, load_config
from basis_train.training.setup import gpt_config

METRICS = ("rel_err_mean", "rel_err_std", "rel_err_p10", "rel_err_p90", "cos_mean", "cos_std",
           "norm_ratio_mean", "norm_ratio_std", "bias_rel", "bias_noise_rel", "proj_mean", "proj_se")


class DiagnoseError(Exception):
    """A user error, shown as one line."""


def parse_ranks(text: str) -> list[int | str]:
    items = [s.strip().lower() for s in text.split(",")]
    for item in items:
        if item != "rows" and not (item.isdigit() and int(item) >= 1):
            raise DiagnoseError(f"--ranks: {item!r} is neither an integer >= 1 nor 'rows'")
    return [i if i == "rows" else int(i) for i in items]


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


def _rescaled(sketch: torch.Tensor, full: torch.Tensor, variant: Variant) -> torch.Tensor:
    return rescale(sketch, torch.linalg.vector_norm(full, dtype=sketch.dtype).square(), variant)


def estimate(x: torch.Tensor, dy: torch.Tensor, seed: torch.Tensor, rank: int, variant: Variant) -> torch.Tensor:
    """One BASIS estimate of dW = dY^T X, computed as BasisLinearFunction does."""
    r = min(rank, x.shape[0])
    xs = _rescaled(sketch_stats(x, seed, r, variant.hashing)[0], x, variant)
    gs = _rescaled(sketch_stats(dy, seed, r, variant.hashing)[0], dy, variant)
    return gs.t() @ xs


def _compress(m: torch.Tensor) -> torch.Tensor:
    if m.shape[1] <= m.shape[0]:
        return m
    return torch.linalg.qr(m.t(), mode="r").R.t()  # m = R^T Q^T: same row Gram matrix as m


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
            seeds = [draw_seed(torch.device("cpu"), gen).to(xc.device) for _ in range(draws)]
            chunk = max(1, min(draws, 2**22 // dw.numel()))  # bounds the stacked estimates to 32 MB
            for ri, r in enumerate(ranks):
                sums = [torch.zeros_like(dw) for _ in specs]
                for lo in range(0, draws, chunk):
                    xs, gs = [[] for _ in specs], [[] for _ in specs]
                    for s in seeds[lo:lo + chunk]:
                        for h in hashings:
                            sk = sketch_stats(joint, s, r, h)[0]
                            for vi, v in enumerate(specs):
                                if v.hashing == h:
                                    xs[vi].append(_rescaled(sk[:, :n_x], xc, v))
                                    gs[vi].append(_rescaled(sk[:, n_x:], dyc, v))
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
    d, g = err2.shape[-1], np.sqrt(g2)[:, None]
    rel, ratio, proj = np.sqrt(err2) / g, np.sqrt(nrm2) / g, dot / g**2
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (np.sqrt(nrm2) * g)
    # sum_d ||dW^_d - mean||^2, from errors about dW so that R = rows does not cancel badly
    spread = np.maximum(err2.sum(-1) - d * bias2, 0.0)
    # bias_noise_rel is what bias_rel would be for an unbiased estimator of this variance; proj, the
    # component along dW (1 if unbiased), is far less noisy and so exposes small scale biases.
    vals = (rel.mean(), rel.std(), *np.percentile(rel, [10, 90]), np.nanmean(cos), np.nanstd(cos), ratio.mean(),
            ratio.std(), np.mean(np.sqrt(bias2 / g2)), np.mean(np.sqrt(spread / (d - 1) / d / g2)), proj.mean(),
            proj.std(ddof=1) / np.sqrt(proj.size))
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


def load_weights(model: GPT, path: Path) -> dict:
    """Load a checkpoint's 'model' state_dict (or a bare state_dict); returns the checkpoint."""
    if not path.is_file():
        raise DiagnoseError(f"checkpoint not found: {path}")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights_only" not in str(exc):
                raise
            # A basis-train checkpoint the user named holds non-tensor state (optimiser, loader).
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, random bytes, empty: torch raises many kinds
        first = str(exc).strip().splitlines()
        raise DiagnoseError(f"{path} is not a readable checkpoint ({type(exc).__name__}"
                            f"{': ' + first[0] if first else ''})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise DiagnoseError(f"{path}: no model state_dict inside")
    try:
        model.load_state_dict({k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as exc:
        raise DiagnoseError(f"{path} does not fit the config: {str(exc).splitlines()[-1].strip()}") from None
    return ckpt


def _trained_checkpoint(cfg: Config, steps: int, seed: int, device: str, out: Path, progress: bool) -> Path:
    try:
        from basis_train.training.errors import RunError
        from basis_train.training.train import train
    except ImportError:
        raise DiagnoseError("--after-steps needs basis_train.training.train, which is not available; use --checkpoint") from None
    overrides = {"train.steps": steps, "train.seed": seed, "train.device": device, "log.wandb": "off"}
    scratch = out / "after_steps_run"
    shutil.rmtree(scratch, ignore_errors=True)  # diagnose's own scratch run: replaced on every call
    try:
        train(apply_overrides(cfg, overrides), scratch, progress=progress)
    except RunError as exc:
        raise DiagnoseError(f"training for --after-steps failed: {exc}") from None
    return scratch / "checkpoint.pt"


def _batches(cfg: Config, n: int, batch_size: int, device, seed: int, ckpt: dict) -> tuple[list, dict]:
    d = cfg.data
    corpus = load_tokens(d.dataset, d.data_files, d.max_docs, d.cache_dir)
    splits = make_splits(corpus, d.val_protocol, cfg.model.block_size, paper_val_docs=d.paper_val_docs,
                         heldout_every=d.heldout_every, heldout_min_tokens=d.heldout_min_tokens)
    loader = TrainLoader(splits.train_tokens, batch_size, cfg.model.block_size, device, shuffle=d.shuffled, seed=seed)
    # A trained model is diagnosed on the batches its training would have seen next.
    if isinstance(ckpt.get("loader"), dict) and batch_size == cfg.train.batch_size:
        loader.load_state_dict(ckpt["loader"])
    else:
        for _ in range(ckpt["step"] if isinstance(ckpt.get("step"), int) else 0):
            loader.next_indices()
    return [loader.next() for _ in range(n)], dict(splits.info, loader=loader.state_dict())


def diagnose(config: str | None = None, checkpoint: Path | None = None, after_steps: int = 0,
             seed: int | None = None, ranks: str = DEFAULT_RANKS, variants: str = ",".join(VARIANTS),
             draws: int = 200, batches: int = 4, batch_size: int | None = None, sketch_layers: str | None = None,
             device: str = "auto", out: Path = Path("runs/diagnostics"), progress: bool = True,
             command: str = "") -> dict:
    """Measure error, cosine, norm and bias of BASIS weight-gradient estimates against exact backprop;
    writes OUT/ and returns its metadata. `command` is recorded as the command line that ran.

    User errors raise DiagnoseError, ConfigError or DataError (one line each)."""
    start, options = time.time(), {k: v for k, v in locals().items() if k != "command"}
    rank_spec, variant_list = parse_ranks(ranks), parse_variants(variants)
    for flag, value, low in (("draws", draws, 2), ("batches", batches, 1), ("batch-size", batch_size or 1, 1),
                             ("after-steps", after_steps, 0)):
        if value < low:
            raise DiagnoseError(f"--{flag} must be >= {low}, got {value}")
    if checkpoint and after_steps:
        raise DiagnoseError("use --checkpoint or --after-steps, not both")
    if device not in ("auto", "cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise DiagnoseError(f"--device {device}: choose auto, cpu or cuda (cuda needs a GPU)")
    dev = torch.device("cuda" if device != "cpu" and torch.cuda.is_available() else "cpu")
    cfg = load_config(config)
    layer_choice = sketch_layers in SKETCH_LAYERS
    if layer_choice:
        cfg = apply_overrides(cfg, {"sketch.layers": sketch_layers})
    seed = cfg.train.seed if seed is None else seed
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the paper's T4 had none
    # The plain head: the hooks read each linear's input and dY, which the fused head never forms.
    gcfg = replace(gpt_config(cfg), head="plain")
    model, source, ckpt = build_gpt(gcfg, seed, method="exact"), f"fresh init (seed {seed})", {}
    if after_steps:
        checkpoint = _trained_checkpoint(cfg, after_steps, seed, device, out, progress)
    if checkpoint:
        ckpt = load_weights(model, checkpoint)
        source = f"after {after_steps} {cfg.train.method} steps" if after_steps else f"checkpoint {checkpoint}"
    model.to(dev).train()
    names = [n.strip() for n in sketch_layers.split(",") if n.strip()] if sketch_layers and not layer_choice \
        else model.sketchable_names()
    if not names:
        raise DiagnoseError("no layers to diagnose: the sketch layers select none")
    data, data_info = _batches(cfg, batches, batch_size or cfg.train.batch_size, dev, seed, ckpt)
    rows, caps = data[0][0].numel(), capture(model, data, names)
    rank_list = resolve_ranks(rank_spec, rows)
    raw = run_draws(caps, names, rank_list, variant_list, draws, seed, progress)
    per_layer, overall = tabulate(raw, names, rank_list, variant_list, rows)
    modules = dict(model.named_modules())
    meta = {"command": command, "options": options, "config": config_to_dict(cfg), "model_source": source,
            "seed": seed, "batches": batches, "batch_size": batch_size or cfg.train.batch_size, "rows": rows,
            "checkpoint_step": ckpt.get("step"), "draws": draws, "ranks": rank_list, "variants": variant_list,
            "layers": names, "layer_shapes": {n: list(modules[n].weight.shape) for n in names}, "data": data_info,
            "torch": torch.__version__, "device": str(dev), "threads": torch.get_num_threads(),
            "wall_s": round(time.time() - start, 1)}
    write_outputs(out, per_layer, overall, meta)
    return meta
