"""What a grid directory holds: finished, stale and interrupted runs, how long runs took, and the
copy to and from another machine (experiments/scale_grid.py schedules the runs)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tarfile
from pathlib import Path

from basis_train.training.config import config_hash

DIVERGED = "diverged.json"  # written by a run that stopped on a non-finite loss


def _same_config(path: Path, cfg) -> bool:
    try:
        return json.loads(path.read_text()).get("config_hash") == config_hash(cfg)
    except (OSError, ValueError):
        return False


def finished(run: Path, cfg) -> bool:
    return _same_config(run / "summary.json", cfg)


def final_loss(run: Path) -> float | None:
    """A finished run's final validation loss; inf for one that diverged; None while unfinished."""
    if (run / DIVERGED).is_file():
        return math.inf
    try:
        return float(json.loads((run / "summary.json").read_text())["final_val_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def diverged(run: Path, cfg) -> bool:
    """The run stopped on a non-finite loss (diverged.json, written by the child): a result of an
    lr sweep, not a run to retry."""
    return _same_config(run / DIVERGED, cfg)




def stale(run: Path, cfg) -> bool:
    """A finished run of another config with no checkpoint to extend: never started over silently."""
    return (run / "summary.json").is_file() and not (run / "checkpoint.pt").is_file() and not finished(run, cfg)


def steps_done(run: Path, cfg) -> int:
    """Steps a resumed run skips: the last checkpoint at or before its last logged evaluation."""
    if not (run / "checkpoint.pt").is_file():
        return 0
    try:
        last = max(json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip())
    except (OSError, ValueError, KeyError):
        return 0
    return (last // cfg.train.checkpoint_every) * cfg.train.checkpoint_every


class Timings:
    """Seconds per step of each finished child process (wall clock: start-up and evaluations in),
    by kind of run, to tell how long the next one will take."""

    def __init__(self, path: Path, default_s_per_step: float, startup_s: float):
        self.path, self.default, self.startup = path, default_s_per_step, startup_s
        self.rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []

    @staticmethod
    def kind(cfg, job_kind: str = "train") -> str:
        if job_kind != "train":
            return job_kind
        eager = "" if cfg.train.compile else "-eager"
        if cfg.train.method == "exact":
            return ("exact-ckpt" if cfg.model.checkpoint_blocks else "exact") + eager
        return f"basis-{cfg.sketch.layers}-{cfg.sketch.rank}{eager}"

    def rate(self, cfg, job_kind: str = "train") -> float:
        same = [r["s_per_step"] for r in self.rows if r["kind"] == self.kind(cfg, job_kind)]
        return statistics.median(same or [r["s_per_step"] for r in self.rows] or [self.default])

    def estimate(self, cfg, steps: int, job_kind: str = "train") -> float:
        return self.startup + self.rate(cfg, job_kind) * steps

    def add(self, cfg, steps: int, wall_s: float, job_kind: str = "train") -> None:
        if steps < 50:  # too short to say anything but the start-up
            return
        row = {"kind": self.kind(cfg, job_kind), "s_per_step": max(0.0, wall_s - self.startup) / steps,
               "steps": steps}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------ the trip between machines


def settled_dirs(runs: Path) -> list[Path]:
    """Run directories that finished or diverged: nothing more to run there."""
    return sorted(d for d in runs.glob("*") if (d / "summary.json").is_file() or (d / DIVERGED).is_file())


def seed_from(src: Path, grid: Path) -> int:
    """Copy the finished and diverged runs that grid lacks from src (a runs/ folder or its parent)."""
    src = src / "runs" if (src / "runs").is_dir() else src
    n = 0
    have = {d.name for d in settled_dirs(grid / "runs")}
    for run in settled_dirs(src):
        if run.name not in have:
            dest = grid / "runs" / run.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint.pt"))
            n += 1
    if (src.parent / "timings.jsonl").is_file() and not (grid / "timings.jsonl").exists():
        shutil.copy(src.parent / "timings.jsonl", grid / "timings.jsonl")
    return n


def pack(grid: Path, dest: Path) -> None:
    """Finished and diverged runs, the log and the timings, without checkpoints, as a .tgz."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        for run in settled_dirs(grid / "runs"):
            for f in sorted(run.iterdir()):
                if f.name != "checkpoint.pt":
                    tar.add(f, arcname=f"runs/{run.name}/{f.name}")
        for name in ("grid.log", "timings.jsonl"):
            if (grid / name).is_file():
                tar.add(grid / name, arcname=name)


