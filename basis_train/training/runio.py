"""A run's files: output directory, atomic checkpoints, metrics log, wandb.

Everything here is about surviving a kill at any moment: files are replaced atomically,
and on resume the metrics log is cut back to the checkpoint's step so a resumed run
writes exactly the lines an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch

from basis_train.fsutil import atomic_write_bytes
from basis_train.training.config import HASH_IGNORE, Config, ConfigError, config_hash, dump_config, load_config


class RunError(Exception):
    """A user-facing problem with a run (bad input, unusable output dir): one line."""


CHECKPOINT = "checkpoint.pt"


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def save_checkpoint(out: Path, state: dict) -> None:
    atomic_write_bytes(out / CHECKPOINT, lambda f: torch.save(state, f))


def load_checkpoint(out: Path) -> dict | None:
    """The checkpoint in `out`, None if there is none; a file that is not one is a RunError."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, random bytes, an empty file: torch raises all sorts
        raise RunError(f"{path} is not a readable checkpoint ({_first_line(exc)}); "
                       "delete it to restart from scratch, or start over with --overwrite") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise RunError(f"{path} is not a basis-train checkpoint; start over with --overwrite")
    return ckpt


def checkpoint_note(out: Path) -> str:
    """What a stopped run left to resume from, for its error message."""
    if (out / CHECKPOINT).is_file():
        return f"the last good checkpoint in {out} was kept (continue with --resume)"
    return f"no checkpoint had been written to {out} yet, so nothing was kept"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def default_out_dir(cfg: Config, variant: str) -> Path:
    what = "exact" if cfg.train.method == "exact" else f"basis-r{cfg.sketch.rank}"
    tag = f"-{variant}" if variant else ""
    return Path("runs") / f"{what}{tag}-s{cfg.train.seed}-{config_hash(cfg)[:6]}"


# What a run writes; --overwrite removes exactly these (never the directory: --out might be ".").
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT)


def check_out_dir(cfg: Config, out: Path, resume: bool, overwrite: bool = False) -> None:
    """Refuse, before anything is loaded or written, to lose a run or to mix two runs in one dir.

    Without --resume an existing run is never replaced unless --overwrite says so; with --resume
    there must be a checkpoint, of this same config except for a raised train.steps.
    """
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: continue the run, or replace it")
    _check_writable(out)
    if resume:
        if not (out / CHECKPOINT).is_file():
            where = "does not exist" if not out.exists() else f"holds no {CHECKPOINT}"
            raise RunError(f"--resume: {out} {where}; nothing to continue (drop --resume to start a new run)")
        _check_same_config(cfg, out)
    elif not overwrite and any((out / f).exists() for f in RUN_FILES):
        what = "a finished run" if (out / "summary.json").exists() else "an unfinished run"
        raise RunError(f"{out} already holds {what}; continue it with --resume or replace it with --overwrite")


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunError(f"output directory {out} is an existing file")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"cannot create output directory {out}: {parent} is a file")
            if not os.access(out if out.exists() else parent, os.W_OK):
                raise RunError(f"output directory {out} is not writable ({out if out.exists() else parent} is read-only)")
            return


def _check_same_config(cfg: Config, out: Path) -> None:
    old_path = out / "config.yaml"
    try:
        old = load_config(old_path)
    except ConfigError as exc:
        raise RunError(f"--resume: {out} holds no usable config.yaml ({exc})") from None
    if cfg.train.steps < old.train.steps:
        raise RunError(f"--resume: --steps {cfg.train.steps} is below the run's {old.train.steps}; steps may only be raised")
    # Raising steps extends a run (a finished one too); anything else would splice two runs together.
    same = config_hash(cfg, (*HASH_IGNORE, "train.steps")) == config_hash(old, (*HASH_IGNORE, "train.steps"))
    if not same:
        raise RunError(f"{out} holds a run with a different config; --resume needs the config the run started with")


def remove_run_files(out: Path) -> None:
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise RunError(f"--overwrite: cannot remove the old run in {out}: {exc.strerror or exc}") from None


def prepare_out_dir(cfg: Config, out: Path, resume: bool, overwrite: bool = False, *, checked: bool = False) -> None:
    """Create `out` and write config.yaml (after `check_out_dir`, which `checked` says already ran)."""
    if not checked:
        check_out_dir(cfg, out, resume, overwrite)
    try:
        if overwrite:
            remove_run_files(out)
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    except OSError as exc:
        raise RunError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None


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
            id=self.run_id, resume="allow", reinit="finish_previous",
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
