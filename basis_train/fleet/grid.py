"""`--fleet` for basis-compare and basis-reproduce: a grid's runs as fleets in this process.

The runs of a grid that share a model shape and everything else but seed, method, sketch
and lr factors (fleet/loop.py's `fleet_key`), and would start from the same step, train
together as one batched model; each still writes its own run directory, so skipping
finished runs, resuming and the reports work as for runs trained one process each. Runs
that cannot join a fleet (AdamW, a schedule, bf16, compile) are handed back to run alone.
"""

from __future__ import annotations

import time
from pathlib import Path

from basis_train.fleet.loop import fleet_key, fleet_refusal, train_fleet
from basis_train.training.checkpoint import CHECKPOINT, load_checkpoint
from basis_train.training.config import Config
from basis_train.training.errors import RunError
from basis_train.training.stopping import Interrupted


def _start_step(out: Path) -> int:
    # A run with a checkpoint resumes from it (as compare's children do); fleets start at one step.
    try:
        ckpt = load_checkpoint(out)
    except RunError:
        return 0  # unreadable: the member's own Run reports it
    return ckpt["step"] if ckpt else 0


def group(todo: list, cfgs: dict[Path, Config]) -> tuple[list[list], list]:
    """(fleets, alone): jobs grouped by fleet key and start step, in grid order; and those that run alone."""
    fleets: dict[tuple, list] = {}
    alone = []
    for job in todo:
        cfg = cfgs[job.out]
        if fleet_refusal(cfg) is not None:
            alone.append(job)
        else:
            fleets.setdefault((fleet_key(cfg), _start_step(job.out)), []).append(job)
    return list(fleets.values()), alone


def _note(job, text: str) -> None:
    with open(job.out / "train.log", "a") as f:
        f.write(text.rstrip("\n") + "\n")


def run_fleets(todo: list, cfgs: dict[Path, Config], log, keep_checkpoints: bool,
               progress: bool) -> tuple[list, list, str | None]:
    """Train every fleet of `todo`; returns (failed jobs, jobs left to run alone, why it stopped early:
    a stop request, after which the members are checkpointed and the same command continues them)."""
    fleets, alone = group(todo, cfgs)
    failed = []
    for jobs in fleets:
        names = ", ".join(f"{j.label} seed {j.seed}" for j in jobs[:4]) + (" ..." if len(jobs) > 4 else "")
        log(f"fleet of {len(jobs)} runs: {names}")
        for i, j in enumerate(jobs):
            _note(j, f"trained as member {i} of a fleet of {len(jobs)} in one process ({j.out.parent})")
        t = time.perf_counter()
        errors: dict[int, str] = {}
        try:
            summaries = train_fleet([(cfgs[j.out], j.out) for j in jobs], progress=progress,
                                    log=lambda line: log(f"  {line}"), errors=errors)
        except Interrupted as e:
            return failed, alone, str(e)
        except (RunError, ValueError, OSError) as e:
            for j in jobs:
                _note(j, f"error: {e}")
            log(f"FAILED fleet of {len(jobs)}: {e}")
            failed += jobs
            continue
        for i, (j, s) in enumerate(zip(jobs, summaries, strict=True)):
            if s is None:
                _note(j, f"error: {errors.get(i, 'the member did not finish')}")
                failed.append(j)
            else:
                _note(j, f"done: final val loss {s['final_val_loss']:.4f}")
                if not keep_checkpoints:
                    (j.out / CHECKPOINT).unlink(missing_ok=True)  # as compare does for a finished run
        log(f"done: fleet of {len(jobs)} in {time.perf_counter() - t:.0f}s")
    return failed, alone, None
