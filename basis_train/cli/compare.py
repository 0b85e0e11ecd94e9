"""`basis-compare`: exact vs BASIS at several ranks, paired over seeds (experiments/compare.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from basis_train.cli.app import (
    CHECKPOINT_EVERY,
    CONFIG_HELP,
    DEVICE,
    EVAL_EVERY,
    FLEET_HELP,
    GRID_QUIET,
    GRID_STEPS,
    JOBS,
    SEEDS,
    VAL_PROTOCOL,
    check_counts,
    config_flag,
    fail,
    keep_checkpoints_option,
    make_app,
    report_only_option,
    run_app,
)
from basis_train.experiments.compare import VARIANT_HELP, GridError, job_names, parse_variants, run_grid
from basis_train.training.config import ConfigError


def parse_ints(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be a comma list of integers, got {text!r}") from None
    if not vals or min(vals) < minimum:
        raise typer.BadParameter(f"{what} must be integers >= {minimum}, got {text!r}")
    return vals


def _gpu_list(text: str) -> list[int] | None:
    if not text.strip():
        return None
    gpus = parse_ints(text, "--gpus", minimum=0)
    if len(set(gpus)) != len(gpus):
        raise typer.BadParameter(f"--gpus must not repeat a device, got {text!r}")
    return gpus


compare_app = make_app("Exact vs BASIS at several ranks, paired over seeds; each run a basis-train process.")


@compare_app.command()
def compare(
    config: str | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    ranks: str = typer.Option("32,16,8", help="comma list of sketch ranks R"),
    seeds: int = SEEDS,
    variants: str = typer.Option("", help=f"{VARIANT_HELP} [default: none]"),
    steps: int | None = GRID_STEPS,
    eval_every: int | None = EVAL_EVERY,
    checkpoint_every: int | None = CHECKPOINT_EVERY,
    val_protocol: str | None = VAL_PROTOCOL,
    device: str | None = DEVICE,
    dataset: str | None = config_flag("data.dataset", "wiki-offline | fineweb-edu | files"),
    data_files: str | None = config_flag(
        "data.data_files", "glob of local text files (any UTF-8; .jsonl/.json/.parquet as records)"),
    out: Path = typer.Option(Path("runs/compare"), help="grid directory: runs/ per run, then the report"),
    jobs: int = JOBS,
    gpus: str = typer.Option("", help="comma list of CUDA device indices to spread the parallel runs over "
                                      "[default: all runs see the same devices]"),
    baselines: bool = typer.Option(True, help="--no-baselines: run only the variants (baselines from elsewhere)"),
    keep_checkpoints: bool = keep_checkpoints_option("later with more steps"),
    report_only: bool = report_only_option("report"),
    quiet: bool = GRID_QUIET,
    fleet: bool = typer.Option(False, "--fleet", help=FLEET_HELP),
):
    """Run (or resume) the grid, then write results.csv, summary.md, val_loss.png, memory.png.

    Exits 1 when runs fail (the report then holds the others and names the missing ones)."""
    try:
        names = parse_variants(variants)
    except ConfigError as e:
        fail(str(e))
    check_counts(seeds=seeds, jobs=jobs)
    flags = {"train.steps": steps, "train.eval_every": eval_every, "train.checkpoint_every": checkpoint_every,
             "data.val_protocol": val_protocol, "train.device": device, "data.dataset": dataset,
             "data.data_files": data_files}
    base = {k: v for k, v in flags.items() if v is not None}
    try:
        grid, missing = run_grid(config, base, parse_ints(ranks, "--ranks"), seeds, names, out, baselines, jobs,
                                 _gpu_list(gpus), keep_checkpoints, report_only, not quiet, fleet)
    except (ConfigError, typer.BadParameter, ValueError) as e:
        fail(str(e))
    except GridError as e:
        fail(str(e), code=1)
    typer.echo(f"wrote {out / 'summary.md'}")
    if missing:
        fail(f"{len(missing)} of {len(grid)} runs failed or are unfinished and are missing from the report: "
             f"{job_names(missing)} (see train.log in their directories under {out / 'runs'})", code=1)


def main(argv: list[str] | None = None) -> None:
    run_app(compare_app, "basis-compare", argv)


if __name__ == "__main__":
    main()
