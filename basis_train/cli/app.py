"""What every command shares: one-line errors and exit codes, the app factory, shared options.

Exit codes: 0 done, 1 runs or measurements failed, 2 bad input (one `error: ` line on stderr),
3 a non-finite loss, 130 interrupted."""

from __future__ import annotations

import os
import sys

import typer

from basis_train.training.config import Config

try:  # typer vendors click from 0.2x on; older ones raise click's own exceptions
    from typer import TyperException as _CliError
except ImportError:  # pragma: no cover
    from click import ClickException as _CliError


def is_main_process() -> bool:
    # Under torchrun every rank reaches the same errors (config, data, out dir, and the
    # collectively decided non-finite/interrupt stops), so rank 0 alone reports them.
    return os.environ.get("RANK", "0") == "0"


def fail(message: str, code: int = 2):
    if is_main_process():
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
        if is_main_process():
            typer.echo(f"error: {exc.format_message()} (see {prog_name} --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def _require_torch() -> None:
    from basis_train.torch_floor import torch_problem

    if problem := torch_problem():
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def config_default(key: str) -> str:
    """Help text for a flag that overrides config key `key`: where its default comes from."""
    section, name = key.split(".")
    value = getattr(getattr(Config(), section), name)
    shown = "none" if value is None else str(value).lower() if isinstance(value, bool) else value
    return f"[default: --config's {key}, else {shown}]"


def config_flag(key: str, help: str, *names: str):
    """A flag that overrides config key `key` only when given (None otherwise, so YAML values survive)."""
    return typer.Option(None, *names, help=f"{help} {config_default(key)}")


# Options several commands declare alike; Typer builds a fresh click option from each per command.
EVAL_EVERY = config_flag("train.eval_every", "evaluate every N steps")
CHECKPOINT_EVERY = config_flag("train.checkpoint_every", "checkpoint every N steps")
VAL_PROTOCOL = config_flag("data.val_protocol", "heldout | paper")
DEVICE = config_flag("train.device", "auto | cpu | cuda")
GRID_STEPS = config_flag("train.steps", "training steps per run")
SEEDS = typer.Option(5, help="number of seeds: runs use seeds 0..N-1")
JOBS = typer.Option(1, help="runs in parallel (processes)")
GRID_QUIET = typer.Option(False, "--quiet", help="no progress bar over the grid [default: off]")
# --config's help in basis-compare and basis-diagnose (which has no -c)
CONFIG_HELP = "YAML config or shipped config name (paper, tiny, ...) [default: paper's protocol]"
FLEET_HELP = ("train the runs that share a model shape together in this process, as one batched model "
              "(each still writes its own run directory); --jobs and --gpus then apply only to runs that "
              "cannot join a fleet (AdamW, a schedule, bf16, compile) [default: off]")


def keep_checkpoints_option(later: str) -> typer.models.OptionInfo:
    return typer.Option(False, "--keep-checkpoints", help="keep each finished run's checkpoint.pt (needed only to "
                                                          f"extend a run {later}) [default: deleted once the run finishes]")


def report_only_option(what: str) -> typer.models.OptionInfo:
    return typer.Option(False, "--report-only", help=f"only write the {what} from finished runs [default: off]")


def check_counts(**counts: int) -> None:
    """Grid sizes from the command line (--seeds, --jobs) must be positive: one line, exit 2."""
    for name, value in counts.items():
        if value < 1:
            fail(f"--{name} must be >= 1, got {value}")
