"""Command-line entry points. Each command turns user errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

import typer

from basis_train.training.config import CLI_FLAGS, ConfigError, apply_overrides, load_config


class Method(str, Enum):
    basis = "basis"
    exact = "exact"


def _is_main_process() -> bool:
    # Under torchrun every rank reaches the same errors (config, data, out dir, and the
    # collectively decided non-finite/interrupt stops), so rank 0 alone reports them.
    return os.environ.get("RANK", "0") == "0"


def fail(message: str, code: int = 2):
    if _is_main_process():
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def resolve_config(config: Path | None, flags: dict):
    """The config file (default: the paper's), then every flag the user actually gave."""
    from basis_train.data.corpus import DataError
    from basis_train.training.runio import RunError

    try:
        cfg = load_config(config)
        overrides = {CLI_FLAGS[k]: (v.value if isinstance(v, Enum) else v) for k, v in flags.items() if v is not None}
        return apply_overrides(cfg, overrides)
    except (ConfigError, DataError, RunError) as e:
        fail(str(e))


train_app = typer.Typer(add_completion=False, help="Train the paper's GPT with exact or BASIS gradients.")


@train_app.command()
def train_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML config (default: configs/paper.yaml values)"),
    method: Method | None = typer.Option(None, help="basis (default) or exact backprop"),
    rank: int | None = typer.Option(None, help="sketch rank R"),
    sketch_layers: str | None = typer.Option(None, help="mlp+head | all | none"),
    steps: int | None = typer.Option(None),
    eval_every: int | None = typer.Option(None),
    checkpoint_every: int | None = typer.Option(None),
    seed: int | None = typer.Option(None, help="fixes initial weights and batch order (pairs runs)"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda"),
    dtype: str | None = typer.Option(None, help="float32 | bfloat16 | float16 (autocast)"),
    batch_size: int | None = typer.Option(None),
    dataset: str | None = typer.Option(None, help="wiki-offline (embedded) | fineweb-edu | files"),
    data_files: str | None = typer.Option(None, help="glob of local .txt/.jsonl/.parquet files"),
    val_protocol: str | None = typer.Option(None, help="heldout (default) | paper"),
    out: str | None = typer.Option(None, help="output directory (default under runs/)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
    wandb: str | None = typer.Option(None, help="off | offline | online"),
    hashing: str | None = typer.Option(None, help="balanced | uniform | gaussian (ablations)"),
    invariant_scalars: bool | None = typer.Option(None, "--invariant-scalars/--no-invariant-scalars"),
    lam: float | None = typer.Option(None, help="lambda shrinkage (paper: 0.01)"),
    head: str | None = typer.Option(None, help="fused (chunked, never keeps the logits) | plain"),
    lr: float | None = typer.Option(None),
    optimizer: str | None = typer.Option(None, help="sgd | adamw"),
    lr_scale_sketched: float | None = typer.Option(None, help="lr factor on sketchable weights"),
    cuda_graphs: bool = typer.Option(True, "--cuda-graphs/--no-cuda-graphs"),
    compile: bool = typer.Option(False, "--compile/--no-compile"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
):
    """Train one run; writes config.yaml, metrics.jsonl, summary.json and a checkpoint."""
    from basis_train.training.runio import RunError
    from basis_train.training.train import Interrupted, NonFiniteLoss, train

    flags = {k: v for k, v in locals().items() if k in CLI_FLAGS}
    cfg = resolve_config(config, flags)
    try:
        cfg = apply_overrides(cfg, {"train.cuda_graphs": cuda_graphs, "train.compile": compile})
        summary = train(cfg, resume=resume, progress=not quiet)
    except NonFiniteLoss as e:
        fail(str(e), code=3)
    except (RunError, ConfigError) as e:
        fail(str(e))
    except Interrupted as e:
        if _is_main_process():
            typer.echo(str(e), err=True)
        raise typer.Exit(130)
    if not _is_main_process():
        return
    typer.echo(
        f"final val loss {summary['final_val_loss']:.4f}, train loss {summary['final_train_loss']:.4f}, "
        f"activations saved for backward {summary['activation_bytes'] / 2**20:.2f} MiB, "
        f"{summary['tokens_per_s']:,.0f} tokens/s"
    )


def _require_torch() -> None:
    from basis_train.torch_floor import torch_problem

    if problem := torch_problem():
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def train_main() -> None:
    _require_torch()
    train_app(prog_name="basis-train")


def _lazy(module: str, attr: str = "main"):
    def run() -> None:
        import importlib

        _require_torch()
        getattr(importlib.import_module(module), attr)()

    return run


compare_main = _lazy("basis_train.experiments.compare", "compare_main")
reproduce_main = _lazy("basis_train.experiments.reproduce", "reproduce_main")
diagnose_main = _lazy("basis_train.experiments.diagnose")
bench_main = _lazy("basis_train.experiments.bench")

if __name__ == "__main__":
    sys.exit(train_main())
