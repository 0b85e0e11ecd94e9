"""The optional Weights & Biases mirror of metrics.jsonl (--wandb offline | online)."""

from __future__ import annotations

import uuid
from pathlib import Path

from basis_train.training.errors import RunError, first_line


class Tracker:
    """Weights & Biases run mirroring metrics.jsonl; a no-op when mode is 'off'."""

    def __init__(self, mode: str, project: str, name: str, config: dict, out: Path, run_id: str | None) -> None:
        self.run = None
        self.run_id = run_id
        if mode == "off":
            return
        try:
            import wandb  # lazy: the GPU image has no wandb
        except ImportError as e:
            raise RunError("wandb is not installed: pip install wandb, or use --wandb off") from e
        self.run_id = run_id or uuid.uuid4().hex[:12]
        try:
            self.run = wandb.init(
                project=project, name=name, config=config, dir=str(out), mode=mode,
                id=self.run_id, resume="allow", reinit="finish_previous",
            )
        except Exception as exc:  # no API key, no network, a refused login: wandb raises its own types
            hint = " (log in with `wandb login` or set WANDB_API_KEY)" if mode == "online" else ""
            raise RunError(f"--wandb {mode}: wandb could not start: {first_line(exc)}{hint}; "
                           "or use --wandb offline / off") from None

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step=step)

    def finish(self, summary: dict | None = None) -> None:
        if self.run is None:
            return
        if summary:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
        self.run.finish()
        self.run = None
