"""The training loop: one `Run` is one (config, seed) training job.

A Run owns its model, optimiser, data position and random streams. On CUDA a training
step is one CUDA-graph replay: no host synchronisation happens between evaluations,
which is what makes a 64-token model fast.

Pairing: the seed alone fixes the initial weights (a private CPU generator, see
model.py) and the batch order; the sketch's random stream has its own generator, so
exact and BASIS runs with one seed start identical and see identical batches.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from basis_train.core import graphs
from basis_train.core.memory import SavedTensorMeter, cuda_step_peak
from basis_train.core.model import build_gpt
from basis_train.data.corpus import DataError
from basis_train.data.loaders import TrainLoader, ValStream, heldout_batches
from basis_train.training.config import Config, config_hash, config_to_dict
from basis_train.training.distributed import Dist, init_from_env
from basis_train.training.runio import (
    MetricsLog,
    RunError,
    Tracker,
    UnwrittenMetrics,
    atomic_write_json,
    default_out_dir,
    load_checkpoint,
    prepare_out_dir,
    save_checkpoint,
)
from basis_train.training.setup import build_optimizer, gpt_config, load_data, resolve_device, sketch_seed, variant_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EAGER_BEFORE_CAPTURE = 3
# With several ranks a SIGINT/SIGTERM is acted on only once all ranks agree, which costs a
# host sync, so they compare flags every this many steps (and at every eval/checkpoint).
_STOP_CHECK_EVERY = 20


class NonFiniteLoss(RunError):
    pass


class Interrupted(Exception):
    pass


class Run:
    def __init__(self, cfg: Config, out: Path | str | None = None, *, resume: bool = False,
                 variant: str | None = None, splits=None, progress: bool = True, dist: Dist | None = None) -> None:
        self.cfg, t = cfg, cfg.train
        self.dist = dist = dist or Dist()
        self.variant = variant_of(cfg) if variant is None else variant
        self.out = Path(out or cfg.log.out or default_out_dir(cfg, self.variant))
        self.device = dist.local_device(resolve_device(t.device))
        self.progress = progress and dist.is_main
        # Only rank 0 writes to the out dir; the others wait so they never read it half-prepared.
        dist.main_first(lambda: prepare_out_dir(cfg, self.out, resume), others=False)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # the paper ran on a T4: true fp32
            torch.backends.cudnn.allow_tf32 = False
        self.amp_dtype = DTYPES[t.dtype]
        if splits is None:
            splits, source = dist.main_first(lambda: load_data(cfg))  # rank 0 builds the token cache
        else:
            splits, source = splits
        self.data_info = dict(splits.info, source=source)
        self.loader = TrainLoader(splits.train_tokens, t.batch_size, cfg.model.block_size, self.device,
                                  shuffle=cfg.data.shuffle, seed=t.seed, rank=dist.rank, world_size=dist.world_size)
        if cfg.data.val_protocol == "paper":
            self.val_stream = ValStream(splits.val_tokens, cfg.model.block_size, self.device,
                                        batches_per_eval=cfg.data.paper_val_batches)
            self.val_batches = None
        else:
            self.val_stream = None
            self.val_batches = heldout_batches(splits.val_tokens, cfg.model.block_size, cfg.data.eval_batch_size,
                                               self.device)
        self.model = build_gpt(gpt_config(cfg), seed=t.seed, method=t.method).to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(sketch_seed(t.seed, dist.rank))
        for m in self.model.sketched_modules():
            m.generator = self.gen
        # No graph capture under DDP: its gradient all-reduce hooks and bucket rebuilding
        # on the first iterations do not survive being frozen into a captured graph.
        self.use_graphs = t.cuda_graphs and self.device.type == "cuda" and not t.compile and not dist.enabled
        self.opt = build_optimizer(self.model, cfg, capturable=self.use_graphs)
        self.forward = dist.wrap(self.model)  # eval and checkpoints use the bare model
        self.forward = torch.compile(self.forward) if t.compile else self.forward
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_n = 0
        self.step = 0
        self.wall_s = 0.0
        self.measured: dict = {}
        self.tokens_per_s: list[float] = []
        self.graph = None
        self._eager_steps = 0
        self._stop = False
        ckpt = load_checkpoint(self.out) if resume else None
        if ckpt is not None:
            self._restore(ckpt)
        self.metrics = (MetricsLog(self.out / "metrics.jsonl", keep_until_step=self.step if ckpt else -1)
                        if dist.is_main else UnwrittenMetrics())
        self.tracker = Tracker(cfg.log.wandb if dist.is_main else "off", cfg.log.wandb_project,
                               cfg.log.run_name or self.out.name, config_to_dict(cfg), self.out,
                               ckpt.get("wandb_id") if ckpt else None)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict:
        return {
            "version": 1, "step": self.step, "model": self.model.state_dict(), "optim": self.opt.state_dict(),
            "loader": self.loader.state_dict(),
            "val_stream": self.val_stream.state_dict() if self.val_stream else None,
            "gen": self.gen.get_state(), "loss_sum": self.loss_sum.item(), "loss_n": self.loss_n,
            "wall_s": self.wall_s, "measured": self.measured, "tokens_per_s": self.tokens_per_s,
            "wandb_id": getattr(self, "tracker", None) and self.tracker.run_id,
            "config_hash": config_hash(self.cfg), "world_size": self.dist.world_size,
        }

    def _restore(self, ckpt: dict) -> None:
        saved_world = ckpt.get("world_size", 1)
        if saved_world != self.dist.world_size:
            # The global batch (and each rank's sketch stream) depends on the process count.
            raise RunError(f"the checkpoint in {self.out} was written by {saved_world} process(es); "
                           f"resume it with torchrun --nproc_per_node={saved_world}")
        self.step = ckpt["step"]
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optim"])
        self.loader.load_state_dict(ckpt["loader"])
        if self.val_stream and ckpt["val_stream"]:
            self.val_stream.load_state_dict(ckpt["val_stream"])
        mine = ckpt["ranks"][self.dist.rank] if "ranks" in ckpt else ckpt
        self.gen.set_state(mine["gen"])
        self.loss_sum.fill_(mine["loss_sum"])
        self.loss_n, self.wall_s = ckpt["loss_n"], ckpt["wall_s"]
        self.measured, self.tokens_per_s = ckpt["measured"], ckpt["tokens_per_s"]

    def _finite(self) -> bool:
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        return math.isfinite(self.loss_sum.item()) and bool(torch.isfinite(torch.stack(norms)).all())

    def save(self) -> None:
        if not self.dist.all(self._finite()):
            raise NonFiniteLoss(f"non-finite training loss before step {self.step}; "
                                f"the last good checkpoint in {self.out} was kept")
        # Rank 0's file holds every rank's sketch generator and unlogged loss sum, so a
        # resumed rank continues its own random stream and the next logged mean is exact.
        ranks = self.dist.all_gather({"gen": self.gen.get_state(), "loss_sum": self.loss_sum.item()})
        if self.dist.is_main:
            state = self._state()
            if self.dist.enabled:
                state["ranks"] = ranks
            save_checkpoint(self.out, state)

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _fwd_bwd_opt(self, idx: torch.Tensor) -> None:
        chunks = self.loader.chunks[idx]
        x, y = chunks[:, :-1].long(), chunks[:, 1:].long()
        with self._autocast():
            _, loss = self.forward(x, y)
        loss.backward()
        self.opt.step()
        self.loss_sum += loss.detach()

    def _eager_step(self, idx: torch.Tensor) -> None:
        self._fwd_bwd_opt(idx)
        self.opt.zero_grad(set_to_none=True)

    def _measured_step(self, idx: torch.Tensor) -> None:
        """The first step also measures what the step keeps for backward."""
        meter = SavedTensorMeter(exclude=self.model.parameters())
        with meter.measure():
            if self.device.type == "cuda":
                self.measured["cuda_peak_step_bytes"] = cuda_step_peak(lambda: self._eager_step(idx), self.device)
            else:
                self._eager_step(idx)
        self.measured["peak_activation_bytes"] = meter.total_bytes
        self.measured.setdefault("cuda_peak_step_bytes", None)
        top = sorted(meter.by_shape.items(), key=lambda kv: -kv[1])[:5]
        self.measured["saved_top"] = [[str(list(k[0])), k[1], v] for k, v in top]

    def _capture_and_replay(self, idx: torch.Tensor) -> None:
        self.idx_buf = idx.clone()
        self.opt.zero_grad(set_to_none=True)
        self.graph = graphs.capture(lambda: self._fwd_bwd_opt(self.idx_buf), generators=[self.gen])

    def train_step(self) -> None:
        idx = self.loader.next_indices()
        if self.graph is not None:
            self.idx_buf.copy_(idx)
            self.graph.replay()
        else:
            # Before capture, a few eager steps on a side stream let lazy initialisation
            # (optimiser state, cuBLAS workspaces) happen outside the graph.
            with graphs.side_stream(self.device, self.use_graphs):
                if not self.measured:
                    self._measured_step(idx)
                elif self.use_graphs and self._eager_steps >= _EAGER_BEFORE_CAPTURE:
                    self._capture_and_replay(idx)
                else:
                    self._eager_step(idx)
            self._eager_steps += 1
        self.loss_n += 1
        self.step += 1

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        batches = [self.val_stream.next()] if self.val_stream else self.val_batches
        d = self.dist
        if d.enabled:  # each rank scores its share; every ValStream rank still advances it alike
            batches = ([tuple(t.tensor_split(d.world_size)[d.rank] for t in batches[0])] if self.val_stream
                       else batches[d.rank :: d.world_size])
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in batches:
            if not len(x):
                continue
            with self._autocast():
                logits, _ = self.model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            count += y.numel()
        self.model.train()
        if d.enabled:
            total, count = d.all_sum(torch.stack([total, total.new_tensor(count)])).tolist()
            return total / count
        return total.item() / count

    # ------------------------------------------------------------------ loop
    def _on_signal(self, signum, frame) -> None:
        self._stop = True

    def _should_stop(self, synced: bool) -> bool:
        if not self.dist.enabled:
            return self._stop
        # A signal may reach only some ranks (or reach them at different steps): stop
        # only where all compare flags, and then all together.
        if synced or self.step % _STOP_CHECK_EVERY == 0:
            return self.dist.any(self._stop)
        return False

    def run(self) -> dict:
        t = self.cfg.train
        handlers = {}
        if hasattr(signal, "SIGTERM"):
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    handlers[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass
        die_at = int(os.environ.get("BASIS_TRAIN_DIE_AT_STEP", "0"))  # test hook: simulate kill -9
        bar = _progress(t.steps, self.step, enabled=self.progress)
        try:
            t0, steps0 = time.perf_counter(), self.step
            while self.step < t.steps:
                self.train_step()
                bar.update(1)
                if self.step == die_at:
                    os._exit(137)
                evaluate = self.step % t.eval_every == 0 or self.step == t.steps
                if evaluate:
                    t0, steps0 = self._eval_and_log(t0, steps0, bar)
                checkpoint = self.step % t.checkpoint_every == 0 or self.step == t.steps
                if checkpoint:
                    self.save()
                if self._should_stop(synced=evaluate or checkpoint):
                    self.save()
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint saved in {self.out} "
                                      f"(continue with --resume)")
        finally:
            bar.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return self._finish()

    def _eval_and_log(self, t0: float, steps0: int, bar) -> tuple[float, int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.wall_s += dt
        world = self.dist.world_size
        tokens = (self.step - steps0) * self.cfg.train.batch_size * self.cfg.model.block_size * world
        tok_s = tokens / dt if dt > 0 else float("nan")
        self.tokens_per_s.append(tok_s)
        # The one place per-rank losses meet: every rank gets the same global mean, so the
        # non-finite check below fails on all ranks or on none.
        train_loss = self.dist.all_sum(self.loss_sum.clone()).item() / (max(self.loss_n, 1) * world)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"non-finite training loss between steps {self.step - self.loss_n} and "
                                f"{self.step}; stopped, the last good checkpoint in {self.out} was kept")
        self.loss_sum.zero_()
        self.loss_n = 0
        e0 = time.perf_counter()
        val_loss = self.evaluate()
        rec = {
            "step": self.step, "train_loss": train_loss, "val_loss": val_loss, "tokens_per_s": tok_s,
            "ms_per_step": 1000 * dt / max(self.step - steps0, 1),
            "peak_activation_bytes": self.measured["peak_activation_bytes"],
            "cuda_peak_step_bytes": self.measured["cuda_peak_step_bytes"],
            "eval_s": time.perf_counter() - e0, "epoch": self.loader.epoch,
        }
        if self.val_stream:
            rec["val_restarts"] = self.val_stream.restarts
        self.metrics.append(rec)
        self.tracker.log(rec, step=self.step)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        return time.perf_counter(), self.step

    def _finish(self) -> dict:
        cuda = self.device.type == "cuda"
        by_rank = self.dist.all_gather({
            "cuda_peak_step_bytes": self.measured["cuda_peak_step_bytes"],
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else None,
        })
        if not self.dist.is_main:
            return self.dist.broadcast(None)
        cfg, last = self.cfg, self.metrics.records[-1]
        summary = {
            "method": cfg.train.method, "rank": cfg.sketch.rank if cfg.train.method == "basis" else None,
            "variant": self.variant, "seed": cfg.train.seed, "steps": self.step,
            "final_val_loss": last["val_loss"], "final_train_loss": last["train_loss"],
            "peak_activation_bytes": self.measured["peak_activation_bytes"],
            "cuda_peak_step_bytes": self.measured["cuda_peak_step_bytes"],
            "saved_top": self.measured.get("saved_top"),
            "wall_s": self.wall_s,
            "tokens_per_s": sum(self.tokens_per_s) / len(self.tokens_per_s),
            "ms_per_step": 1000 * self.wall_s / max(self.step, 1),
            "val_protocol": cfg.data.val_protocol, "data": self.data_info,
            "sketch_layers": cfg.sketch.layers, "hashing": cfg.sketch.hashing,
            "invariant_scalars": cfg.sketch.invariant_scalars, "lam": cfg.sketch.lam,
            "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "dtype": cfg.train.dtype,
            "device": str(self.device), "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "cuda_graphs": self.graph is not None, "torch": torch.__version__, "config_hash": config_hash(cfg),
            "world_size": self.dist.world_size, "global_batch_size": cfg.train.batch_size * self.dist.world_size,
            "by_rank": {k: [r[k] for r in by_rank] for k in by_rank[0]},
        }
        if self.val_stream:
            summary["val_restarts"] = self.val_stream.restarts
        atomic_write_json(self.out / "summary.json", summary)
        self.tracker.finish(summary)
        return self.dist.broadcast(summary)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, mininterval=0.5)


def train(cfg: Config, out: Path | str | None = None, *, resume: bool = False, progress: bool = True) -> dict:
    """Train one run to completion and return its summary (also in out/summary.json).

    Under torchrun (WORLD_SIZE > 1) every process calls this and they train one run
    data-parallel: `train.batch_size` is per process, the global batch N times larger.
    """
    dist = init_from_env(resolve_device(cfg.train.device))
    run = None
    try:
        run = Run(cfg, out, resume=resume, progress=progress, dist=dist)
        return run.run()
    except DataError as e:
        raise RunError(str(e)) from e
    finally:
        if run is not None:
            # DDP's reducer must not hold the last reference to the process group: freed
            # there (GIL held, e.g. with an exception's traceback) the group's teardown can
            # deadlock against its own worker threads, as seen with gloo after an interrupt.
            run.forward = None
        dist.close()
