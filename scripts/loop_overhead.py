"""The training loop's own host time per step, the step itself taken out.

Between two training steps `Run._run` sets the scheduled lr, takes the next batch's chunk ids from the
loader, counts the step, updates the progress bar (which reads the running loss from the device at
most every 0.5 s) and checks for a stop request. This script builds a real run of CONFIG, replaces the
step's dispatch (forward, backward, optimiser, or the CUDA-graph replay) with nothing, trains STEPS
steps and reports the time between consecutive steps: what the loop adds to each step on the host.
On a GPU that time overlaps the queued steps' kernels as long as it stays below the step's GPU time.

    python scripts/loop_overhead.py OUT.json [--config configs/tiny.yaml] [--steps 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from basis_train.experiments.provenance import command_line, cpu_name, git_commit
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.train import Run


def time_loop(config: str, steps: int) -> tuple[list[float], dict]:
    """Seconds between consecutive training steps of one run whose steps do nothing, and its summary."""
    cfg = apply_overrides(load_config(config), {"train.steps": steps, "train.eval_every": steps,
                                                "train.checkpoint_every": steps})
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
        run = Run(cfg, Path(out) / "run", overwrite=True, progress=True,
                  on_step=lambda _: stamps.append(time.perf_counter()))
        dispatch = run.train_step.dispatch  # the step's dispatch stays; the step it runs is nothing
        dispatch.use_graphs, dispatch.eager_step = False, lambda idx: None
        summary = run.run()
    # the last step is followed by its evaluation and checkpoint; the intervals before it are the loop's
    return [b - a for a, b in zip(stamps, stamps[1:-1], strict=False)], summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    medians, p99s = [], []
    for _ in range(a.repeats):
        gaps = sorted(time_loop(a.config, a.steps)[0])
        medians.append(statistics.median(gaps) * 1e6)
        p99s.append(gaps[int(0.99 * (len(gaps) - 1))] * 1e6)
        print(f"median {medians[-1]:.1f} us, p99 {p99s[-1]:.1f} us per step", flush=True)
    result = {"meta": {"command": command_line(__spec__, __file__), "commit": git_commit(),
                       "machine": cpu_name(),
                       "cpus": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
                       "config": a.config, "steps": a.steps, "repeats": a.repeats},
              "median_us_per_step": [round(m, 2) for m in medians], "p99_us_per_step": [round(p, 2) for p in p99s],
              "median_of_medians_us": round(statistics.median(medians), 2)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
