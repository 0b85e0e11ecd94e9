"""Fleet mode: many runs of one model shape trained in one process as one batched model.

Each member is a real `Run` (train.py): it checks and prepares its own output directory,
builds its single-run model, sketch generator, optimiser, data loader and evaluator, and
loads its checkpoint on resume. The fleet then trains all members at once with a
`FleetGPT` (core/fleet.py) built from those models and generators, draws each member's
batches from that member's own loader, and before every checkpoint writes the fleet's
state back into the members' single-run objects, so `Run.save` and `Run.finish` write
exactly the files a single run writes (a member's checkpoint even resumes as a single run).

What members may differ in (FLEET_VARIES): seed, method, the sketch settings, lr_factor,
lr_scale_sketched and block checkpointing (which changes memory, not numbers; the fleet
itself never checkpoints). Everything else (model shape and head, data, steps, evaluation
and checkpoint cadence, optimiser, dtype, device) is one per fleet: `fleet_key`.

Per-member figures inside a fleet:
- activation_bytes (and weight_cast_bytes, activation_breakdown, step_peak_bytes) are those
  of the member's single run: measured by one probe of three single-run steps (TrainStep's
  own measurement) on a throwaway copy of the member's model, never on the fleet step,
  whose padded batched tensors are not any one member's memory;
- train_s, wall_s, ms_per_step and tokens_per_s are the fleet's: every member advanced one step per
  fleet step, so a member's tokens_per_s is one member's share (the fleet's total is
  `fleet_size` times it); summary.json adds `fleet_size`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from basis_train.core import graphs
from basis_train.core.fleet import FleetGPT
from basis_train.core.head import FusedHead
from basis_train.core.model import build_gpt
from basis_train.data.corpus import DataError
from basis_train.fsutil import atomic_write_json
from basis_train.training import faults
from basis_train.training.checkpoint import checkpoint_note
from basis_train.training.config import Config, config_hash
from basis_train.training.distributed import Dist
from basis_train.training.errors import RunError
from basis_train.training.fleet_optim import FleetSGD
from basis_train.training.metrics import Throughput
from basis_train.training.setup import build_optimizer, gpt_config, load_data, resolve_device
from basis_train.training.step import DTYPES, CapturedStep, NonFiniteLoss, TrainStep
from basis_train.training.stopping import Interrupted, StopNow, StopRequests
from basis_train.training.train import Run

FLEET_VARIES = ("log", "train.seed", "train.method", "sketch.rank", "sketch.layers", "sketch.hashing",
                "sketch.invariant_scalars", "sketch.lam", "optim.lr_factor", "optim.lr_scale_sketched",
                "model.checkpoint_blocks")


def fleet_key(cfg: Config) -> str:
    """Runs with equal keys can share a fleet."""
    return config_hash(cfg, FLEET_VARIES)


def fleet_refusal(cfg: Config) -> str | None:
    """Why a run cannot join a fleet (it then runs alone), or None."""
    if cfg.optim.name != "sgd":
        return f"optimiser {cfg.optim.name} (fleets step SGD only)"
    if cfg.optim.schedule != "constant":
        return f"lr schedule {cfg.optim.schedule} (fleets use a constant lr)"
    if cfg.train.dtype != "float32":
        return f"dtype {cfg.train.dtype} (fleets train in float32)"
    if cfg.train.compile:
        return "train.compile"
    return None


class FleetStep(CapturedStep):
    """One step of every member (forward, backward, SGD), eager or as one CUDA-graph replay;
    TrainStep's dispatch (training/step.py's CapturedStep) for a batch of member indices (M, B)."""

    def __init__(self, model: FleetGPT, opt: FleetSGD, chunks: torch.Tensor, device: torch.device,
                 use_graphs: bool) -> None:
        self.model, self.opt, self.chunks, self.device, self.use_graphs = model, opt, chunks, device, use_graphs
        self.loss_sum = torch.zeros(model.size, dtype=torch.float64, device=device)

    def _eager_step(self, idx: torch.Tensor) -> None:
        self._fwd_bwd_opt(idx)
        self.opt.zero_grad()

    def _generators(self) -> list[torch.Generator]:
        return self.model.sketching_generators()

    def _fwd_bwd_opt(self, idx: torch.Tensor) -> None:
        chunks = self.chunks[idx]  # (M, B, T + 1)
        losses = self.model(chunks[..., :-1].long(), chunks[..., 1:].long())
        losses.sum().backward()  # members share no parameter: each gets its own loss's gradient
        self.opt.step()
        self.loss_sum += losses.detach()


def _measure(run: Run, cache: dict) -> dict:
    """The member's single-run memory fields, from three single-run steps on a throwaway copy
    (its own generator and optimiser: the member's stream and weights are not touched)."""
    cfg = run.cfg
    key = (cfg.train.method, dataclasses.astuple(cfg.model), dataclasses.astuple(cfg.sketch), cfg.train.dtype)
    if key not in cache:
        probe = build_gpt(gpt_config(cfg), seed=cfg.train.seed, method=cfg.train.method).to(run.device)
        gen = torch.Generator(device=run.device).manual_seed(0)
        for m in probe.sketched_modules():
            m.generator = gen
        opt = build_optimizer(probe, cfg, capturable=False)
        step = TrainStep(probe, probe, opt, run.loader.chunks, gen, run.device, DTYPES[cfg.train.dtype], False)
        idx = torch.arange(cfg.train.batch_size, device=run.device)
        for _ in range(3):  # step 0 counts saved tensors, step 2 takes the allocator peak
            step(idx)
        cache[key] = step.measured
    return dict(cache[key])


class Fleet:
    """Train `members` ((config, out dir) pairs of one fleet_key) together; see the module doc.

    A member with a checkpoint resumes from it, one without starts over (as basis-compare's
    children do); all must resume from the same step."""

    def __init__(self, members: list[tuple[Config, Path]], *, splits=None, progress: bool = True, log=print) -> None:
        if not members:
            raise ValueError("a fleet needs at least one member")
        cfg0 = members[0][0]
        keys = {fleet_key(c) for c, _ in members}
        if len(keys) != 1:
            raise RunError("fleet members differ in more than seed, method, sketch and lr factors")
        for c, out in members:
            if (why := fleet_refusal(c)) is not None:
                raise RunError(f"{out} cannot train in a fleet: {why}")
        self.cfg0, self.log, self.progress = cfg0, log, progress
        try:
            splits = splits or load_data(cfg0)  # once: every member reads the same data
        except DataError as e:
            raise RunError(str(e)) from e
        # A member whose directory its Run refuses (say a stale checkpoint of another config) is
        # left out, as that run alone would fail; the others train.
        self.rejected: dict[int, str] = {}
        self.runs, self.index = [], []
        for i, (c, out) in enumerate(members):
            resume = (Path(out) / "checkpoint.pt").is_file()
            try:
                self.runs.append(Run(c, out, resume=resume, overwrite=not resume, splits=splits, progress=False))
            except RunError as e:
                self.rejected[i] = str(e)
                log(f"member {out} left out: {e}")
                continue
            self.index.append(i)
        if not self.runs:
            raise RunError(f"no member of the fleet could start: {next(iter(self.rejected.values()))}")
        steps = {r.step for r in self.runs}
        if len(steps) != 1:
            raise RunError(f"fleet members resume from different steps {sorted(steps)}; run them as separate fleets")
        self.step = steps.pop()
        self.device = self.runs[0].device
        # Every member reads the same chunks: one device copy serves them all.
        chunks = self.runs[0].loader.chunks
        for r in self.runs:
            r.loader.chunks = r.train_step.chunks = chunks
        cache: dict = {}
        for r in self.runs:
            if "activation_bytes" not in r.train_step.measured:
                r.train_step.measured = _measure(r, cache)

        self.model = FleetGPT([r.model for r in self.runs], [r.train_step.gen for r in self.runs])
        self.names = self.model.names
        self._member_params = [[dict(r.model.named_parameters())[n] for n in self.names] for r in self.runs]
        # The token embedding's gradient arrives as its 64 rows a member, not a dense table.
        rows = {self.names.index("wte.weight"): self.model.sparse_embedding_grad()}
        self.opt = FleetSGD([self.model.p(n) for n in self.names], self._lrs(), cfg0.optim.momentum,
                            cfg0.optim.weight_decay, sparse=rows)
        for m, r in enumerate(self.runs):
            self.opt.from_member(m, r.train_step.opt, self._member_params[m])
        t = cfg0.train
        use_graphs = t.cuda_graphs and self.device.type == "cuda"
        if use_graphs:
            graphs.check_graph_support()
        self.train_step = FleetStep(self.model, self.opt, chunks, self.device, use_graphs)
        for m, r in enumerate(self.runs):  # a resumed member's unlogged losses
            self.train_step.loss_sum[m] = r.train_step.loss_sum.item()
        self.train_step.loss_n = self.runs[0].train_step.loss_n
        self.clock = Throughput(t.batch_size * cfg0.model.block_size, self.device)
        self.clock.load_state_dict(self.runs[0].clock.state_dict())
        self.failed: dict[int, str] = {}

    def _lrs(self) -> list[list[float]]:
        """Per stacked parameter, each member's lr, as build_optimizer groups them for a single run."""
        out = []
        sketchable = [{f"{n}.weight" for n in r.model.sketchable_names()} for r in self.runs]
        for name in self.names:
            row = []
            for m, r in enumerate(self.runs):
                o = r.cfg.optim
                lr = o.lr * o.lr_factor
                row.append(lr * o.lr_scale_sketched if name in sketchable[m] else lr)
            out.append(row)
        return out

    @property
    def errors(self) -> dict[int, str]:
        """Why members did not finish, by their position in the members given."""
        return {**self.rejected, **{self.index[m]: e for m, e in self.failed.items()}}

    @property
    def live(self) -> list[int]:
        return [m for m in range(len(self.runs)) if m not in self.failed]

    # ---------------------------------------------------------------- the loop
    def run(self) -> list[dict | None]:
        """Train to the end; each member's summary (None for a member that failed: see `failed`)."""
        t = self.cfg0.train
        on_step = faults.from_env()
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True,
                   mininterval=0.5, desc=f"fleet of {len(self.runs)}")
        try:
            with StopRequests(Dist()) as stop:
                self.clock.start(self.step)
                while self.step < t.steps:
                    idx = torch.stack([r.loader.next_indices() for r in self.runs])
                    self.train_step(idx)
                    self.step += 1
                    bar.update(1)
                    if on_step is not None:
                        on_step(self.step)
                    if self.step % t.eval_every == 0 or self.step == t.steps:
                        self.log_evaluation()
                    if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        self.save()
                    if stop.flag:
                        self.save()
                        raise Interrupted(f"interrupted at step {self.step}; the members' checkpoints are saved")
                    if not self.live:
                        break
        except StopNow:
            raise Interrupted(f"stopped at once during step {self.step}; the members' last checkpoints are intact") from None
        finally:
            bar.close()
        try:
            return self.finish()
        finally:
            for r in self.runs:
                r.close()

    def _sync_losses(self) -> None:
        """Hand the fleet's unlogged loss sums to the members' TrainSteps, which log and save them."""
        sums = self.train_step.loss_sum.tolist()
        for m in self.live:
            ts = self.runs[m].train_step
            ts.loss_sum.fill_(sums[m])
            ts.loss_n = self.train_step.loss_n

    def _fail(self, m: int, error: Exception) -> None:
        self.failed[m] = str(error)
        self.log(f"member {self.runs[m].out} stopped: {error}")

    def log_evaluation(self) -> None:
        lap = self.clock.lap(self.step)
        self._sync_losses()
        e0 = time.perf_counter()
        val = self.evaluate()
        eval_s = time.perf_counter() - e0
        for m in self.live:
            r = self.runs[m]
            r.clock.load_state_dict(self.clock.state_dict())
            rec = {"step": self.step, **lap}
            try:
                rec["train_loss"] = r.train_step.take_mean_loss(r.dist, self.step)
            except NonFiniteLoss as e:
                self._fail(m, NonFiniteLoss(f"{e}; stopped, {checkpoint_note(r.out)}"))
                continue
            rec.update(val_loss=val[m], eval_s=eval_s, epoch=r.loader.epoch)
            if r.evaluate.restarts is not None:
                rec["val_restarts"] = r.evaluate.restarts
            r.metrics.log(rec)
        self.train_step.loss_sum.zero_()
        self.train_step.loss_n = 0
        self.clock.start(self.step)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Every member's validation loss, as its Evaluator (training/evaluate.py) would compute it.

        Members share the data config, so they score the same batches: each member's stream
        (paper protocol) still advances, as it would alone, and the first one's batch is scored."""
        per_member = [[r.evaluate.stream.next()] if r.evaluate.stream else r.evaluate.batches for r in self.runs]
        self.model.eval()
        total = torch.zeros(len(self.runs), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in per_member[0]:
            if not len(x):
                continue
            total += self.model.eval_loss_sums(x, y)
            count += y.numel()
        self.model.train()
        return [v / count for v in total.tolist()]

    def _scatter(self, m: int) -> None:
        """Write the fleet's state of member m into its single-run model and optimiser."""
        r = self.runs[m]
        with torch.no_grad():
            for q, n in zip(self._member_params[m], self.names):
                q.copy_(self.model.p(n)[m])
        self.opt.to_member(m, r.train_step.opt, self._member_params[m])
        r.step = self.step
        r.clock.load_state_dict(self.clock.state_dict())

    def save(self) -> None:
        self._sync_losses()
        for m in self.live:
            self._scatter(m)
            try:
                self.runs[m].save()
            except NonFiniteLoss as e:
                self._fail(m, e)

    def finish(self) -> list[dict | None]:
        """Summaries in the order of the members given (None: failed, or left out at the start)."""
        summaries: list[dict | None] = [None] * (len(self.runs) + len(self.rejected))
        for m, r in enumerate(self.runs):
            if m in self.failed or not r.metrics.records:
                continue
            self._scatter(m)
            r.train_step.graph = self.train_step.graph  # summary.json's cuda_graphs says how the fleet ran
            if isinstance(r.model.lm_head, FusedHead):
                # The member's own head never ran; the fleet's head is ours (fleets are float32: no CCE).
                r.model.lm_head.kernel_ran = "native"
            summary = r.finish()
            summary["fleet_size"] = len(self.runs)
            atomic_write_json(r.out / "summary.json", summary)
            summaries[self.index[m]] = summary
        return summaries


def train_fleet(members: list[tuple[Config, Path]], *, splits=None, progress: bool = True, log=print,
                errors: dict | None = None) -> list[dict | None]:
    """Train one fleet to the end: each member's summary, None where a member failed (`errors`,
    when given, receives why, by member position). `splits`: (Splits, source) as load_data
    returns them, when the caller already holds them."""
    resolve_device(members[0][0].train.device)  # a missing GPU: one line before anything loads
    fleet = None
    try:
        fleet = Fleet(members, splits=splits, progress=progress, log=log)
        return fleet.run()
    except graphs.GraphSupportError as e:
        raise RunError(str(e)) from e
    finally:
        if errors is not None and fleet is not None:
            errors.update(fleet.errors)
