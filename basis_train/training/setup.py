"""Assembling a run from its config: device, model config, optimiser, data, seeds, variant tag."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from basis_train.core.flops import flops_per_token
from basis_train.core.model import GPTConfig
from basis_train.data.corpus import load_tokens
from basis_train.data.loaders import make_splits
from basis_train.training.config import Config
from basis_train.training.errors import RunError, warn

_SKETCH_SEED_SALT = 0x5EED5


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was requested but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def cpu_flops_per_s() -> float:
    """This machine's float32 matmul rate, measured on three 1024^3 products (about 0.1 s)."""
    a = torch.randn(1024, 1024)
    a @ a  # the first call pays for thread start-up
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 1024**3 / (time.perf_counter() - t0)


def warn_slow_cpu_run(model: torch.nn.Module, cfg: Config, min_step_s: float = 5.0) -> None:
    """A GPU-sized config started on the CPU (gpt2-small: about a minute a step on two cores) is
    said before it starts, with the time it will take at this machine's measured matmul rate."""
    m, t = cfg.model, cfg.train
    step_flops = flops_per_token(model, m.n_layer, m.n_head, m.n_embd, m.block_size) * t.batch_size * m.block_size
    if step_flops < 1e11:  # nothing a CPU takes seconds for: no need to time the machine
        return
    step_s = step_flops / cpu_flops_per_s()
    if step_s < min_step_s:
        return
    n_params = sum(p.numel() for p in model.parameters())
    warn(f"{n_params / 1e6:.0f}M parameters on the CPU: roughly {step_s:.0f} s a step at this machine's matmul "
         f"rate, {step_s * t.steps / 3600:.1f} h for {t.steps:,} steps (evaluations extra), and checkpoints of "
         f"about {n_params * 12 / 1e9:.1f} GB; this config is meant for a GPU (--device cuda)")


def check_head_kernel(cfg: Config, device: torch.device) -> None:
    """An explicit `model.head_kernel` (cce, forward-grad) that cannot run here is refused before anything starts.

    CCE serves only the exact fused head; the sketched head always runs ours, so a BASIS run
    with `cce` is accepted (an exact run of the same grid uses CCE). forward-grad keeps the head's
    dX and dW for backward as saved tensors: int8 or fp8 saved activations would quantise them."""
    if cfg.model.head_kernel == "forward-grad":
        if cfg.train.dtype == "float16":
            raise RunError("model.head_kernel forward-grad needs train.dtype bfloat16 or float32 (in float16 the loss "
                           "scale would reach the dlogits only after their cast); use --head-kernel auto")
        if cfg.train.saved_activations in ("int8", "fp8"):
            raise RunError(f"model.head_kernel forward-grad keeps the head's gradients as saved tensors, which "
                           f"train.saved_activations {cfg.train.saved_activations} would quantise; use --head-kernel auto")
        return
    if cfg.model.head_kernel != "cce":
        return
    from basis_train.core.head_cce import cce_problem

    if device.type != "cuda":
        raise RunError(f"model.head_kernel cce (Cut Cross-Entropy) needs a CUDA device, this run is on {device.type}; "
                       "use --head-kernel auto or native")
    if cfg.train.dtype == "float32":
        raise RunError("model.head_kernel cce needs train.dtype bfloat16 or float16 (CCE's backward takes only "
                       "16-bit inputs); use --head-kernel auto or native")
    if problem := cce_problem():
        raise RunError(f"model.head_kernel cce: {problem}; pip install cut-cross-entropy, "
                       "or use --head-kernel auto or native")


