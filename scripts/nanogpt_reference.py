"""An outside baseline for issue 25: nanoGPT's GPT-2 `model.py` trained on this project's batches.

    python scripts/nanogpt_reference.py --model-py .ext/nanogpt/model.py --out runs/scale25/runs/nanogpt-s0 \
        [--config configs/gpt2-small-code.yaml] [--data-files GLOB] [--seed 0] [--steps N] [--no-compile]

Everything but the model is this project's: the config's corpus and held-out split, `TrainLoader`
with shuffle=True (the permutation np.random.default_rng([seed, epoch]), first batch skipped, as
every basis-train run of that seed reads it), the lr schedule (`lr_multiplier`: warmup, cosine to
min_lr_ratio), AdamW with the config's betas and weight decay on the >= 2-D parameters (nanoGPT's
own `configure_optimizers`), gradient clipping at optim.grad_clip, bf16 autocast, torch.compile, and
the same evaluation (every held-out chunk, token-weighted mean cross-entropy) every eval_every steps.
It writes metrics.jsonl and summary.json (method "nanogpt") in the form the scale report reads, so
the report pairs it with exact by seed. nanoGPT's code is never committed: the file is loaded from
the path given (fetch it from github.com/karpathy/nanoGPT).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from basis_train.data.loaders import TrainLoader, heldout_batches  # noqa: E402
from basis_train.experiments.scale_grid import site_glob  # noqa: E402
from basis_train.training.config import apply_overrides, load_config  # noqa: E402
from basis_train.training.metrics import steady_rate  # noqa: E402
from basis_train.training.setup import load_data, lr_multiplier, resolve_device  # noqa: E402
from basis_train.training.step import DTYPES, autocast  # noqa: E402


def load_model_module(path: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def evaluate(model, batches, dtype: torch.dtype, device: torch.device) -> float:
    """Token-weighted mean cross-entropy over every held-out chunk, as training/evaluate.py."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in batches:
        with autocast(device, dtype):
            _, loss = model(x, y)  # nanoGPT's mean cross-entropy of the batch (float32 under autocast)
        total += loss.double() * y.numel()
        count += y.numel()
    model.train()
    return total.item() / count


def train(args) -> dict:
    overrides = {"train.seed": args.seed, **({"train.steps": args.steps} if args.steps else {}),
                 **({"train.eval_every": args.eval_every} if args.eval_every else {}),
                 **({"data.dataset": args.dataset} if args.dataset else
                    {"data.data_files": args.data_files or site_glob()}),
                 **({"train.device": args.device} if args.device else {})}
    cfg = apply_overrides(load_config(args.config), overrides)
    t, m, o = cfg.train, cfg.model, cfg.optim
    device, dtype = resolve_device(t.device), DTYPES[t.dtype]
    if device.type == "cuda":  # as train.py sets them for every basis-train run
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    splits, source = load_data(cfg)
    loader = TrainLoader(splits.train_tokens, t.batch_size, m.block_size, device, shuffle=True, seed=t.seed)
    val = heldout_batches(splits.val_tokens, m.block_size, cfg.data.eval_batch_size, device)

    nano = load_model_module(Path(args.model_py))
    torch.manual_seed(t.seed)
    gcfg = nano.GPTConfig(block_size=m.block_size, vocab_size=args.vocab_size or m.vocab_size, n_layer=m.n_layer,
                          n_head=m.n_head, n_embd=m.n_embd, dropout=0.0, bias=args.bias)
    model = nano.GPT(gcfg).to(device)
    opt = model.configure_optimizers(o.weight_decay, o.lr * o.lr_factor, tuple(o.betas), device.type)
    forward = torch.compile(model) if args.compile else model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = (out / "metrics.jsonl").open("w")
    records, losses, lrs = [], [], []
    wall, lap, lap_step = 0.0, time.perf_counter(), 0
    for step in range(t.steps):
        factor = lr_multiplier(cfg, step)
        for g in opt.param_groups:
            g["lr"] = o.lr * o.lr_factor * factor
        lrs.append(o.lr * o.lr_factor * factor)
        x, y = loader.next()
        with autocast(device, dtype):
            _, loss = forward(x, y)
        loss.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (step + 1) % t.eval_every == 0 or step + 1 == t.steps:
            train_loss = torch.stack(losses).float().mean().item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - lap
            wall += dt
            e0 = time.perf_counter()
            rec = {"step": step + 1, "train_loss": train_loss, "val_loss": evaluate(model, val, dtype, device),
                   "tokens_per_s": (step + 1 - lap_step) * t.batch_size * m.block_size / dt,
                   "ms_per_step": 1000 * dt / (step + 1 - lap_step), "lr": lrs[-1], "epoch": loader.epoch}
            rec["eval_s"] = time.perf_counter() - e0
            if not math.isfinite(rec["train_loss"]):
                raise SystemExit(f"non-finite training loss at step {step + 1}")
            metrics.write(json.dumps(rec, sort_keys=True) + "\n")
            metrics.flush()
            records.append(rec)
            losses, lap, lap_step = [], time.perf_counter(), step + 1
    metrics.close()
    last = records[-1]
    summary = {
        "method": "nanogpt", "rank": None, "variant": "", "seed": t.seed, "steps": t.steps,
        "final_val_loss": last["val_loss"], "final_train_loss": last["train_loss"],
        "optimizer": "adamw", "lr": o.lr, "lr_factor": o.lr_factor, "grad_clip": o.grad_clip, "dtype": t.dtype,
        "compile": bool(args.compile), "data_order": "shuffled", "val_protocol": cfg.data.val_protocol,
        "tokens_seen": t.steps * t.batch_size * m.block_size, "epoch": loader.epoch,
        "stream_fraction": t.steps * t.batch_size / loader.n_chunks, "data": dict(splits.info, source=source),
        "wall_s": wall, "ms_per_step": 1000 * wall / t.steps,
        "tokens_per_s": steady_rate([r["tokens_per_s"] for r in records]),  # as basis-train's summary
        "activation_bytes": None, "step_peak_bytes": None, "runs_per_gpu": 1, "world_size": 1,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "nanogpt": {"model_py": str(args.model_py), "sha256": hashlib.sha256(Path(args.model_py).read_bytes()).hexdigest(),
                    "vocab_size": gcfg.vocab_size, "bias": gcfg.bias,
                    "n_params": sum(p.numel() for p in model.parameters())},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-py", required=True, help="nanoGPT's model.py (kept out of the repository)")
    ap.add_argument("--out", required=True, help="run directory to write")
    ap.add_argument("--config", default="configs/gpt2-small-code.yaml")
    ap.add_argument("--data-files", help="corpus glob [default: the grid's, every **/*.py of site-packages]")
    ap.add_argument("--dataset")
    ap.add_argument("--device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--eval-every", type=int)
    ap.add_argument("--vocab-size", type=int, help="nanoGPT pads to 50304 for speed [default: the config's 50257]")
    ap.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                    help="biases in linears and LayerNorms, as GPT-2 [default: on]")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    return train(ap.parse_args(argv))


if __name__ == "__main__":
    s = main()
    print(f"final val loss {s['final_val_loss']:.4f} after {s['steps']} steps; {s['tokens_per_s']:,.0f} tokens/s")
