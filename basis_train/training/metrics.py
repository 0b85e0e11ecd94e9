"""Where a run's measurements go: throughput clock, metrics.jsonl, wandb and the progress bar."""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import contextmanager

import torch

from basis_train.training.config import Config, config_to_dict
from basis_train.training.metrics_log import MetricsLog, UnwrittenMetrics
from basis_train.training.tracker import Tracker


def steady_rate(rates: list[float]) -> float:
    """A run's tokens/s once warm, from its rates between evaluations: the median over the intervals
    after the first, which holds torch.compile's compilation and the CUDA-graph capture (a mean over
    all intervals put a 2,000-step GPT-2-small run at 0.90x its steady rate). One interval: that one."""
    rates = rates[1:] or rates
    return statistics.median(rates) if rates else float("nan")


class Throughput:
    """Training time and tokens/s between evaluations; the clock stops while evaluating and while
    `paused` (a checkpoint written between evaluations)."""

    def __init__(self, tokens_per_step: int, device: torch.device) -> None:
        self.tokens_per_step, self.device = tokens_per_step, device
        self.train_s = 0.0
        self.tokens_per_s: list[float] = []
        self._t0, self._step0, self._banked = 0.0, 0, 0.0

    def start(self, step: int) -> None:
        self._t0, self._step0, self._banked = time.perf_counter(), step, 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":  # the steps queued so far belong to the time before
            torch.cuda.synchronize(self.device)

    @contextmanager
    def paused(self):
        self._sync()
        self._banked += time.perf_counter() - self._t0
        try:
            yield
        finally:
            self._t0 = time.perf_counter()

    def lap(self, step: int) -> dict:
        """Close the interval since `start` (syncing the GPU, so it is honest)."""
        self._sync()
        dt = self._banked + time.perf_counter() - self._t0
        self.train_s += dt
        tok_s = (step - self._step0) * self.tokens_per_step / dt if dt > 0 else float("nan")
        self.tokens_per_s.append(tok_s)
        return {"tokens_per_s": tok_s, "ms_per_step": 1000 * dt / max(step - self._step0, 1)}

    def steady_tokens_per_s(self) -> float:
        return steady_rate(self.tokens_per_s)

    def state_dict(self) -> dict:
        return {"train_s": self.train_s, "tokens_per_s": self.tokens_per_s}

    def load_state_dict(self, state: dict) -> None:
        # "wall_s": the name in checkpoints written before total wall time was kept apart
        self.train_s, self.tokens_per_s = state.get("train_s", state.get("wall_s")), state["tokens_per_s"]


class MetricsSink:
    """Process 0 writes metrics.jsonl and mirrors it to wandb; other processes write nothing."""

    def __init__(self, cfg: Config, out, dist, resumed_step: int | None, wandb_id: str | None,
                 progress: bool, saved_records: list[dict] | None = None, pending: dict | None = None) -> None:
        # On resume the log is cut back to the checkpoint's step (metrics_log.py).
        self.log_file = (MetricsLog(out / "metrics.jsonl", resumed_step, saved_records, pending)
                         if dist.is_main else UnwrittenMetrics())
        # Whether the evaluation the checkpoint left pending is already in the log: process 0 read it.
        self.pending_logged = dist.broadcast(self.log_file.pending_logged if dist.is_main else None)
        self.tracker = Tracker(cfg.log.wandb if dist.is_main else "off", cfg.log.wandb_project,
                               cfg.log.run_name or out.name, config_to_dict(cfg), out, wandb_id)
        self.progress = progress and dist.is_main
        self.bar = None

    @property
    def records(self) -> list:
        return self.log_file.records

    @property
    def wandb_id(self) -> str | None:
        return self.tracker.run_id

    def open_bar(self, total: int, initial: int, eval_every: int, running_loss) -> None:
        """`running_loss()`: the mean training loss since the last record, None if there is none."""
        from basis_train.training.progress import ProgressBar

        self.bar = ProgressBar(total, initial, eval_every, running_loss, disable=not self.progress)

    def say(self, *lines: str) -> None:
        """Tell the user what is happening (stderr, above the bar; nothing under --quiet)."""
        if self.progress:
            from tqdm.auto import tqdm

            for line in lines:
                tqdm.write(line, file=sys.stderr)

    def evaluating(self, step: int) -> None:
        # A full held-out evaluation takes seconds to minutes on a CPU; the bar would look frozen.
        if self.bar is not None:
            self.bar.set_postfix_str(f"evaluating at step {step}...")

    def stepped(self) -> None:
        self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, rec: dict) -> None:
        self.log_file.append(rec)
        self.tracker.log(rec, step=rec["step"])
        if self.bar is not None:
            self.bar.evaluated(rec["eval_s"], f"val {rec['val_loss']:.3f} at {rec['step']}, "
                                              f"{rec['tokens_per_s']:,.0f} tok/s")

    def finish(self, summary: dict) -> None:
        self.tracker.finish(summary)
