"""Paired multi-seed grids of runs and their report (`basis-compare`; `basis-reproduce` builds on it).

Every run is a separate `basis-train` process writing its own directory, so a grid is
resumable for free: finished runs (summary.json present, same config) are skipped and
interrupted ones continue from their checkpoint. Within a seed every configuration
starts from the same weights and sees the same batches (see train.py), which is what
makes the paired differences in the report meaningful.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from basis_train.reporting.report import (
    collect_runs,
    config_label,
    plot_memory,
    plot_val_curves,
    summarize,
    write_results_csv,
    write_summary_md,
)
from basis_train.training.config import ConfigError, apply_overrides, config_hash, dump_config, load_config
from basis_train.training.variants import grid_variants

VARIANTS = grid_variants("basis")
EXACT_VARIANTS = grid_variants("exact")
VARIANT_HELP = ("comma list of " + ",".join(sorted((set(VARIANTS) | set(EXACT_VARIANTS)) - {""}))
                + "; NAME@exact+256 limits one to exact and/or those ranks (default: everywhere it applies)")


def run_outcome(rc: int) -> str:
    """A run's exit code in words: 130 is a Ctrl-C (basis-train kept its checkpoint), not a failure."""
    return {0: "done", 130: "interrupted (Ctrl-C; its checkpoint is kept)"}.get(rc, f"FAILED rc={rc}")


def parse_variants(text: str) -> list[tuple[str, set | None]]:
    """'ckpt@exact,all@256' -> [('ckpt', {'exact'}), ('all', {256})]; None: no restriction."""
    out = []
    for spec in (v.strip() for v in text.split(",")):
        if not spec:
            continue
        name, _, where = spec.partition("@")
        if name not in VARIANTS and name not in EXACT_VARIANTS:
            raise ConfigError(f"unknown variant '{name}'; choose from {VARIANT_HELP}")
        targets = None
        if where:
            try:
                targets = {w if w == "exact" else int(w) for w in where.split("+")}
            except ValueError:
                raise ConfigError(f"variant '{spec}': after @ give exact and/or ranks joined by +") from None
        out.append((name, targets))
    return out


class GridError(Exception):
    """Runs of a grid failed or are missing: exit code 1 (bad input is 2)."""


@dataclass
class Job:
    label: str
    method: str
    rank: int | None
    variant: str
    seed: int
    out: Path
    overrides: dict


def plan(base_overrides: dict, ranks: list[int], seeds: list[int], variants: list, out: Path,
         baselines: bool = True) -> list[Job]:
    """Seed-major order: if time runs out, the finished seeds are complete sets.

    variants: names, or (name, targets) pairs from parse_variants. baselines=False leaves out
    plain exact and plain BASIS (only the variants), for an ablation grid whose baselines are
    run, or were run, by another grid of the same config.
    """
    specs = [(v, None) if isinstance(v, str) else v for v in variants]
    first = [""] if baselines else []

    def wanted(table: dict, target) -> list[str]:
        return first + [v for v, where in specs if v and v in table and (where is None or target in where)]

    jobs = []
    for seed in seeds:
        for variant in wanted(EXACT_VARIANTS, "exact"):
            ov = {**base_overrides, **EXACT_VARIANTS[variant], "train.method": "exact", "train.seed": seed}
            jobs.append(Job(config_label("exact", None, variant), "exact", None, variant, seed, out, ov))
        for rank in ranks:
            for variant in wanted(VARIANTS, rank):
                ov = {**base_overrides, **VARIANTS[variant], "train.method": "basis", "sketch.rank": rank,
                      "train.seed": seed}
                jobs.append(Job(config_label("basis", rank, variant), "basis", rank, variant, seed, out, ov))
    for j in jobs:
        slug = j.label.replace(" ", "_").replace("=", "").replace("[", "").replace("]", "")
        j.out = out / "runs" / f"{slug}-s{j.seed}"
    return jobs


def _finished(job: Job, cfg) -> bool:
    s = job.out / "summary.json"
    if not s.exists():
        return False
    try:
        return json.loads(s.read_text()).get("config_hash") == config_hash(cfg)
    except (OSError, ValueError):
        return False


