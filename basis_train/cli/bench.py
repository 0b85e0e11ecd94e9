"""`basis-bench`: step time and activation memory, measured (experiments/bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from basis_train.cli.app import make_app, run_app
from basis_train.core.options import HEADS
from basis_train.core.options import KERNELS as HEAD_KERNELS
from basis_train.experiments.bench_sizes import FRONTIER_METHODS, SIZES, VARIANTS
from basis_train.experiments.frontier_search import parse_budgets, parse_methods


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


app = make_app("Step time and activation memory: exact, checkpointing and BASIS, model and single layer.")


@app.command()
def bench(
    sizes: Annotated[str, typer.Option(help=f"comma-separated, from {list(SIZES)}")] = "paper,gpt2-small",
    ranks: Annotated[str, typer.Option(help="BASIS ranks R, comma-separated")] = "16,64,256",
    variants: Annotated[str, typer.Option(help=f"comma-separated, from {list(VARIANTS)}")] = ",".join(VARIANTS),
    steps: Annotated[int, typer.Option(min=1, help="timed steps")] = 30,
    warmup: Annotated[int, typer.Option(min=0, help="untimed steps first; compilation happens here")] = 5,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    compile_model: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model")] = False,
    out: Annotated[Path, typer.Option(help="output directory (the committed results: --out results/bench)")] = Path(
        "runs/bench"),
    quick: Annotated[bool, typer.Option(help="tiny shapes, for a CPU smoke test")] = False,
    memory_table: Annotated[Path | None, typer.Option(
        help="also write 'memory at two scales' here [default: not written]")] = None,
    layer: Annotated[bool, typer.Option("--layer/--no-layer", help="single-layer benchmark")] = True,
    heads: Annotated[str, typer.Option(help="GPT heads to run, from fused,plain")] = "fused,plain",
    head_bench: Annotated[bool, typer.Option("--head-bench/--no-head-bench",
                                             help="the head alone: plain, ours, Liger, CCE")] = True,
    speed_targets: Annotated[bool, typer.Option("--targets", help="instead: the fused-kernel speed targets "
                                          "(CUDA graphs), merged into OUT/targets.json [default: off]")] = False,
    seed: Annotated[int, typer.Option(help="model init and sketch seed")] = 0,
    frontier: Annotated[bool, typer.Option("--frontier", help="instead: the memory frontier, per memory method the "
                                           "largest batch (T=1024) and longest context (batch 1) of GPT-2 small "
                                           "that fit each --budget, into OUT/frontier.{json,md,png} [default: off]")] = False,
    budget: Annotated[str, typer.Option(help="--frontier's memory budgets in GiB, comma-separated, e.g. 8,16,40")] = "",
    methods: Annotated[str, typer.Option(help=f"--frontier's methods, comma-separated, from {list(FRONTIER_METHODS)}")
                       ] = "all",
    timed_steps: Annotated[int, typer.Option(min=1, help="--frontier: timed steps at each answer")] = 5,
    max_probes: Annotated[int | None, typer.Option(min=1, help="--frontier: probes per search "
                                                               "[default: as many as a full search needs]")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="--frontier: keep the methods OUT/frontier.json already "
                                                          "has from a run with the same settings [default: off]")] = False,
    host_limit_gib: Annotated[float | None, typer.Option(min=0.001, help="--frontier: the most host memory offload "
                                                         "may pin [default: half of MemAvailable at the start]")] = None,
    head_kernel: Annotated[str, typer.Option(help="fused head's kernel: auto (= native, ours) | native | "
                                                  "forward-grad (ours, gradients made in forward) | "
                                                  "cce (Cut Cross-Entropy, CUDA bf16)")] = "auto",
) -> None:
    """Benchmark exact, checkpointed and BASIS training steps, and one linear layer."""
    import torch

    from basis_train.experiments.bench import run_bench

    variant_list = [v.removeprefix("basis").strip(" -_") for v in _csv(variants)]
    head_list = _csv(heads)
    for given, known, what in ((_csv(sizes), SIZES, "size"), (variant_list, VARIANTS, "variant"),
                               (head_list, HEADS, "head")):
        if unknown := [x for x in given if x not in known]:
            raise typer.BadParameter(f"unknown {what} {unknown}; choose from {list(known)}")
    rank_list = [int(r) for r in _csv(ranks) if r.isdigit()]
    if not rank_list or len(rank_list) < len(_csv(ranks)) or min(rank_list) < 1:
        raise typer.BadParameter(f"ranks must be positive integers, got {ranks!r}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda, but torch sees no CUDA device")
    if speed_targets:
        if dev.type != "cuda":
            raise typer.BadParameter("--targets needs a CUDA GPU")
        from basis_train.experiments.bench_kernels import report_targets

        report_targets(out)
        return
    if not frontier and (budget.strip() or resume or host_limit_gib):
        raise typer.BadParameter("--budget, --resume and --host-limit-gib are --frontier's options")
    if frontier:
        _frontier(budget, methods, dev, out, quick, seed, max_probes, timed_steps, resume, host_limit_gib)
        return
    if head_kernel not in HEAD_KERNELS:
        raise typer.BadParameter(f"unknown head kernel {head_kernel!r}; choose from {list(HEAD_KERNELS)}")
    failed = run_bench(_csv(sizes), rank_list, variant_list, head_list, dev, out, steps, warmup, compile_model, quick,
                       memory_table, layer, head_bench, seed, head_kernel)
    if failed:
        typer.echo(f"{failed} measurement(s) failed; see 'error' and 'traceback' in the JSON files", err=True)
        raise typer.Exit(1)


def _frontier(budget: str, methods: str, dev, out: Path, quick: bool, seed: int, max_probes: int | None,
              timed_steps: int, resume: bool, host_limit_gib: float | None) -> None:
    from basis_train.experiments.frontier import FrontierError, run_frontier

    if not budget.strip():
        raise typer.BadParameter("--frontier needs --budget GIB[,GIB...]")
    try:
        budgets, names = parse_budgets(budget), parse_methods(methods, FRONTIER_METHODS)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    try:
        failed = run_frontier(budgets, out, dev, quick, {k: FRONTIER_METHODS[k] for k in names}, seed, max_probes,
                              timed_steps, resume, host_limit_gib)
    except FrontierError as e:
        raise typer.BadParameter(str(e)) from None
    if failed:
        typer.echo(f"{failed} method(s) failed; see 'error' and 'traceback' in {out / 'frontier.json'}", err=True)
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> None:
    run_app(app, "basis-bench", argv)


if __name__ == "__main__":
    main()
