"""One memory method's training step at one size, for the frontier (experiments/frontier.py): its peak
memory, whether it ran out, and its speed. A probe builds the model and optimiser as a run does
(training/setup.py) and runs training/step.py's TrainStep eagerly; see frontier.py for what "fits" means.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from basis_train.core import flops
from basis_train.core.model import build_gpt
from basis_train.experiments.timing import time_step
from basis_train.training.config import Config
from basis_train.training.setup import build_optimizer, gpt_config, sketch_seed
from basis_train.training.step import DTYPES, TrainStep

GIB = 2**30


def say(line: str) -> None:
    """The frontier's progress lines, on stderr."""
    print(line, file=sys.stderr, flush=True)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def static_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters, their gradients and the optimiser's state (a tied weight counts once)."""
    params = list(model.parameters())
    grads = [p for p in params if p.requires_grad]
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in [*params, *grads, *state])


def host_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Prober:
    """One method's training step at (batch, seq) sizes: peak bytes (cached by size) and timings.
    The model and optimiser are kept while only the batch changes, rebuilt when the context does."""

    def __init__(self, make_cfg: Callable[[int, int], Config], device: torch.device, host_limit: int | None = None,
                 log=say, tag: str = "") -> None:
        self.make_cfg, self.device, self.host_limit, self.log, self.tag = make_cfg, device, host_limit, log, tag
        self.cache: dict[tuple[int, int], dict] = {}
        self._held = None

    def measure(self, batch: int, seq: int) -> dict:
        if (batch, seq) not in self.cache:
            r = self.cache[batch, seq] = self._guarded(batch, seq, 0)
            peak = f"{r['peak_bytes'] / GIB:.3f} GiB" if r["status"] == "ok" else r["status"]
            self.log(f"[frontier] [{self.tag}] B={batch} T={seq}: {peak} ({r['seconds']:.1f} s)")
        return self.cache[batch, seq]

    def timed(self, batch: int, seq: int, steps: int) -> dict:
        return self._guarded(batch, seq, steps)

    def release(self) -> None:
        self._held = None
        self._free()

    def _free(self) -> None:
        # On CUDA what a probe leaves (a TrainStep sits in a reference cycle) must be gone before the next
        # one's peak; on CPU nothing is measured from the allocator, and a collection costs 0.1-0.2 s.
        if self.device.type == "cuda":
            free_memory()

    def _guarded(self, batch: int, seq: int, steps: int) -> dict:
        t0 = time.perf_counter()
        res = self._host_refusal(batch, seq)
        if res is None:
            try:
                res = self._point(batch, seq, steps)
            except Exception as e:  # noqa: BLE001 - out of memory is an answer; anything else is the method's error
                if not is_oom(e):
                    raise
                res = {"status": "oom", "error": f"{type(e).__name__}: {e}"[:500]}
            # out of the except block: the exception's frames, and the activations they hold, are gone
            self._free()
        return {**res, "seconds": time.perf_counter() - t0}

    def _host_refusal(self, batch: int, seq: int) -> dict | None:
        """Offload: the host bytes this size would pin, from the bytes per token smaller sizes pinned."""
        seen = [r["offloaded_bytes"] / (b * s) for (b, s), r in self.cache.items() if r.get("offloaded_bytes")]
        if self.host_limit is None or not seen or max(seen) * batch * seq <= self.host_limit:
            return None
        return {"status": "host-memory", "error": f"would pin about {max(seen) * batch * seq / GIB:.1f} GiB of host "
                                                  f"memory, over the limit of {self.host_limit / GIB:.1f} GiB"}

    def _model(self, cfg: Config):
        key = (cfg.model, cfg.sketch, cfg.train.method, cfg.optim)
        if self._held is None or self._held[0] != key:
            self.release()  # before building the next one: the peak must not see two models
            model = build_gpt(gpt_config(cfg), seed=cfg.train.seed, method=cfg.train.method).to(self.device).train()
            gen = model.sketch_generator(sketch_seed(cfg.train.seed))
            self._held = (key, model, build_optimizer(model, cfg, capturable=False), gen)
        return self._held[1:]

    def _point(self, batch: int, seq: int, steps: int) -> dict:
        cfg, dev = self.make_cfg(batch, seq), self.device
        model, opt, gen = self._model(cfg)
        tokens = torch.Generator().manual_seed(cfg.train.seed)  # random ids: memory and speed ignore the text
        chunks = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1), generator=tokens).to(dev)
        idx = torch.arange(batch, device=dev)
        step = TrainStep(model, model, opt, chunks, gen, dev, DTYPES[cfg.train.dtype], False,
                         grad_clip=cfg.optim.grad_clip, saved_activations=cfg.train.saved_activations)
        try:
            step(idx)  # metered (step.measured); allocates optimiser state and workspaces
            m = step.measured
            res = {"status": "ok", **{k: m.get(k) for k in ("activation_bytes", "weight_cast_bytes", "offloaded_bytes")}}
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                step(idx)
                torch.cuda.synchronize(dev)
                res.update(peak_bytes=torch.cuda.max_memory_allocated(dev), reserved_bytes=torch.cuda.max_memory_reserved(dev))
            else:
                res["static_bytes"] = static_bytes(model, opt)
                res["peak_bytes"] = res["static_bytes"] + m["activation_bytes"] + m["weight_cast_bytes"]
            if steps:
                ms = time_step(lambda: step(idx), dev, steps, warmup=1)
                tps = batch * seq / (ms["median"] / 1e3)
                c = cfg.model
                per_token = flops.flops_per_token(model, c.n_layer, c.n_head, c.n_embd, seq)
                gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
                res.update(time_ms=ms, tokens_per_s=tps, mfu=flops.mfu(tps, per_token, gpu))
        finally:
            opt.zero_grad(set_to_none=True)
        return res
