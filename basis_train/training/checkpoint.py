"""checkpoint.pt: everything a resumed run needs to continue bit for bit.

Process 0 writes one file. Most of the state is the same on every process (weights, optimiser,
data position); what differs (each process's sketch generator and unlogged loss sum) is
gathered into it under "ranks", so a resumed process continues its own random stream and the
next logged mean is exact.
"""

from __future__ import annotations

from pathlib import Path

from basis_train.training.config import Config, config_hash
from basis_train.training.runio import RunError, load_checkpoint, save_checkpoint

VERSION = 1


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
