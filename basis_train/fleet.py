"""Many runs in one process: one CUDA stream and one CUDA graph per run.

The paper's model is so small that a single run leaves an H200 almost idle: each kernel
fills a handful of SMs. Separate processes do not help (without MPS their kernels
time-slice rather than overlap), but graphs replayed on separate streams of one
process do run side by side. Each Run keeps its own model, optimiser, data position
and sketch generator, so a run's numbers do not depend on which fleet it ran in
(up to the nondeterminism of CUDA reductions).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

from basis_train.config import Config
from basis_train.train import Interrupted, Run, load_data


def _shared_splits(cfgs: list[Config]) -> dict:
    """Tokenize/split once per distinct data setting instead of once per run."""
    cache = {}
    for cfg in cfgs:
        key = (cfg.data, cfg.model.block_size)
        if key not in cache:
            cache[key] = load_data(cfg)
    return cache


def run_fleet(jobs: list[tuple[Config, Path]], *, resume: bool = True, progress: bool = True,
              log=print) -> list[dict]:
    """Train every (config, out dir) job to completion; returns their summaries in order."""
    if not jobs:
        return []
    splits = _shared_splits([c for c, _ in jobs])
    runs = [Run(c, out, resume=resume, splits=splits[(c.data, c.model.block_size)], progress=False)
            for c, out in jobs]
    if runs[0].device.type != "cuda":
        return [r.run() for r in runs]
    return _interleaved(runs, progress, log)


def _interleaved(runs: list[Run], progress: bool, log) -> list[dict]:
    stop = {"flag": False}
    old = signal.signal(signal.SIGINT, lambda *_: stop.update(flag=True))
    streams = [torch.cuda.Stream(r.device) for r in runs]
    total = sum(r.cfg.train.steps - r.step for r in runs)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True, mininterval=1.0)
    clocks = {id(r): (time.perf_counter(), r.step) for r in runs}
    summaries: dict[int, dict] = {}
    active = list(runs)
    debug = bool(os.environ.get("BASIS_FLEET_DEBUG"))
    it = 0
    try:
        while active:
            it += 1
            if debug and (it <= 6 or it % 100 == 0):
                torch.cuda.synchronize()
                log(f"[fleet] iteration {it} at {time.perf_counter():.3f}s, steps {[r.step for r in active][:4]}")
            for run, stream in zip(active, streams):
                with torch.cuda.stream(stream):
                    run.train_step()
            bar.update(len(active))
            for run, stream in zip(list(active), list(streams)):
                t = run.cfg.train
                if run.step % t.eval_every == 0 or run.step == t.steps:
                    stream.synchronize()
                    t0, s0 = clocks[id(run)]
                    with torch.cuda.stream(stream):
                        clocks[id(run)] = run._eval_and_log(t0, s0, bar)
                if run.step % t.checkpoint_every == 0 or run.step == t.steps:
                    with torch.cuda.stream(stream):
                        run.save()
                if run.step == t.steps:
                    summaries[id(run)] = run._finish()
                    i = active.index(run)
                    active.pop(i)
                    streams.pop(i)
            if stop["flag"]:
                for run in active:
                    run.save()
                raise Interrupted(f"interrupted; checkpoints of {len(active)} unfinished runs saved")
    finally:
        bar.close()
        signal.signal(signal.SIGINT, old)
    return [summaries[id(r)] for r in runs]