class GpuSlots:
    """Hands each starting run the least-busy GPU of a list (none: the run inherits the env)."""

    def __init__(self, gpus: list[int] | None):
        self.busy = {g: 0 for g in gpus or []}
        self.lock = threading.Lock()

    def take(self) -> int | None:
        with self.lock:
            if not self.busy:
                return None
            g = min(self.busy, key=lambda k: (self.busy[k], k))
            self.busy[g] += 1
            return g

    def give(self, g: int | None) -> None:
        if g is not None:
            with self.lock:
                self.busy[g] -= 1


def _child_command(job: Job) -> list[str]:
    # A run with a checkpoint continues; one without has nothing worth keeping (a run killed before
    # its first checkpoint, or a stale one of another config), so it starts over explicitly.
    resume = (job.out / "checkpoint.pt").exists()
    return [sys.executable, "-m", "basis_train.cli", "--quiet", "--config", str(job.out / "requested.yaml"),
            "--resume" if resume else "--overwrite"]


def _say(line: str) -> None:
    print(line, flush=True)


def run_jobs(config: str | Path | None, jobs: list[Job], n_jobs: int, log=_say,
             gpus: list[int] | None = None, keep_checkpoints: bool = False, progress: bool = True,
             fleet: bool = False) -> list[Job]:
    """Run every unfinished job; returns the jobs that failed (their train.log says why).

    fleet: runs that can share a batched model train as fleets in this process
    (fleet/grid.py); only the others take the per-process path below."""
    todo, stale = [], []
    for job in jobs:
        cfg = apply_overrides(load_config(config), {**job.overrides, "log.out": str(job.out)})
        if _finished(job, cfg):
            log(f"skip (finished): {job.label} seed {job.seed}")
            continue
        # A finished run of another config, with no checkpoint to extend, would be started over
        # with --overwrite: its results would vanish. Refuse before anything runs.
        if (job.out / "summary.json").exists() and not (job.out / "checkpoint.pt").exists():
            stale.append(job)
        todo.append((job, cfg))
    if stale:
        raise ConfigError(
            f"{len(stale)} finished run(s) under {stale[0].out.parent} were made with another config "
            f"({job_names(stale)}); choose another --out, or move them away to re-run them")
    for job, cfg in todo:
        job.out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, job.out / "requested.yaml")
    cfgs = {job.out: cfg for job, cfg in todo}
    todo = [job for job, _ in todo]
    fleet_failed: list[Job] = []
    if fleet and todo:
        from basis_train.fleet.grid import run_fleets  # imports the training code

        fleet_failed, todo, stopped = run_fleets(todo, cfgs, log, keep_checkpoints, progress)
        if stopped:
            raise GridError(f"{stopped}; run the same command again to continue the grid")
        if not todo:
            return fleet_failed
    log(f"{len(todo)} runs to do, {len(jobs) - len(todo)} already finished; {n_jobs} in parallel"
        + (f" over GPUs {gpus}" if gpus else ""))
    slots = GpuSlots(gpus)
    per_gpu = -(-min(max(1, n_jobs), len(todo)) // len(gpus)) if gpus else 1
    bar = tqdm(total=len(todo), unit="run", desc="grid", disable=not progress or not todo, dynamic_ncols=True,
               file=sys.stderr)
    say = bar.write if not bar.disable else log  # lines printed above the bar, not through it
    lock = threading.Lock()

    def one(job: Job) -> int:
        cmd = _child_command(job)
        gpu = slots.take()
        env = None
        if gpu is not None:
            # How many runs this one shared its GPU with (at most): its timing means little when > 1.
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), BASIS_TRAIN_RUNS_PER_GPU=str(per_gpu))
        t = time.perf_counter()
        try:
            with open(job.out / "train.log", "a") as logf:
                rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        finally:
            slots.give(gpu)
        if rc == 0 and not keep_checkpoints:
            # A finished run's 50 MB checkpoint is only needed to extend it later.
            (job.out / "checkpoint.pt").unlink(missing_ok=True)
        where = f" on GPU {gpu}" if gpu is not None else ""
        with lock:
            say(f"{run_outcome(rc)}: {job.label} seed {job.seed}{where} "
                f"({time.perf_counter() - t:.0f}s)")
            bar.update(1)
        return rc

    try:
        with ThreadPoolExecutor(max_workers=max(1, n_jobs)) as pool:
            codes = list(pool.map(one, todo))
    finally:
        bar.close()
    return fleet_failed + [job for job, rc in zip(todo, codes) if rc != 0]


