"""`basis-train`: one run of the paper's GPT, every flag an override of the config file."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from basis_train.cli.app import (
    CHECKPOINT_EVERY,
    DEVICE,
    EVAL_EVERY,
    VAL_PROTOCOL,
    config_flag,
    fail,
    is_main_process,
    make_app,
    run_app,
)
from basis_train.training.config import ConfigError, apply_overrides, load_config


class Method(str, Enum):
    basis = "basis"
    exact = "exact"


# basis-train's flags (train_cmd's parameter names) and the config keys they override.
CLI_FLAGS: dict[str, str] = {
    "rank": "sketch.rank", "sketch_layers": "sketch.layers", "hashing": "sketch.hashing",
    "invariant_scalars": "sketch.invariant_scalars", "lam": "sketch.lam",
    "method": "train.method", "steps": "train.steps", "eval_every": "train.eval_every",
    "seed": "train.seed", "device": "train.device", "batch_size": "train.batch_size",
    "dtype": "train.dtype", "checkpoint_every": "train.checkpoint_every",
    "dataset": "data.dataset", "data_files": "data.data_files",
    "val_protocol": "data.val_protocol", "out": "log.out", "wandb": "log.wandb",
    "head": "model.head", "head_kernel": "model.head_kernel", "lr": "optim.lr", "optimizer": "optim.name",
    "lr_scale_sketched": "optim.lr_scale_sketched",
    "cuda_graphs": "train.cuda_graphs", "compile": "train.compile",
}


def resolve_config(config: str | None, flags: dict, run_dir: str | None = None):
    """The config file (default: the paper's), then every flag the user actually gave.
    `run_dir`: a run to resume, whose own config.yaml is the base when no --config is given."""
    from basis_train.data.corpus import DataError
    from basis_train.training.errors import RunError

    try:
        saved = Path(run_dir) / "config.yaml" if run_dir and config is None else None
        cfg = load_config(saved if saved and saved.is_file() else config)
        overrides = {CLI_FLAGS[k]: (v.value if isinstance(v, Enum) else v) for k, v in flags.items() if v is not None}
        return apply_overrides(cfg, overrides)
    except (ConfigError, DataError, RunError) as e:
        fail(str(e))


def _os_error_line(exc: OSError) -> str:
    from basis_train.data.corpus import default_cache_dir

    where = exc.filename or ""
    msg = f"cannot access {where}: {exc.strerror or exc}" if where else f"file system error: {exc}"
    try:
        if where and Path(where).resolve().is_relative_to(default_cache_dir().resolve()):
            msg += " (the token cache; point BASIS_TRAIN_CACHE at a writable directory)"
    except OSError:
        pass
    return msg


train_app = make_app("Train the paper's GPT with exact or BASIS gradients (flags override --config).")


@train_app.command()
def train_cmd(
    config: str | None = typer.Option(
        None, "--config", "-c",
        help="YAML config file, or a shipped config's name: paper, tiny, gpt2-small [default: paper's protocol]"),
    method: Method | None = config_flag("train.method", "basis or exact backprop"),
    rank: int | None = config_flag("sketch.rank", "sketch rank R"),
    sketch_layers: str | None = config_flag("sketch.layers", "mlp+head | mlp | all | none"),
    steps: int | None = config_flag("train.steps", "training steps (with --resume: may raise a run's steps)"),
    eval_every: int | None = EVAL_EVERY,
    checkpoint_every: int | None = CHECKPOINT_EVERY,
    seed: int | None = config_flag("train.seed", "fixes initial weights and batch order (pairs runs)"),
    device: str | None = DEVICE,
    dtype: str | None = config_flag("train.dtype", "float32 | bfloat16 | float16 (autocast)"),
    batch_size: int | None = config_flag("train.batch_size", "sequences per step (per GPU under torchrun)"),
    dataset: str | None = config_flag("data.dataset", "wiki-offline (embedded) | fineweb-edu | files"),
    data_files: str | None = config_flag("data.data_files",
                                         "glob of local text files, any UTF-8 (implies --dataset files)"),
    val_protocol: str | None = VAL_PROTOCOL,
    out: str | None = typer.Option(
        None, help="output directory [default: --config's log.out, else runs/<method>-s<seed>-<config hash>]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint [default: off]"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace the run already in --out (its checkpoint and metrics) [default: off]"),
    wandb: str | None = config_flag("log.wandb", "off | offline | online"),
    hashing: str | None = config_flag("sketch.hashing", "balanced | uniform | gaussian (ablations)"),
    invariant_scalars: bool | None = config_flag("sketch.invariant_scalars", "rescale sketches to the input's norm",
                                                 "--invariant-scalars/--no-invariant-scalars"),
    lam: float | None = config_flag("sketch.lam", "lambda shrinkage of the sketches"),
    head: str | None = config_flag("model.head", "fused (chunked, never keeps the logits) | plain"),
    head_kernel: str | None = config_flag("model.head_kernel",
                                          "the fused head's kernel: auto (= native, ours) | native | forward-grad "
                                          "(ours, dX and dW made in forward: no logits recompute) | cce (Cut "
                                          "Cross-Entropy on CUDA, bf16/fp16; its bf16 gradient sums cost loss)"),
    lr: float | None = config_flag("optim.lr", "learning rate"),
    optimizer: str | None = config_flag("optim.name", "sgd | adamw"),
    lr_scale_sketched: float | None = config_flag("optim.lr_scale_sketched", "lr factor on the sketchable weights"),
    cuda_graphs: bool | None = config_flag("train.cuda_graphs", "replay each step as one CUDA graph",
                                           "--cuda-graphs/--no-cuda-graphs"),
    compile: bool | None = config_flag("train.compile", "torch.compile the model", "--compile/--no-compile"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar or start/end messages [default: off]"),
):
    """Train one run; writes config.yaml, metrics.jsonl, summary.json and checkpoint.pt to --out."""
    from basis_train.training.errors import RunError
    from basis_train.training.train import Interrupted, NonFiniteLoss, train

    flags = {k: v for k, v in locals().items() if k in CLI_FLAGS}
    cfg = resolve_config(config, flags, run_dir=out if resume else None)
    try:
        summary = train(cfg, resume=resume, overwrite=overwrite, progress=not quiet)
    except NonFiniteLoss as e:
        fail(str(e), code=3)
    except (RunError, ConfigError) as e:
        fail(str(e))
    except OSError as e:  # a read-only or full disk, mostly: the user's to fix, not a crash
        fail(_os_error_line(e))
    except Interrupted as e:
        if is_main_process():
            typer.echo(str(e), err=True)
        raise typer.Exit(130)
    if not is_main_process():
        return
    typer.echo(
        f"final val loss {summary['final_val_loss']:.4f}, train loss {summary['final_train_loss']:.4f}, "
        f"activations saved for backward {summary['activation_bytes'] / 2**20:.2f} MiB, "
        f"{summary['tokens_per_s']:,.0f} tokens/s"
    )


def main(argv: list[str] | None = None) -> None:
    run_app(train_app, "basis-train", argv)


if __name__ == "__main__":
    main()
