"""Data-parallel training under torchrun: process-group setup and the collectives a Run needs.

Every process runs the same `Run`. Processes must never take different branches (one evaluates,
checkpoints or stops while another trains on), so each such decision goes through one of
the collectives here; with a single process they all reduce to plain local code, which
is why `Run` needs no separate single-process path.

Launch: ``torchrun --nproc_per_node=N $(which basis-train) ...`` (or
``python -m torch.distributed.run --nproc_per_node=N -m basis_train.cli ...``).
torchrun forwards SIGINT/SIGTERM to every worker and SIGKILLs them 30 s later, so the
stop flag is agreed on often enough for the final checkpoint to fit in that window.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from basis_train.training.errors import RunError


class PeerFailed(RunError):
    """Process 0 failed at a step it does alone (out dir, data); it reports the error itself."""


@dataclass(frozen=True)
class Dist:
    # A process's place among the torchrun processes; "rank" alone means the sketch rank R.
    proc_rank: int = 0
    world_size: int = 1
    local_proc_rank: int = 0
    # Where collective tensors live: NCCL only moves CUDA tensors.
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.proc_rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        return self.comm_device if self.enabled and device.type == "cuda" else device

    # ------------------------------------------------------------ collectives
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over processes (in place; returns `t`)."""
        if self.enabled:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.comm_device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def all(self, flag: bool) -> bool:
        return not self.any(not flag)

    def all_gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Process 0's `obj` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn, *, others: bool = True):
        """Run `fn` on process 0, then (if `others`) on the remaining processes.

        Process 0 going first is what makes the others safe: it builds the token cache
        they then read, or prepares the out dir before anyone looks into it. Its
        failure is raised on every process, so nobody is left waiting in a collective.
        """
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 -- re-raised below, after telling the peers
                error = e
        message = self.broadcast(None if error is None else str(error))
        if error is not None:
            raise error
        if message is not None:
            raise PeerFailed(message)
        if others and not self.is_main:
            result = fn()
        return result

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around `model` (gradients averaged over processes), or `model` itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_proc_rank] if self.comm_device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            # DDP sits in reference cycles (its gradient hooks), so dropping the last names
            # (training/train.py) does not free it: collected at exit instead, with the group
            # it holds, gloo's teardown can abort the process. Collected here, it goes first.
            gc.collect()
            tdist.destroy_process_group()


def init_from_env(device: torch.device) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1; otherwise a single-process Dist.

    `device` is the resolved --device: CUDA ranks use NCCL on cuda:LOCAL_RANK, CPU
    processes use gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    proc_rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    # NVLink multicast (NVLS) must stay off on the lent GPUs; a user's explicit choice wins.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if device.type == "cuda":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if per_node > torch.cuda.device_count():
            # Checked against LOCAL_WORLD_SIZE, not LOCAL_RANK, so every rank fails alike.
            raise RunError(f"{per_node} processes per node but only {torch.cuda.device_count()} "
                           f"visible GPU(s); lower --nproc_per_node")
        comm = torch.device("cuda", local)
        torch.cuda.set_device(comm)
        backend = "nccl"
    else:
        comm, backend = torch.device("cpu"), "gloo"
    owns = not tdist.is_initialized()
    if owns:
        tdist.init_process_group(backend, device_id=comm if backend == "nccl" else None)
    return Dist(proc_rank=proc_rank, world_size=world, local_proc_rank=local, comm_device=comm, owns_group=owns)
