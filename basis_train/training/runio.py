"""A run's files: output directory, atomic checkpoints, metrics log, wandb.

Everything here is about surviving a kill at any moment: files are replaced atomically,
and on resume the metrics log is cut back to the checkpoint's step so a resumed run
writes exactly the lines an uninterrupted one would.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from basis_train.fsutil import atomic_write_bytes
from basis_train.training.config import Config, config_hash, dump_config, load_config


class RunError(Exception):
    """A user-facing problem with a run (bad input, unusable output dir): one line."""


CHECKPOINT = "checkpoint.pt"


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def save_checkpoint(out: Path, state: dict) -> None:
    atomic_write_bytes(out / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(out: Path) -> dict | None:
    path = out / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def default_out_dir(cfg: Config, variant: str) -> Path:
    what = "exact" if cfg.train.method == "exact" else f"basis-r{cfg.sketch.rank}"
    tag = f"-{variant}" if variant else ""
    return Path("runs") / f"{what}{tag}-s{cfg.train.seed}-{config_hash(cfg)[:6]}"


def prepare_out_dir(cfg: Config, out: Path, resume: bool) -> None:
    """Refuse to mix runs: an existing dir must hold this same config."""
    old = out / "config.yaml"
    if old.exists():
        try:
            same = config_hash(load_config(old)) == config_hash(cfg)
        except Exception:
            same = False
        if not same:
            hint = "choose another --out" if not resume else "--resume needs the config the run started with"
            raise RunError(f"{out} holds a run with a different config; {hint}")
        if not resume and (out / CHECKPOINT).exists():
            # Same config, no --resume: start over rather than silently continue.
            (out / CHECKPOINT).unlink()
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, old)


class MetricsLog:
    """metrics.jsonl, one JSON object per evaluation."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        lines = []
        if keep_until_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut short by a kill
                if rec.get("step", 0) <= keep_until_step:
                    lines.append(line)
        atomic_write_bytes(path, lambda f: f.write("".join(x + "\n" for x in lines).encode()))
        self.records = [json.loads(x) for x in lines]

    def append(self, rec: dict) -> None:
        self.records.append(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()


class UnwrittenMetrics:
    """What ranks other than 0 log to: nothing is written, and nothing reads it back."""

    def __init__(self) -> None:
        self.records: list = []

    def append(self, rec: dict) -> None:
        pass


class Tracker:
    """Weights & Biases run mirroring metrics.jsonl; a no-op when mode is 'off'."""

    def __init__(self, mode: str, project: str, name: str, config: dict, out: Path, run_id: str | None) -> None:
        self.run = None
        self.run_id = run_id
        if mode == "off":
            return
        try:
            import wandb  # lazy: the GPU image has no wandb
        except ImportError as e:
            raise RunError("wandb is not installed: pip install wandb, or use --wandb off") from e
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(
            project=project, name=name, config=config, dir=str(out), mode=mode,
            id=self.run_id, resume="allow", reinit=True,
        )

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step=step)

    def finish(self, summary: dict | None = None) -> None:
        if self.run is None:
            return
        if summary:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
        self.run.finish()
        self.run = None
