"""Fleet mode: many runs of one model shape trained in one process as one batched model.

Each member is a real `Run` (training/train.py): it checks and prepares its own output
directory, builds its single-run model, sketch generator, optimiser, data loader and
evaluator, and loads its checkpoint on resume. The fleet sees it only through `Run.member()`
(training/member.py). It trains all members at once with a `FleetGPT` (fleet/model.py) built
from those models and generators, draws each member's batches from that member's own loader,
and before every checkpoint writes the fleet's state back into the members' models and
optimisers, so each member writes exactly the files a single run writes (a member's
checkpoint even resumes as a single run).

What members may differ in (FLEET_VARIES): seed, method, the sketch settings, lr_factor,
lr_scale_sketched and block checkpointing with its policy and cadence (which change memory, not
numbers; the fleet itself never checkpoints). Everything else (model shape and head, data, steps, evaluation
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

import time
from pathlib import Path

import torch

from basis_train.core import graphs
from basis_train.data.corpus import DataError
from basis_train.fleet.model import FleetGPT
from basis_train.fleet.optim import FleetSGD
from basis_train.training import faults
from basis_train.training.config import Config, config_hash
from basis_train.training.distributed import Dist
from basis_train.training.errors import RunError
from basis_train.training.metrics import Throughput
from basis_train.training.setup import load_data, resolve_device
from basis_train.training.step import GraphDispatch, NonFiniteLoss
from basis_train.training.stopping import Interrupted, StopNow, StopRequests
from basis_train.training.train import Run

FLEET_VARIES = ("log", "train.seed", "train.method", "sketch.rank", "sketch.layers", "sketch.hashing",
                "sketch.invariant_scalars", "sketch.lam", "optim.lr_factor", "optim.lr_scale_sketched",
                "model.checkpoint_blocks", "model.checkpoint_policy", "model.checkpoint_every")


def fleet_key(cfg: Config) -> str:
    """Runs with equal keys can share a fleet."""
    return config_hash(cfg, FLEET_VARIES)


def fleet_refusal(cfg: Config) -> str | None:
    """Why a run cannot join a fleet (it then runs alone), or None."""
    if cfg.model.arch != "paper":  # the batched model is the paper's (separate q, k, v; untied head; decay on all)
        return f"model.arch {cfg.model.arch} (fleets batch the paper's model)"
    if cfg.optim.name != "sgd":
        return f"optimiser {cfg.optim.name} (fleets step SGD only)"
    if cfg.optim.schedule != "constant":
        return f"lr schedule {cfg.optim.schedule} (fleets use a constant lr)"
    if cfg.train.dtype != "float32":
        return f"dtype {cfg.train.dtype} (fleets train in float32)"
    if cfg.train.compile:
        return "train.compile"
    if cfg.train.saved_activations != "keep":  # the fleet's batched step keeps what autograd saves as it is
        return f"train.saved_activations {cfg.train.saved_activations} (fleets keep saved activations as they are)"
    return None


class FleetStep:
    """One step of every member (forward, backward, SGD), eager or as one CUDA-graph replay;
    TrainStep's dispatch (training/step.py's GraphDispatch) for a batch of member indices (M, B)."""

    def __init__(self, model: FleetGPT, opt: FleetSGD, chunks: torch.Tensor, device: torch.device,
                 use_graphs: bool) -> None:
        self.model, self.opt, self.chunks, self.device = model, opt, chunks, device
        self.loss_sum = torch.zeros(model.size, dtype=torch.float64, device=device)
        self.loss_n = 0
        self.dispatch = GraphDispatch(device, use_graphs, fwd_bwd_opt=self._fwd_bwd_opt, eager_step=self._eager_step,
                                      zero_grad=opt.zero_grad, generators=model.sketching_generators)

    def __call__(self, idx: torch.Tensor) -> None:
        self.dispatch(idx)
        self.loss_n += 1

    @property
    def graph(self):
        return self.dispatch.graph

    def _eager_step(self, idx: torch.Tensor) -> None:
        self._fwd_bwd_opt(idx)
        self.opt.zero_grad()

    def _fwd_bwd_opt(self, idx: torch.Tensor) -> None:
        chunks = self.chunks[idx]  # (M, B, T + 1)
        losses = self.model(chunks[..., :-1].long(), chunks[..., 1:].long())
        losses.sum().backward()  # members share no parameter: each gets its own loss's gradient
        self.opt.step()
        self.loss_sum += losses.detach()


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
                run = Run(c, out, resume=resume, overwrite=not resume, splits=splits, progress=False)
                self.runs.append(run.member())
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
        chunks = self.runs[0].chunks
        for r in self.runs:
            r.share_chunks(chunks)
        cache: dict = {}
        for r in self.runs:
            r.measure_memory(cache)

        self.model = FleetGPT([r.model for r in self.runs], [r.generator for r in self.runs])
        self.names = self.model.names
        self._member_params = [[dict(r.model.named_parameters())[n] for n in self.names] for r in self.runs]
        # The token embedding's gradient arrives as its 64 rows a member, not a dense table.
        rows = {self.names.index("wte.weight"): self.model.sparse_embedding_grad()}
        lrs = [list(lr) for lr in zip(*(r.param_lrs(self.names) for r in self.runs))]  # [parameter][member]
        self.opt = FleetSGD([self.model.p(n) for n in self.names], lrs, cfg0.optim.momentum,
                            cfg0.optim.weight_decay, sparse=rows)
        for m, r in enumerate(self.runs):
            self.opt.from_member(m, r.optimizer, self._member_params[m])
        t = cfg0.train
        use_graphs = t.cuda_graphs and self.device.type == "cuda"
        if use_graphs:
            graphs.check_graph_support()
        self.train_step = FleetStep(self.model, self.opt, chunks, self.device, use_graphs)
        for m, r in enumerate(self.runs):  # a resumed member's unlogged losses
            self.train_step.loss_sum[m], self.train_step.loss_n = r.unlogged_loss()
        self.clock = Throughput(t.batch_size * cfg0.model.block_size, self.device)
        self.clock.load_state_dict(self.runs[0].clock_state())
        self.failed: dict[int, str] = {}

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
                    idx = torch.stack([r.next_indices() for r in self.runs])
                    self.train_step(idx)
                    self.step += 1
                    bar.update(1)
                    if on_step is not None:
                        on_step(self.step)
                    if self.step % t.eval_every == 0 or self.step == t.steps:
                        self.log_evaluation()
                    if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                        with self.clock.paused():  # as in a single run (training/train.py)
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
            self.runs[m].set_unlogged_loss(sums[m], self.train_step.loss_n)

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
            try:
                self.runs[m].log(self.step, lap, self.clock.state_dict(), val[m], eval_s)
            except NonFiniteLoss as e:
                self._fail(m, e)
        self.train_step.loss_sum.zero_()
        self.train_step.loss_n = 0
        self.clock.start(self.step)

    @torch.no_grad()
    def evaluate(self) -> list[float]:
        """Every member's validation loss, as its Evaluator (training/evaluate.py) would compute it.

        Members share the data config, so they score the same batches: each member's stream
        (paper protocol) still advances, as it would alone, and the first one's batch is scored."""
        per_member = [r.val_batches() for r in self.runs]
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
        with torch.no_grad():
            for q, n in zip(self._member_params[m], self.names):
                q.copy_(self.model.p(n)[m])
        self.opt.to_member(m, self.runs[m].optimizer, self._member_params[m])

    def save(self) -> None:
        self._sync_losses()
        for m in self.live:
            self._scatter(m)
            try:
                self.runs[m].save(self.step, self.clock.state_dict())
            except NonFiniteLoss as e:
                self._fail(m, e)

    def finish(self) -> list[dict | None]:
        """Summaries in the order of the members given (None: failed, or left out at the start)."""
        summaries: list[dict | None] = [None] * (len(self.runs) + len(self.rejected))
        for m, r in enumerate(self.runs):
            if m in self.failed or not r.has_records():
                continue
            self._scatter(m)
            summaries[self.index[m]] = r.finish(self.step, self.clock.state_dict(), self.train_step.graph is not None,
                                                len(self.runs))
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
