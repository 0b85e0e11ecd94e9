"""`basis-diagnose`: how far BASIS weight gradients are from exact ones (experiments/diagnose.py)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from basis_train.cli.app import CONFIG_HELP, fail, make_app, run_app
from basis_train.data.corpus import DataError
from basis_train.reporting.diagnose_report import DEFAULT_RANKS, VARIANTS
from basis_train.training.config import ConfigError

app = make_app("Estimator diagnostics: error, cosine, norm and bias of BASIS weight gradients vs exact.")
Opt = typer.Option


@app.command()
def run(
    config: Annotated[str | None, Opt(help=CONFIG_HELP)] = None,
    checkpoint: Annotated[Path | None, Opt(help="load the 'model' state_dict of this checkpoint [default: fresh init]")] = None,
    after_steps: Annotated[int, Opt(help="first train this many steps (basis_train.training.train)")] = 0,
    seed: Annotated[int | None, Opt(help="init and sketch seed [default: the config's train.seed]")] = None,
    ranks: Annotated[str, Opt(help="comma list of sketch ranks; 'rows' = batch x sequence")] = DEFAULT_RANKS,
    variants: Annotated[str, Opt(help="comma list of: " + ", ".join(VARIANTS))] = ",".join(VARIANTS),
    draws: Annotated[int, Opt(help="estimates per batch, layer, rank and variant")] = 200,
    batches: Annotated[int, Opt(help="real training batches")] = 4,
    batch_size: Annotated[int | None, Opt(help="sequences per batch [default: the config's train.batch_size]")] = None,
    sketch_layers: Annotated[str | None, Opt(help="mlp+head, mlp, all, or a comma list of layer names "
                                                      "[default: the config's sketch.layers]")] = None,
    device: Annotated[str, Opt(help="auto, cpu or cuda")] = "auto",
    out: Annotated[Path, Opt(help="output directory (the committed results: --out results/diagnostics)")] = Path(
        "runs/diagnostics"),
    progress: Annotated[bool, Opt(help="show a progress bar")] = True,
) -> None:
    """Measure error, cosine, norm and bias of BASIS weight-gradient estimates against exact backprop."""
    options = dict(locals())
    from basis_train.experiments.diagnose import DiagnoseError, diagnose  # torch: not for --help

    if Path(sys.argv[0]).name == "diagnose.py":
        command = shlex.join(["python", "-m", "basis_train.cli.diagnose", *sys.argv[1:]])
    else:  # a console script, or called in-process: rebuild the flags from the parsed options
        command = shlex.join(["basis-diagnose", *(f"--{k.replace('_', '-')}={v}" for k, v in options.items()
                                                  if v is not None and k != "progress")])
    try:
        meta = diagnose(**options, command=command)
    except (DiagnoseError, ConfigError, DataError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {out}/ (summary.md, diagnostics.csv, overall.csv, plots) in {meta['wall_s']:.0f} s")


def main(argv: list[str] | None = None) -> None:
    run_app(app, "basis-diagnose", argv)


if __name__ == "__main__":
    main()
