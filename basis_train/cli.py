"""Command-line entry points. Each command turns user errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

import typer

from basis_train.training.config import CLI_FLAGS, Config, ConfigError, apply_overrides, load_config

try:  # typer vendors click from 0.2x on; older ones raise click's own exceptions
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover
    from click import ClickException as _CliError


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


def make_app(help: str) -> typer.Typer:
    """Every command's app: plain click help, which wraps long option names instead of cutting
    them off at 80 columns the way rich's option table does."""
    return typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False, help=help)


def run_app(app: typer.Typer, prog_name: str, argv: list[str] | None = None) -> None:
    """Run `app`, with click's multi-line usage errors (unknown option, bad number) as one line, exit 2."""
    _require_torch()
    try:
        code = app(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a training loop
        typer.echo("aborted", err=True)
        sys.exit(130)
    except _CliError as exc:  # outside the command, so fail()'s typer.Exit would not be caught
        if _is_main_process():
            typer.echo(f"error: {exc.format_message()} (see {prog_name} --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def config_default(key: str) -> str:
    """Help text for a flag that overrides config key `key`: where its default comes from."""
    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"[default: --config's {key}, else {shown}]"


def _opt(key: str, help: str, *names: str):
    return typer.Option(None, *names, help=f"{help} {config_default(key)}")


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
    method: Method | None = _opt("train.method", "basis or exact backprop"),
    rank: int | None = _opt("sketch.rank", "sketch rank R"),
    sketch_layers: str | None = _opt("sketch.layers", "mlp+head | all | none"),
    steps: int | None = _opt("train.steps", "training steps (with --resume: may raise a run's steps)"),
    eval_every: int | None = _opt("train.eval_every", "evaluate every N steps"),
    checkpoint_every: int | None = _opt("train.checkpoint_every", "checkpoint every N steps"),
    seed: int | None = _opt("train.seed", "fixes initial weights and batch order (pairs runs)"),
    device: str | None = _opt("train.device", "auto | cpu | cuda"),
    dtype: str | None = _opt("train.dtype", "float32 | bfloat16 | float16 (autocast)"),
    batch_size: int | None = _opt("train.batch_size", "sequences per step (per GPU under torchrun)"),
    dataset: str | None = _opt("data.dataset", "wiki-offline (embedded) | fineweb-edu | files"),
    data_files: str | None = _opt("data.data_files", "glob of local text files, any UTF-8 (implies --dataset files)"),
    val_protocol: str | None = _opt("data.val_protocol", "heldout | paper"),
    out: str | None = typer.Option(
        None, help="output directory [default: --config's log.out, else runs/<method>-s<seed>-<config hash>]"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its checkpoint [default: off]"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace the run already in --out (its checkpoint and metrics) [default: off]"),
    wandb: str | None = _opt("log.wandb", "off | offline | online"),
    hashing: str | None = _opt("sketch.hashing", "balanced | uniform | gaussian (ablations)"),
    invariant_scalars: bool | None = _opt("sketch.invariant_scalars", "rescale sketches to the input's norm",
                                          "--invariant-scalars/--no-invariant-scalars"),
    lam: float | None = _opt("sketch.lam", "lambda shrinkage of the sketches"),
    head: str | None = _opt("model.head", "fused (chunked, never keeps the logits) | plain"),
    head_kernel: str | None = _opt("model.head_kernel",
                                   "the exact fused head's kernel: auto (= native, ours) | native | cce (Cut "
                                   "Cross-Entropy on CUDA, bf16/fp16; its bf16 gradient sums cost loss)"),
    lr: float | None = _opt("optim.lr", "learning rate"),
    optimizer: str | None = _opt("optim.name", "sgd | adamw"),
    lr_scale_sketched: float | None = _opt("optim.lr_scale_sketched", "lr factor on the sketchable weights"),
    cuda_graphs: bool | None = _opt("train.cuda_graphs", "replay each step as one CUDA graph",
                                    "--cuda-graphs/--no-cuda-graphs"),
    compile: bool | None = _opt("train.compile", "torch.compile the model", "--compile/--no-compile"),
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


def train_main(argv: list[str] | None = None) -> None:
    run_app(train_app, "basis-train", argv)


def _lazy(module: str, app: str, prog_name: str):
    def main(argv: list[str] | None = None) -> None:
        import importlib

        run_app(getattr(importlib.import_module(module), app), prog_name, argv)

    return main


compare_main = _lazy("basis_train.experiments.compare", "compare_app", "basis-compare")
reproduce_main = _lazy("basis_train.experiments.reproduce", "reproduce_app", "basis-reproduce")
diagnose_main = _lazy("basis_train.experiments.diagnose", "app", "basis-diagnose")
bench_main = _lazy("basis_train.experiments.bench", "app", "basis-bench")

if __name__ == "__main__":
    train_main()