def report(out: Path, title: str, paper_table: dict | None = None, notes: list[str] = (),
           dirs: list[Path] | None = None) -> tuple[list[dict], dict[str, list[Path]]]:
    """Write the grid's report from `dirs` (default: every finished run under out/runs).

    Returns the per-configuration summary and each label's run dirs, both in table order."""
    if dirs is None:
        dirs = sorted(p.parent for p in (out / "runs").glob("*/summary.json"))
    if not dirs:
        raise ValueError(f"no finished runs under {out / 'runs'}")
    rows = collect_runs(dirs)
    write_results_csv(rows, out / "results.csv")
    summary = summarize(rows)
    write_summary_md(summary, out / "summary.md", title=title, notes=list(notes), paper_table=paper_table)
    by_label: dict[str, list[Path]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(Path(r["run_dir"]))
    # Table order (exact, then R from large to small), not the directories' string order.
    by_label = {s["label"]: by_label[s["label"]] for s in summary if s["label"] in by_label}
    plot_val_curves(by_label, out / "val_loss.png")
    from basis_train.experiments.memory_probe import checkpointing_line  # imports torch

    ckpt = [s for s in summary if s["method"] == "exact" and "ckpt" in s["variant"]]
    plot_memory(summary, out / "memory.png", lines=None if ckpt else checkpointing_line(dirs))
    return summary, by_label


def grid_report(out: Path, grid: list[Job], failed: list[Job], title: str, paper_table: dict | None = None,
                notes: list[str] = ()) -> tuple[list[dict], dict[str, list[Path]], list[Job]]:
    """Report the finished runs of `grid` only (never stale runs of another grid in the same dir);
    the third value is the planned runs missing from the report."""
    failed_dirs = {j.out for j in failed}
    done = [j for j in grid if j.out not in failed_dirs and (j.out / "summary.json").is_file()]
    missing = [j for j in grid if j not in done]
    if missing:
        notes = [*notes, f"{len(missing)} of {len(grid)} planned runs are missing from this report "
                         f"(failed or unfinished): {job_names(missing)}."]
    if not done:
        raise GridError(f"none of the {len(grid)} planned runs under {out / 'runs'} finished: {job_names(missing)}")
    summary, by_label = report(out, title, paper_table, notes, dirs=[j.out for j in done])
    return summary, by_label, missing


def job_names(jobs: list[Job], limit: int = 8) -> str:
    names = [f"{j.label} seed {j.seed}" for j in jobs]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def run_grid(config: str | None, base: dict, ranks: list[int], seeds: int, variants: list, out: Path,
             baselines: bool = True, n_jobs: int = 1, gpus: list[int] | None = None, keep_checkpoints: bool = False,
             report_only: bool = False, progress: bool = True, fleet: bool = False) -> tuple[list[Job], list[Job]]:
    """Plan, run (or resume) and report a grid; returns the planned jobs and those missing from the report.

    Bad input raises ConfigError or ValueError before any run starts; failed grids raise GridError."""
    apply_overrides(load_config(config), base)  # bad flags fail here, not once per run
    grid = plan(base, ranks, list(range(seeds)), variants, out, baselines)
    failed = [] if report_only else run_jobs(config, grid, n_jobs, gpus=gpus, keep_checkpoints=keep_checkpoints,
                                             progress=progress, fleet=fleet)
    _, _, missing = grid_report(out, grid, failed, title=f"exact vs BASIS ({out.name})")
    return grid, missing
