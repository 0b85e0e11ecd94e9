"""Validation loss under either protocol, split across DDP processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from basis_train.data.loaders import ValStream, heldout_batches
from basis_train.training.step import autocast


class Evaluator:
    """`paper`: each call scores the next chunks of a never-restarted stream; `heldout`: each
    call scores the same held-out batches in full."""

    def __init__(self, model, val_tokens, cfg, device: torch.device, dtype: torch.dtype, dist) -> None:
        self.model, self.device, self.dtype, self.dist = model, device, dtype, dist
        block = cfg.model.block_size
        if cfg.data.val_protocol == "paper":
            self.stream = ValStream(val_tokens, block, device, batches_per_eval=cfg.data.paper_val_batches)
            self.batches = None
        else:
            self.stream = None
            self.batches = heldout_batches(val_tokens, block, cfg.data.eval_batch_size, device)

    def next_batches(self) -> list:
        """The (x, y) batches of the next evaluation (the paper protocol's stream advances)."""
        return [self.stream.next()] if self.stream else self.batches

    @torch.no_grad()
    def __call__(self) -> float:
        self.model.eval()
        batches = self.next_batches()
        d = self.dist
        if d.enabled:  # each process scores its share; every process's ValStream still advances it alike
            batches = ([tuple(t.tensor_split(d.world_size)[d.proc_rank] for t in batches[0])] if self.stream
                       else batches[d.proc_rank :: d.world_size])
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        for x, y in batches:
            if not len(x):
                continue
            with autocast(self.device, self.dtype):
                logits, _ = self.model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            count += y.numel()
        self.model.train()
        if d.enabled:
            total, count = d.all_sum(torch.stack([total, total.new_tensor(count)])).tolist()
            return total / count
        return total.item() / count

    @property
    def restarts(self) -> int | None:
        return self.stream.restarts if self.stream else None

    def state_dict(self) -> dict | None:
        return self.stream.state_dict() if self.stream else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.stream and state:
            self.stream.load_state_dict(state)
