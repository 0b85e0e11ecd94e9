"""A run's output directory: where it is, what may be written there, and by whom.

Refused before anything is loaded or written: losing a run to a repeated command, splicing two
runs together (--resume with another config), and a second writer while one runs (a lock held
as long as the writer lives). A directory that holds a user's own files gets a warning.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from basis_train.training.checkpoint import CHECKPOINT
from basis_train.training.config import (
    HASH_IGNORE,
    Config,
    ConfigError,
    config_hash,
    config_to_dict,
    dump_config,
    load_config,
)
from basis_train.training.errors import RunError, warn

# What a run writes; --overwrite removes exactly these (never the directory: --out might be ".").
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT)
LOCK = ".lock"
# Also a run's own: wandb's folder (the tracker's dir is the run's) and hidden files (the lock,
# the temporary files of atomic writes).
_RUN_ENTRIES = (*RUN_FILES, "wandb")


def default_out_dir(cfg: Config, variant: str) -> Path:
    what = "exact" if cfg.train.method == "exact" else f"basis-r{cfg.sketch.rank}"
    tag = f"-{variant}" if variant else ""
    return Path("runs") / f"{what}{tag}-s{cfg.train.seed}-{config_hash(cfg)[:6]}"


class RunLock:
    """An exclusive flock on out/.lock for as long as this writer lives. The kernel drops it when
    the process dies, kill -9 included, so a dead writer never blocks a resume."""

    def __init__(self, out: Path) -> None:
        try:
            self._file = open(out / LOCK, "a+")
        except OSError as exc:
            raise RunError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise RunError(f"{out} is being written by {holder}; wait for it to end, or choose another --out") from None
        self._file.truncate(0)
        self._file.write(f"basis-train (pid {os.getpid()} on {socket.gethostname()})\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()


def claim_out_dir(cfg: Config, out: Path, resume: bool, overwrite: bool = False) -> RunLock | None:
    """Check `out` for this run (see `check_out_dir`), holding its lock if it exists already."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: continue the run, or replace it")
    _check_writable(out)
    lock = RunLock(out) if out.is_dir() else None
    try:
        check_out_dir(cfg, out, resume, overwrite)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def check_out_dir(cfg: Config, out: Path, resume: bool, overwrite: bool = False) -> None:
    """Refuse to lose a run or to mix two runs in one dir.

    Without --resume an existing run is never replaced unless --overwrite says so; with --resume
    there must be a checkpoint, of this same config except for a raised train.steps.
    """
    has_run = any((out / f).exists() for f in RUN_FILES)
    started = has_run and not (out / CHECKPOINT).is_file() and not (out / "summary.json").exists()
    if resume:
        if started:
            raise RunError(f"--resume: the run in {out} stopped before its first checkpoint, so there is nothing to "
                           "continue; start it again with --overwrite (instead of --resume)")
        if not (out / CHECKPOINT).is_file():
            where = "does not exist" if not out.exists() else f"holds no {CHECKPOINT}"
            raise RunError(f"--resume: {out} {where}; nothing to continue (drop --resume to start a new run)")
        _check_same_config(cfg, out)
    elif not overwrite and has_run:
        if started:
            raise RunError(f"{out} holds a run that stopped before its first checkpoint (nothing to resume); "
                           "start it again with --overwrite")
        what = "a finished run" if (out / "summary.json").exists() else "an unfinished run"
        raise RunError(f"{out} already holds {what}; continue it with --resume or replace it with --overwrite")
    elif not has_run:
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _RUN_ENTRIES
                         and not p.name.startswith(".")) if out.is_dir() else []
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            warn(f"--out {out} already holds files that are not a run's ({shown}); "
                 f"the run writes {', '.join(RUN_FILES)} among them")


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


def saved_config(out: Path) -> Config:
    """The config a run in `out` started with (its config.yaml)."""
    try:
        return load_config(out / "config.yaml")
    except ConfigError as exc:
        raise RunError(f"--resume: {out} holds no usable config.yaml ({exc})") from None


# What a resume may change: the steps (extending a run), and what HASH_IGNORE leaves out.
_RESUME_IGNORE = (*HASH_IGNORE, "train.steps")


def find_run_to_resume(cfg: Config, default: Path) -> Path:
    """`--resume` without --out: the default directory, else the one run under its parent whose
    config is `cfg` but for the steps (the default name hashes train.steps, so `--steps 3000
    --resume` names another directory than the run being extended)."""
    if (default / CHECKPOINT).is_file():
        return default
    want = config_hash(cfg, _RESUME_IGNORE)
    found = []
    for cfg_file in sorted(default.parent.glob("*/config.yaml")):
        try:
            if config_hash(load_config(cfg_file), _RESUME_IGNORE) == want and (cfg_file.parent / CHECKPOINT).is_file():
                found.append(cfg_file.parent)
        except ConfigError:
            continue
    if len(found) == 1:
        return found[0]
    if not found:
        raise RunError(f"--resume: no run of this config with a checkpoint under {default.parent}/; "
                       "name its directory with --out")
    raise RunError(f"--resume: {len(found)} runs of this config under {default.parent}/ "
                   f"({', '.join(p.name for p in found)}); name one with --out")


def _check_same_config(cfg: Config, out: Path) -> None:
    old = saved_config(out)
    if cfg.train.steps < old.train.steps:
        raise RunError(f"--resume: --steps {cfg.train.steps} is below the run's {old.train.steps}; steps may only be raised")
    # Raising steps extends a run (a finished one too); anything else would splice two runs together.
    ignore = _RESUME_IGNORE
    if config_hash(cfg, ignore) != config_hash(old, ignore):
        was, now = config_to_dict(old), config_to_dict(cfg)
        diff = [f"{s}.{k} {was[s][k]!r} in the run, {now[s][k]!r} now" for s in was for k in was[s]
                if s not in ignore and f"{s}.{k}" not in ignore and was[s][k] != now[s][k]]
        raise RunError(f"--resume: {out} holds a run with a different config ({'; '.join(diff) or 'its hash'}); "
                       "resume it without those flags (its config.yaml holds them)")


def remove_run_files(out: Path) -> None:
    try:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    except OSError as exc:
        raise RunError(f"--overwrite: cannot remove the old run in {out}: {exc.strerror or exc}") from None


def prepare_out_dir(cfg: Config, out: Path, resume: bool, overwrite: bool = False,
                    lock: RunLock | None = None) -> RunLock:
    """Create `out`, hold its lock and write config.yaml; returns the lock. `lock`: the one that
    `claim_out_dir` took; where `out` did not exist then, it is taken now and `out` checked again
    (another writer may have started there meanwhile)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    if lock is None:
        lock = claim_out_dir(cfg, out, resume, overwrite)
    try:
        if overwrite:
            remove_run_files(out)
        dump_config(cfg, out / "config.yaml")  # on --resume too: a raised train.steps is the run's from now on
    except OSError as exc:
        lock.release()
        raise RunError(f"cannot write to output directory {out}: {exc.strerror or exc}") from None
    return lock
