"""Throughput of N paper-size runs sharing one GPU (one process, one stream per run)."""
import os
import sys
import time
from pathlib import Path

from basis_train.config import apply_overrides, load_config
from basis_train.fleet import run_fleet

n_seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
out = Path(os.environ.get("OUT", "/tmp")) / "fleet"
jobs = []
for seed in range(n_seeds):
    for method, rank in [("exact", 32), ("basis", 64), ("basis", 32), ("basis", 16), ("basis", 8), ("basis", 1)]:
        cfg = apply_overrides(load_config(None), {"train.method": method, "sketch.rank": rank, "train.seed": seed,
                                                  "train.steps": steps, "train.eval_every": min(1000, steps),
                                                  "train.checkpoint_every": 100000})
        jobs.append((cfg, out / f"{method}-{rank}-s{seed}"))
t = time.perf_counter()
sums = run_fleet(jobs, progress=False)
wall = time.perf_counter() - t
print(f"fleet of {len(jobs)} runs x {steps} steps: {wall:.1f}s wall, "
      f"{len(jobs) * steps / wall:,.0f} run-steps/s; per-run ms/step {[round(s['ms_per_step'], 3) for s in sums]}")
