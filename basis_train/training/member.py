"""What a fleet (basis_train/fleet/) needs of a single run it trains as one of its members.

A fleet trains the models of its members as one batched model, then hands every member its
state back so that the member's own `Run` writes exactly the files a single run writes (its
checkpoint even resumes as a single run). `FleetMember` is that hand-over, the one interface
between the two: the fleet reads the member's model, sketch generator, optimiser and data
through it, and gives back losses, weights (into `model` and `optimizer`), clock and records.
"""

from __future__ import annotations

import dataclasses

import torch

from basis_train.core.head import FusedHead
from basis_train.core.model import build_gpt
from basis_train.fsutil import atomic_write_json
from basis_train.training.checkpoint import checkpoint_note
from basis_train.training.setup import build_optimizer, gpt_config
from basis_train.training.step import DTYPES, NonFiniteLoss, TrainStep


class FleetMember:
    def __init__(self, run) -> None:
        self._run = run

    # ------------------------------------------------------------ what the fleet builds from
    @property
    def cfg(self):
        return self._run.cfg

    @property
    def out(self):
        return self._run.out

    @property
    def device(self) -> torch.device:
        return self._run.device

    @property
    def step(self) -> int:
        """The step this member starts from (its checkpoint's on resume)."""
        return self._run.step

    @property
    def model(self):
        """The member's single-run GPT; `save` and `finish` read the weights the fleet copies into it."""
        return self._run.model

    @property
    def generator(self) -> torch.Generator:
        """The member's sketch generator: the fleet draws the member's seeds from it, as the run would."""
        return self._run.train_step.gen

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The member's SGD; the fleet's optimiser state comes from it and goes back to it."""
        return self._run.train_step.opt

    def param_lrs(self, names: list[str]) -> list[float]:
        """Each named parameter's lr, as the member's optimiser groups it (one rule for both modes)."""
        lr_of = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        params = dict(self.model.named_parameters())
        return [float(lr_of[id(params[n])]) for n in names]

    @property
    def chunks(self) -> torch.Tensor:
        return self._run.loader.chunks

    def share_chunks(self, chunks: torch.Tensor) -> None:
        """Read the training chunks from `chunks` (every member's data is the same: one device copy)."""
        self._run.loader.chunks = self._run.train_step.chunks = chunks

    def measure_memory(self, cache: dict) -> None:
        """The member's single-run memory fields (summary.json), unless a resumed member has them:
        three single-run steps on a throwaway copy with its own generator and optimiser, so the
        member's weights and random stream are not touched. `cache` holds them per configuration."""
        run = self._run
        if "activation_bytes" in run.train_step.measured:
            return
        cfg = run.cfg
        key = (cfg.train.method, dataclasses.astuple(cfg.model), dataclasses.astuple(cfg.sketch), cfg.train.dtype)
        if key not in cache:
            probe = build_gpt(gpt_config(cfg), seed=cfg.train.seed, method=cfg.train.method).to(run.device)
            gen = probe.sketch_generator(0)
            opt = build_optimizer(probe, cfg, capturable=False)
            step = TrainStep(probe, probe, opt, run.loader.chunks, gen, run.device, DTYPES[cfg.train.dtype], False,
                             saved_activations=cfg.train.saved_activations)
            idx = torch.arange(cfg.train.batch_size, device=run.device)
            for _ in range(3):  # step 0 counts saved tensors, step 2 takes the allocator peak
                step(idx)
            cache[key] = step.measured
        run.train_step.measured = dict(cache[key])

    # ------------------------------------------------------------ the loop's hand-over
    def unlogged_loss(self) -> tuple[float, int]:
        """(sum, count) of the training losses since the last record (a resumed member's)."""
        ts = self._run.train_step
        return ts.loss_sum.item(), ts.loss_n

    def set_unlogged_loss(self, total: float, n: int) -> None:
        ts = self._run.train_step
        ts.loss_sum.fill_(total)
        ts.loss_n = n

    def clock_state(self) -> dict:
        return self._run.clock.state_dict()

    def next_indices(self) -> torch.Tensor:
        """The member's next training batch, from its own loader (its seed's order)."""
        return self._run.loader.next_indices()

    def val_batches(self) -> list:
        """The batches of the member's next evaluation (its stream advances, as alone)."""
        return self._run.evaluate.next_batches()

    def log(self, step: int, lap: dict, clock: dict, val_loss: float, eval_s: float) -> None:
        """One metrics record, as the run would write it at `step`; NonFiniteLoss if its training loss is not finite."""
        run = self._run
        run.clock.load_state_dict(clock)
        rec = {"step": step, **lap}
        try:
            rec["train_loss"] = run.train_step.take_mean_loss(run.dist, step)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e}; stopped, {checkpoint_note(run.out)}") from None
        rec.update(val_loss=val_loss, eval_s=eval_s, epoch=run.loader.epoch)
        if run.evaluate.restarts is not None:
            rec["val_restarts"] = run.evaluate.restarts
        run.metrics.log(rec)

    def _advance(self, step: int, clock: dict) -> None:
        self._run.step = step
        self._run.clock.load_state_dict(clock)

    def save(self, step: int, clock: dict) -> None:
        """The run's checkpoint at `step`, of the weights and optimiser state the fleet handed back."""
        self._advance(step, clock)
        self._run.save()

    def has_records(self) -> bool:
        return bool(self._run.metrics.records)

    def finish(self, step: int, clock: dict, graphed: bool, fleet_size: int) -> dict:
        """The run's summary.json, with `fleet_size` and how the fleet (not the member's own step) ran."""
        run = self._run
        self._advance(step, clock)
        if isinstance(run.model.lm_head, FusedHead):
            # The member's own head never ran; the fleet's head is ours (fleets are float32: no CCE).
            run.model.lm_head.kernel_ran = "native"
        summary = run.finish(cuda_graphs=graphed)
        summary["fleet_size"] = fleet_size
        atomic_write_json(run.out / "summary.json", summary)
        return summary

    def close(self) -> None:
        self._run.close()
