"""`basis-reproduce`: the paper's Table 3 protocol under both validation protocols (experiments/reproduce.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from basis_train.cli.app import (
    FLEET_HELP,
    GRID_QUIET,
    GRID_STEPS,
    JOBS,
    SEEDS,
    check_counts,
    fail,
    keep_checkpoints_option,
    make_app,
    report_only_option,
    run_app,
)
from basis_train.experiments.compare import GridError, job_names
from basis_train.experiments.reproduce import reproduce_grids
from basis_train.training.config import ConfigError

reproduce_app = make_app("The paper's Table 3 protocol (exact, R = 64, 32, 16, 8, 1), both validation protocols.")


@reproduce_app.command()
def reproduce(
    config: str = typer.Option("paper", "--config", "-c", help="YAML config or shipped config name"),
    seeds: int = SEEDS,
    steps: int | None = GRID_STEPS,
    protocols: str = typer.Option("heldout,paper", help="comma list of validation protocols: heldout, paper"),
    out: Path = typer.Option(Path("runs/reproduce"), help="one grid per protocol in OUT/<protocol>/ "
                                                         "(the committed results: --out results/paper)"),
    jobs: int = JOBS,
    checkpoint_every: int = typer.Option(10000, help="checkpoint every N steps"),
    keep_checkpoints: bool = keep_checkpoints_option("later"),
    report_only: bool = report_only_option("reports"),
    quiet: bool = GRID_QUIET,
    fleet: bool | None = typer.Option(
        None, "--fleet/--no-fleet", help=FLEET_HELP.replace("[default: off]", "[default: on where the runs train on "
                                                               "CUDA, off on CPU]")),
):
    """Exact and R = 64, 32, 16, 8, 1, seeds 0..N-1, each protocol in OUT/<protocol>/.

    Exits 1 when runs fail (the reports then hold the others and name the missing ones)."""
    check_counts(seeds=seeds, jobs=jobs)
    try:
        missing = reproduce_grids(config, seeds, steps, [p for p in protocols.split(",") if p], out, jobs,
                                  checkpoint_every, keep_checkpoints, report_only, not quiet, fleet, log=typer.echo)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    except GridError as e:
        fail(str(e), code=1)
    if missing:
        fail(f"{len(missing)} runs failed or are unfinished and are missing from the reports: {job_names(missing)}",
             code=1)


def main(argv: list[str] | None = None) -> None:
    run_app(reproduce_app, "basis-reproduce", argv)


if __name__ == "__main__":
    main()