def rank_that_runs(cfg: Config) -> int | None:
    """The sketch rank as applied: min(R, the rows of a step); None when nothing is sketched.

    Every sketched layer (the head too) sees batch_size x block_size rows a step per process, and
    its sketch cannot have more bins than rows. At R >= rows the sketch is the whole (rescaled,
    sign-flipped) input, so a BASIS run keeps at least as much as exact backprop: say so."""
    if cfg.train.method != "basis" or cfg.sketch.layers == "none":
        return None
    rows = cfg.train.batch_size * cfg.model.block_size
    if cfg.sketch.rank >= rows:
        warn(f"sketch.rank {cfg.sketch.rank} >= the {rows} rows of a step (batch_size {cfg.train.batch_size} x "
             f"block_size {cfg.model.block_size}): R={rows} runs (summary.json records it) and BASIS saves "
             f"nothing over exact backprop here; use a rank below {rows}")
    return min(cfg.sketch.rank, rows)


def gpt_config(cfg: Config) -> GPTConfig:
    """The config's model and sketch sections, as they are."""
    return GPTConfig(**dataclasses.asdict(cfg.model), sketch=cfg.sketch)


def param_groups(model, cfg: Config) -> list[dict]:
    """The optimiser's groups: (lr scale, weight decay) per parameter.

    `lr_scale_sketched` scales the weights of the sketchable layers only: lambda scales their
    dW and nothing else, so this is the lr-matched exact baseline. A tied head's weight is the
    token embedding's (named `wte.weight`), which is not scaled. Weight decay goes where the
    architecture's recipe puts it (`GPT.no_decay`)."""
    o = cfg.optim
    lr = o.lr * o.lr_factor
    sketchable = {f"{n}.weight" for n in model.sketchable_names()}
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        groups.setdefault((n in sketchable, model.no_decay(n, p)), []).append(p)
    # The two decayed groups always, in this order (the paper model's two groups, which its
    # checkpoints hold); the decay-free ones only where the recipe has any.
    keys = [(False, False), (True, False)] + [k for k in ((False, True), (True, True)) if k in groups]
    return [{"params": groups.get(k, []), "lr": lr * (o.lr_scale_sketched if k[0] else 1.0),
             "weight_decay": 0.0 if k[1] else o.weight_decay} for k in keys]


def build_optimizer(model, cfg: Config, capturable: bool) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, cfg)
    # A captured CUDA graph bakes in a float lr; a device tensor it reads at replay.
    tensor_lr = capturable and o.schedule != "constant"
    for g in groups:
        g["base_lr"] = g["lr"]
        if tensor_lr:
            g["lr"] = torch.tensor(g["lr"], device=next(model.parameters()).device)
    if o.name == "sgd":
        # SGD's foreach update reads a tensor lr on the host (alpha=-lr), which a CUDA graph cannot capture
        # (cudaErrorStreamCaptureUnsupported); its fused kernel reads the lr where it lies.
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               fused=tensor_lr or None)
    # One fused kernel for the whole update on CUDA (what GPT-2 recipes use); foreach elsewhere.
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                             capturable=capturable, fused=fused or None)


def lr_multiplier(cfg: Config, step: int) -> float:
    """Factor on the base lr for 0-based `step`: warmup to 1, then cosine to min_lr_ratio."""
    o, total = cfg.optim, cfg.train.steps
    if o.schedule == "constant":
        return 1.0
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - 1 - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(g["base_lr"] * factor)
        else:
            g["lr"] = g["base_lr"] * factor


def sketch_seed(seed: int, proc_rank: int = 0) -> int:
    # Process 0 keeps the single-process stream; every other process needs its own, or all
    # processes would draw the same bins and signs for their (different) rows.
    return ((seed ^ _SKETCH_SEED_SALT) + proc_rank * 0x9E3779B97F4A7C15) % 2**64


def load_data(cfg: Config):
    d = cfg.data
    corpus = load_tokens(
        d.dataset if d.dataset != "files" else None, d.data_files, d.max_docs,
        Path(d.cache_dir) if d.cache_dir else None,
    )
    return make_splits(corpus, d.val_protocol, cfg.model.block_size, paper_val_docs=d.paper_val_docs,
                       heldout_every=d.heldout_every, heldout_min_tokens=d.heldout_min_tokens), corpus.source
