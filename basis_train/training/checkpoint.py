"""checkpoint.pt: everything a resumed run needs to continue bit for bit.

Process 0 writes one file. Most of the state is the same on every process (weights, optimiser,
data position); what differs (each process's sketch generator and unlogged loss sum) is
gathered into it under "ranks", so a resumed process continues its own random stream and the
next logged mean is exact.
"""

from __future__ import annotations

from pathlib import Path

import torch

from basis_train.fsutil import atomic_write_bytes
from basis_train.training.config import Config, config_hash
from basis_train.training.errors import RunError, first_line

VERSION = 1
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(out: Path, state: dict) -> None:
    """Replace out/checkpoint.pt atomically: a kill or a full disk mid-write leaves the previous one."""
    try:
        atomic_write_bytes(out / CHECKPOINT, lambda f: torch.save(state, f))
    except OSError as exc:
        raise RunError(f"cannot write the step-{state['step']} checkpoint to {out}: {exc.strerror or exc}; "
                       f"{checkpoint_note(out)}") from None


def _saved_step(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)["step"]
    except Exception:  # unreadable: the note then names no step
        return None


def load_checkpoint(out: Path) -> dict | None:
    """The checkpoint in `out`, None if there is none; a file that is not one is a RunError."""
    path = out / CHECKPOINT
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, random bytes, an empty file: torch raises all sorts
        raise RunError(f"{path} is not a readable checkpoint ({first_line(exc)}); "
                       "delete it to restart from scratch, or start over with --overwrite") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise RunError(f"{path} is not a basis-train checkpoint; start over with --overwrite")
    return ckpt


def checkpoint_note(out: Path) -> str:
    """What a stopped run left to resume from, for its error message."""
    path = out / CHECKPOINT
    if path.is_file():
        step = _saved_step(path)
        at = f" (step {step})" if step is not None else ""
        return f"the last good checkpoint{at} in {out} is intact (continue with --resume)"
    return f"no checkpoint had been written to {out} yet, so nothing was kept"


class Checkpoints:
    def __init__(self, out: Path, cfg: Config, dist) -> None:
        self.out, self.cfg, self.dist = out, cfg, dist

    def load(self) -> dict | None:
        """The saved state with this process's own part merged in, or None if there is none."""
        ckpt = load_checkpoint(self.out)
        if ckpt is None:
            return None
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.dist.world_size:
            # The global batch (and each process's sketch stream) depends on the process count.
            raise RunError(f"the checkpoint in {self.out} was written by {saved_world} process(es); "
                           f"resume it with torchrun --nproc_per_node={saved_world}")
        if "ranks" in ckpt:
            ckpt = dict(ckpt, **ckpt["ranks"][self.dist.proc_rank])
        return ckpt

    def save(self, shared: dict, own: dict) -> None:
        """`shared`: process 0's copy is written; `own`: every process's is (a collective)."""
        per_process = self.dist.all_gather(own)
        if not self.dist.is_main:
            return
        state = {"version": VERSION, **shared, **own, "config_hash": config_hash(self.cfg),
                 "world_size": self.dist.world_size}
        if self.dist.enabled:
            state["ranks"] = per_process
        save_checkpoint(self.out, state)
