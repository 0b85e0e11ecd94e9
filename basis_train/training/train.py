"""The training loop: one `Run` is one (config, seed) training job.

Read `Run.run` top to bottom: train a step, evaluate and log, checkpoint, honour a stop
request. The parts it calls live next to it: `step` (forward/backward/optimiser, CUDA
graphs), `evaluate`, `checkpoint`, `metrics` (throughput, metrics.jsonl, wandb), `stopping`
(signals) and `distributed` (the collectives that keep DDP processes in lock-step).

Pairing: the seed alone fixes the initial weights (a private CPU generator, see
model.py) and the batch order; the sketch's random stream has its own generator, so
exact and BASIS runs with one seed start identical and see identical batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from basis_train.core import flops, graphs
from basis_train.core.model import build_gpt
from basis_train.data.corpus import DataError
from basis_train.data.loaders import TrainLoader
from basis_train.fsutil import atomic_write_json
from basis_train.training import faults
from basis_train.training.checkpoint import Checkpoints, checkpoint_note
from basis_train.training.config import Config, config_hash
from basis_train.training.distributed import Dist, init_from_env
from basis_train.training.errors import RunError
from basis_train.training.evaluate import Evaluator
from basis_train.training.member import FleetMember
from basis_train.training.metrics import MetricsSink, Throughput
from basis_train.training.rundir import claim_out_dir, default_out_dir, find_run_to_resume, prepare_out_dir
from basis_train.training.setup import (
    build_optimizer,
    check_head_kernel,
    gpt_config,
    load_data,
    lr_multiplier,
    rank_that_runs,
    resolve_device,
    set_lr,
    sketch_seed,
    warn_slow_cpu_run,
)
from basis_train.training.step import DTYPES, MEMORY_FIELDS, NonFiniteLoss, TrainStep
from basis_train.training.stopping import Interrupted, StopNow, StopRequests
from basis_train.training.variants import variant_of

__all__ = ["MEMORY_FIELDS", "Interrupted", "NonFiniteLoss", "Run", "train"]


class Run:
    def __init__(self, cfg: Config, out: Path | str | None = None, *, resume: bool = False, overwrite: bool = False,
                 variant: str | None = None, splits=None, progress: bool = True, dist: Dist | None = None,
                 on_step: Callable[[int], None] | None = None) -> None:
        """`on_step`: called with the step number after every training step (the tests' faults)."""
        self.lock, self.on_step = None, on_step
        self.started, self.wall_before = time.perf_counter(), 0.0  # summary.json's wall_s (see `wall_s`)
        try:
            self._build(cfg, out, resume, overwrite, variant, splits, progress, dist)
        except BaseException:
            self.close()  # a refused or failed start leaves --out to the next writer
            raise

    def member(self) -> FleetMember:
        """This run as a fleet member: the one interface through which a fleet trains it."""
        return FleetMember(self)

    def close(self) -> None:
        """Let go of --out (its lock); the process's end does the same."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, cfg: Config, out, resume: bool, overwrite: bool, variant, splits, progress: bool,
               dist: Dist | None) -> None:
        self.cfg, t = cfg, cfg.train
        self.dist = dist = dist or Dist()
        self.variant = variant_of(cfg) if variant is None else variant
        named = out or cfg.log.out
        self.out = Path(named) if named else default_out_dir(cfg, self.variant)
        if resume and not named:
            self.out = find_run_to_resume(cfg, self.out)
        self.device = dist.local_device(resolve_device(t.device))
        self.rank = rank_that_runs(cfg)
        check_head_kernel(cfg, self.device)
        # Refuse a bad --out before the (slow) data load, but create it only after: a failed
        # load leaves no directory behind. An existing one is locked from here on.
        self.lock = dist.main_first(lambda: claim_out_dir(cfg, self.out, resume, overwrite), others=False)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
        dtype = DTYPES[t.dtype]

        if splits is None:
            splits, source = dist.main_first(lambda: load_data(cfg))  # process 0 builds the token cache
        else:
            splits, source = splits
        self.data_info = dict(splits.info, source=source)
        self.loader = TrainLoader(splits.train_tokens, t.batch_size, cfg.model.block_size, self.device,
                                  shuffle=cfg.data.shuffled, seed=t.seed, proc_rank=dist.proc_rank, world_size=dist.world_size)
        if cfg.data.single_pass and t.steps > self.loader.steps_per_epoch - 1:  # -1: the init batch
            raise RunError(
                f"data.single_pass: {t.steps} steps need {t.steps + 1} batches of "
                f"{self.loader.global_batch} chunks but the training set holds "
                f"{self.loader.steps_per_epoch} ({self.data_info['n_train_tokens']:,} tokens); "
                f"use at most {self.loader.steps_per_epoch - 1} steps, more data, or data.single_pass false")
        # Only process 0 writes to the out dir; the others wait so they never read it half-prepared.
        self.lock = dist.main_first(lambda: prepare_out_dir(cfg, self.out, resume, overwrite, self.lock), others=False)

        self.model = build_gpt(gpt_config(cfg), seed=t.seed, method=t.method).to(self.device)
        if self.device.type == "cpu" and dist.is_main:
            warn_slow_cpu_run(self.model, cfg)
        gen = self.model.sketch_generator(sketch_seed(t.seed, dist.proc_rank))
        # No graph capture under DDP: its gradient all-reduce hooks and bucket rebuilding
        # on the first iterations do not survive being frozen into a captured graph. Nor in
        # float16, whose GradScaler decides on the host whether to skip each step.
        # With torch.compile the graph holds the compiled step: the BASIS sketches' kernels are
        # launched from Python (custom ops), whose host overhead the replay removes.
        # Nor with saved activations offloaded: save_on_cpu allocates pinned host memory each step.
        use_graphs = (t.cuda_graphs and self.device.type == "cuda" and not dist.enabled
                      and t.dtype != "float16" and t.saved_activations != "offload")
        if use_graphs:
            graphs.check_graph_support()  # before training starts, not at the capture
        opt = build_optimizer(self.model, cfg, capturable=use_graphs)
        self.forward = eager = dist.wrap(self.model)  # eval and checkpoints use the bare model
        self.forward = torch.compile(self.forward) if t.compile else self.forward
        self.train_step = TrainStep(self.model, self.forward, opt, self.loader.chunks, gen, self.device, dtype,
                                    use_graphs, grad_clip=cfg.optim.grad_clip, eager_forward=eager,
                                    saved_activations=t.saved_activations)
        self.evaluate = Evaluator(self.model, splits.val_tokens, cfg, self.device, dtype, dist)
        self.clock = Throughput(t.batch_size * cfg.model.block_size * dist.world_size, self.device)

        self.step = 0
        self.checkpoints = Checkpoints(self.out, cfg, dist)
        ckpt = self.checkpoints.load() if resume else None
        if ckpt is not None:
            self.step = ckpt["step"]
            self.train_step.load_state(ckpt)
            self.loader.load_state_dict(ckpt["loader"])
            self.evaluate.load_state_dict(ckpt["val_stream"])
            self.clock.load_state_dict(ckpt)
            self.wall_before = ckpt.get("run_wall_s", 0.0)
        # The record whose evaluation was still to come when the checkpoint was written (see `run`).
        self.pending = ckpt.get("pending") if ckpt else None
        self.metrics = MetricsSink(cfg, self.out, dist, resumed_step=self.step if ckpt else None,
                                   saved_records=ckpt.get("metrics") if ckpt else None,
                                   wandb_id=ckpt.get("wandb_id") if ckpt else None, progress=progress,
                                   pending=self.pending)
        if self.metrics.pending_logged:
            self.pending = None

    def _describe(self) -> list[str]:
        """What is about to happen, in three lines: model and device, data, output."""
        c, d = self.cfg, self.data_info
        n_params = sum(p.numel() for p in self.model.parameters())
        what = "exact backprop" if c.train.method == "exact" else f"BASIS R={self.rank or c.sketch.rank} on {c.sketch.layers}"
        start = f"from the step-{self.step} checkpoint" if self.step else "from scratch"
        return [f"{what}: {n_params / 1e6:.2f}M parameters, {self.device} {c.train.dtype}, "
                f"{c.train.steps} steps of {c.train.batch_size} x {c.model.block_size} tokens, {start}",
                f"data: {d.get('source', '?')}; {d['n_train_docs']} train / {d['n_val_docs']} validation documents, "
                f"{d['n_train_tokens']:,} / {d['n_val_tokens']:,} tokens ({d['protocol']} protocol)",
                f"output: {self.out}/"]

    def run(self) -> dict:
        """Train to train.steps (or a stop request) and write summary.json; --out is let go after."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        t = self.cfg.train
        self.metrics.say(*self._describe())
        self.metrics.open_bar(t.steps, self.step, t.eval_every, self.train_step.running_loss)
        try:
            with StopRequests(self.dist) as stop:
                if self.pending is not None:  # killed while evaluating: that evaluation first
                    self.log_evaluation(self.pending)
                self.clock.start(self.step)
                while self.step < t.steps:
                    if self.cfg.optim.schedule != "constant":
                        set_lr(self.train_step.opt, lr_multiplier(self.cfg, self.step))
                    self.train_step(self.loader.next_indices())
                    self.step += 1
                    self.metrics.stepped()
                    if self.on_step is not None:
                        self.on_step(self.step)
                    evaluate = self.step % t.eval_every == 0 or self.step == t.steps
                    checkpoint = self.step % t.checkpoint_every == 0 or self.step == t.steps
                    # The checkpoint comes before the evaluation, holding the record's training half,
                    # so a kill while evaluating loses no step: a resume evaluates first.
                    rec = self.train_record() if evaluate else None
                    if checkpoint:
                        with self.clock.paused():  # writing 1.5 GB at GPT-2 small is no training step
                            self.save(pending=rec)
                    if evaluate:
                        self.log_evaluation(rec)
                    if stop.agreed(self.step, synced=evaluate or checkpoint):
                        self.save()
                        raise Interrupted(f"interrupted at step {self.step}; checkpoint saved in {self.out} "
                                          f"(continue with --resume)")
        except StopNow:
            raise Interrupted(f"stopped at once during step {self.step}; {checkpoint_note(self.out)}") from None
        finally:
            self.metrics.close_bar()
        return self.finish()

    def train_record(self) -> dict:
        """The training half of this step's metrics record: speed since the last one, mean loss."""
        rec = {"step": self.step, **self.clock.lap(self.step)}
        try:
            rec["train_loss"] = self.train_step.take_mean_loss(self.dist, self.step)
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"{e}; stopped, {checkpoint_note(self.out)}") from None
        return rec

    def log_evaluation(self, rec: dict) -> None:
        rec = dict(rec)
        e0 = time.perf_counter()
        self.metrics.evaluating(self.step)
        rec["val_loss"] = self.evaluate()
        rec.update(eval_s=time.perf_counter() - e0, epoch=self.loader.epoch)
        if self.evaluate.restarts is not None:
            rec["val_restarts"] = self.evaluate.restarts
        self.metrics.log(rec)
        self.clock.start(self.step)

    def wall_s(self) -> float:
        """Wall time of this run so far, over all its processes' lives: set-up (data, model),
        training, evaluations and checkpoints; not the interpreter's start nor time spent stopped."""
        return self.wall_before + time.perf_counter() - self.started

    def save(self, pending: dict | None = None) -> None:
        """Checkpoint this step; `pending`: its metrics record, whose evaluation is still to come."""
        if not self.dist.all(self.train_step.finite()):
            raise NonFiniteLoss(f"non-finite training loss before step {self.step}; {checkpoint_note(self.out)}")
        shared = {"step": self.step, **self.train_step.shared_state(), "loader": self.loader.state_dict(),
                  "val_stream": self.evaluate.state_dict(), **self.clock.state_dict(), "run_wall_s": self.wall_s(),
                  "wandb_id": self.metrics.wandb_id, "metrics": list(self.metrics.records), "pending": pending}
        self.checkpoints.save(shared, self.train_step.own_state())

    def finish(self, cuda_graphs: bool | None = None) -> dict:
        """Write summary.json (process 0) and return it on every process. `cuda_graphs`: whether
        the steps ran as graph replays, where another step than this run's own ran them (a fleet's)."""
        cuda, measured = self.device.type == "cuda", self.train_step.measured
        by_rank = self.dist.all_gather({
            "step_peak_bytes": measured.get("step_peak_bytes"),
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None,
        })
        if not self.dist.is_main:
            return self.dist.broadcast(None)
        cfg, last, world = self.cfg, self.metrics.records[-1], self.dist.world_size
        summary = {
            # the R that ran (min(R, rows of a step)) and the one asked for
            "method": cfg.train.method, "rank": (self.rank or cfg.sketch.rank) if cfg.train.method == "basis" else None,
            "rank_requested": cfg.sketch.rank if cfg.train.method == "basis" else None,
            "variant": self.variant, "seed": cfg.train.seed, "steps": self.step,
            "final_val_loss": last["val_loss"], "final_train_loss": last["train_loss"],
            **{k: measured.get(k) for k in MEMORY_FIELDS}, "head": cfg.model.head,
            # which exact-head kernel ran ("cce" | "native"; the sketched head is always "native"), null for plain
            "head_kernel": self.model.head_kernel_ran(),
            # train_s: the training steps alone; wall_s: everything, evaluations and checkpoints too
            "train_s": self.clock.train_s, "wall_s": self.wall_s(),
            "tokens_per_s": self.clock.steady_tokens_per_s(),  # the warm-up interval left out
            "ms_per_step": 1000 * self.clock.train_s / max(self.step, 1),
            "val_protocol": cfg.data.val_protocol, "data": self.data_info,
            # single pass means epoch 0 here: no training chunk was seen twice
            "tokens_seen": self.step * self.loader.global_batch * cfg.model.block_size,
            "epoch": self.loader.epoch,
            # shuffled: one seeded permutation of the training chunks per pass; stream: their order
            "data_order": "shuffled" if self.loader.shuffle else "stream",
            # chunks trained on / chunks in the training stream (> 1: more than one pass)
            "stream_fraction": self.step * self.loader.global_batch / self.loader.n_chunks,
            "sketch_layers": cfg.sketch.layers, "hashing": cfg.sketch.hashing,
            "invariant_scalars": cfg.sketch.invariant_scalars, "lam": cfg.sketch.lam,
            "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "lr_factor": cfg.optim.lr_factor, "dtype": cfg.train.dtype,
            "tf32": cfg.train.tf32 if cuda else None,
            "device": str(self.device), "gpu": torch.cuda.get_device_name(self.device) if cuda else None,
            "cuda_graphs": self.train_step.graph is not None if cuda_graphs is None else cuda_graphs, "torch": torch.__version__,
            # >1: basis-compare ran this many runs per GPU at once (MPS), so wall_s and tokens_per_s
            # describe a shared GPU, not this configuration's speed
            "runs_per_gpu": int(os.environ.get("BASIS_TRAIN_RUNS_PER_GPU", "1")),
            "config_hash": config_hash(cfg), "world_size": world, "global_batch_size": cfg.train.batch_size * world,
            "by_rank": {k: [r[k] for r in by_rank] for k in by_rank[0]},
        }
        m = cfg.model
        per_token = flops.flops_per_token(self.model, m.n_layer, m.n_head, m.n_embd, m.block_size)
        summary.update(flops_per_token=per_token, mfu=flops.mfu(summary["tokens_per_s"], per_token, summary["gpu"]),
                       mfu_peak=flops.peak_flops(summary["gpu"])[1], compiled=cfg.train.compile, arch=m.arch)
        if self.evaluate.restarts is not None:
            summary["val_restarts"] = self.evaluate.restarts
        atomic_write_json(self.out / "summary.json", summary)
        self.metrics.finish(summary)
        written = sorted(p.name for p in self.out.iterdir() if not p.name.startswith("."))
        self.metrics.say(f"wrote {self.out}/: {', '.join(written)}")
        return self.dist.broadcast(summary)


def train(cfg: Config, out: Path | str | None = None, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train one run to completion and return its summary (also in out/summary.json).

    Under torchrun (WORLD_SIZE > 1) every process calls this and they train one run
    data-parallel: `train.batch_size` is per process, the global batch N times larger.
    """
    dist = init_from_env(resolve_device(cfg.train.device))
    run = None
    try:
        run = Run(cfg, out, resume=resume, overwrite=overwrite, progress=progress, dist=dist, on_step=faults.from_env())
        return run.run()
    except (DataError, graphs.GraphSupportError) as e:
        raise RunError(str(e)) from e
    finally:
        if run is not None:
            run.close()
            # DDP's reducer must not hold the last reference to the process group: freed
            # there (GIL held, e.g. with an exception's traceback) the group's teardown can
            # deadlock against its own worker threads, as seen with gloo after an interrupt, or
            # abort the process at exit ("terminate called without an active exception").
            run.forward = None
            run.train_step.drop_forwards()
        dist.close()
