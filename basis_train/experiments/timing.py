"""Timing a callable the same way everywhere in the bench: CUDA events per step on a GPU
(no host sync per step, which would itself add latency), wall clock on a CPU."""

from __future__ import annotations

import time

import numpy as np
import torch


def time_step(step, device: torch.device, steps: int, warmup: int) -> dict:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        # Events time the device without a host sync per step, which would itself add latency.
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        ms = [start.elapsed_time(end) for start, end in events]
    else:
        ms = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            ms.append((time.perf_counter() - t0) * 1e3)
    q25, med, q75 = np.percentile(ms, [25, 50, 75]).tolist()
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "min": min(ms), "all": ms}
