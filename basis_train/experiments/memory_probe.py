"""Memory of a configuration without training it: build its Run and take the measured steps.

What a step saves for backward does not depend on the weights or the text, so a few steps
of a fresh run measure what the full run's summary.json reports (on the device it runs on:
step_peak_bytes only on CUDA). Used to re-measure committed grids (scripts/remeasure_memory.py)
and for the exact-with-checkpointing line of memory.png.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from basis_train.training.config import Config, apply_overrides, load_config
from basis_train.training.train import MEMORY_FIELDS, Run

_STEPS = 3  # the allocator peak is taken on step 2 (step._MEASURE_AT_STEP), after warm-up


def measure_memory(cfg: Config, splits=None) -> dict:
    """The summary.json memory fields of `cfg`, from a short run in a temporary directory."""
    cfg = replace(cfg, train=replace(cfg.train, steps=_STEPS, checkpoint_every=_STEPS, eval_every=_STEPS),
                  log=replace(cfg.log, wandb="off"))
    with tempfile.TemporaryDirectory(prefix="basis-memory-") as tmp:
        run = Run(cfg, tmp, splits=splits, progress=False)
        for _ in range(_STEPS):
            run.train_step(run.loader.next_indices())
        return {k: run.train_step.measured.get(k) for k in MEMORY_FIELDS}


def run_config(run_dir: Path) -> Config:
    """A finished run's config; runs written before `model.head` existed used the plain head."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    cfg = load_config(run_dir / "config.yaml")
    if "head" not in (raw.get("model") or {}):
        cfg = apply_overrides(cfg, {"model.head": "plain"})
    return cfg


def checkpointing_line(run_dirs: list[Path]) -> dict[str, float]:
    """{"exact + checkpointing": activation_bytes} measured for the grid's exact config (CPU)."""
    for d in run_dirs:
        if not (d / "config.yaml").is_file():
            continue
        cfg = run_config(d)
        if cfg.train.method != "exact":
            continue
        cfg = apply_overrides(cfg, {"model.checkpoint_blocks": True, "train.device": "cpu"})
        return {"exact + checkpointing (measured, CPU)": measure_memory(cfg)["activation_bytes"]}
    return {}
