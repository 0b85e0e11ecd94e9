"""Train/validation splits of a tokenized corpus and the batch loaders (docs/paper.md section 2).

Documents are concatenated, each followed by end-of-text, and cut into consecutive
non-overlapping (block_size + 1)-token chunks, as the reference script does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from basis_train.data.corpus import Corpus, DataError

# ---------------------------------------------------------------- splits


@dataclass
class Splits:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    info: dict


def make_splits(corpus: Corpus, val_protocol: str, block_size: int, *, paper_val_docs: int = 500,
                heldout_every: int = 20, heldout_min_tokens: int = 100_000) -> Splits:
    """Split documents into train and validation tokens.

    "paper" reproduces the reference: train on everything and validate on the
    first ``paper_val_docs`` documents, which are therefore also trained on.
    "heldout" moves every k-th document out of train, halving k from
    ``heldout_every`` (down to 2) until validation has ``heldout_min_tokens``.
    """
    offs, n = corpus.doc_offsets, corpus.n_docs
    info = {"protocol": val_protocol, "n_docs": n}
    if corpus.stats:
        info["corpus"] = dict(corpus.stats)
    if val_protocol == "paper":
        n_val = min(paper_val_docs, n)
        train, val = corpus.tokens, corpus.tokens[: offs[n_val]]
        info.update(n_train_docs=n, n_val_docs=n_val, val_overlaps_train=True)
    elif val_protocol == "heldout":
        if heldout_every < 2 or n < 2:
            raise DataError(f"heldout split needs k >= 2 and 2+ documents ({heldout_every}, {n})")
        doc_len = np.diff(offs)
        k = heldout_every
        while True:
            is_val = np.arange(n) % k == k - 1
            if doc_len[is_val].sum() >= heldout_min_tokens or k <= 2:
                break
            k = max(2, k // 2)
        token_is_val = np.repeat(is_val, doc_len)
        train, val = corpus.tokens[~token_is_val], corpus.tokens[token_is_val]
        info.update(
            n_train_docs=int(n - is_val.sum()), n_val_docs=int(is_val.sum()),
            heldout_every=k, heldout_every_requested=heldout_every, val_overlaps_train=False,
        )
    else:
        raise DataError(f"unknown val protocol '{val_protocol}'; choose paper or heldout")
    info.update(n_train_tokens=len(train), n_val_tokens=len(val),
                n_train_chunks=n_chunks(train, block_size), n_val_chunks=n_chunks(val, block_size))
    if info["n_val_chunks"] == 0:
        raise DataError(f"validation set has {len(val)} tokens, fewer than block_size+1")
    return Splits(np.asarray(train), np.asarray(val), info)


# ------------------------------------------------------------- batching


def n_chunks(tokens, block_size: int) -> int:
    """Number of non-overlapping (block_size+1)-token chunks; a partial tail is dropped."""
    return len(tokens) // (block_size + 1)


def as_chunks(tokens, block_size: int, device=None) -> torch.Tensor:
    """(n_chunks, block_size+1) int32 tensor on ``device`` (token ids fit in int32)."""
    n = n_chunks(tokens, block_size)
    arr = np.array(tokens[: n * (block_size + 1)], dtype=np.int32).reshape(n, block_size + 1)
    return torch.from_numpy(arr).to(device)


def _xy(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return chunks[:, :-1].long(), chunks[:, 1:].long()


class TrainLoader:
    """Training batches of consecutive chunks, restarting when a global batch no longer fits.

    Model initialisation consumes the first global batch, so the loader starts
    positioned after it (``first_batch()`` returns it without moving). All
    processes walk the same chunk order; process r takes slice r of each global batch.
    """

    def __init__(self, tokens, batch_size: int, block_size: int, device, *,
                 shuffle: bool = False, seed: int = 0, proc_rank: int = 0, world_size: int = 1):
        if not 0 <= proc_rank < world_size:
            raise ValueError(f"proc_rank {proc_rank} outside world_size {world_size}")
        self.batch_size, self.block_size, self.device = batch_size, block_size, torch.device(device)
        self.shuffle, self.seed, self.proc_rank, self.world_size = shuffle, seed, proc_rank, world_size
        self.global_batch = batch_size * world_size
        self.chunks = as_chunks(tokens, block_size, self.device)
        self.n_chunks = len(self.chunks)
        if self.n_chunks < self.global_batch:
            raise DataError(
                f"training set has {self.n_chunks} chunks of {block_size + 1} tokens, "
                f"fewer than one global batch ({self.global_batch})"
            )
        self.steps_per_epoch = self.n_chunks // self.global_batch
        self.load_state_dict({"epoch": 0, "pos": self.global_batch})

    def _order_for(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_chunks, device=self.device)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        return torch.from_numpy(perm).to(self.device)  # once per epoch, not per step

    def _indices_at(self, order: torch.Tensor, pos: int) -> torch.Tensor:
        start = pos + self.proc_rank * self.batch_size
        return order[start : start + self.batch_size]

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._order if self.epoch == 0 else self._order_for(0)
        return _xy(self.chunks[self._indices_at(order, 0)])

    def next_indices(self) -> torch.Tensor:
        """Advance one step; return this process's chunk ids (device tensor) into ``self.chunks``."""
        if self.pos + self.global_batch > self.n_chunks:
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._order_for(self.epoch)
        idx = self._indices_at(self._order, self.pos)
        self.pos += self.global_batch
        return idx

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _xy(self.chunks[self.next_indices()])

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if not 0 <= pos <= self.n_chunks or epoch < 0:
            raise ValueError(f"loader state {state} does not fit {self.n_chunks} chunks")
        self.epoch, self.pos, self._order = epoch, pos, self._order_for(epoch)


class ValStream:
    """Paper-protocol validation: each evaluation takes the next ``batches_per_eval`` chunks.

    The reference never wraps around; when the chunks run out this restarts
    from chunk 0 and counts it in ``restarts`` so the reuse is visible.
    """

    def __init__(self, val_tokens, block_size: int, device, *, batches_per_eval: int = 30):
        self.chunks = as_chunks(val_tokens, block_size, device)
        self.n = batches_per_eval
        if len(self.chunks) < self.n:
            raise DataError(f"validation set has {len(self.chunks)} chunks, fewer than {self.n}")
        self.pos, self.restarts = 0, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.n > len(self.chunks):
            self.pos, self.restarts = 0, self.restarts + 1
        self.pos += self.n
        return _xy(self.chunks[self.pos - self.n : self.pos])

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"pos": self.pos, "restarts": self.restarts}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.restarts = int(state["pos"]), int(state["restarts"])


def heldout_batches(val_tokens, block_size: int, batch_size: int, device) -> list:
    """Every chunk of the held-out set as (x, y) batches; the last may be smaller,
    so weight batch losses by their size when averaging."""
    chunks = as_chunks(val_tokens, block_size, device)
    return [_xy(chunks[i : i + batch_size]) for i in range(0, len(chunks), batch_size)]
