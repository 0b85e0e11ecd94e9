"""Local UTF-8 text files as documents: read, deduplicate, split and tokenize on all cores.

How files become documents (README "Data"): with SPLIT_BELOW_FILES or more files, each file is
one document, so a held-out split holds out whole files. With fewer files (a user's first try is
often one big .txt), each file is cut at blank lines into blocks of at least BLOCK_CHARS
characters, so that held-out validation has documents to hold out. Files with identical bytes
are kept once (first in sorted path order); unreadable, non-UTF-8 and NUL-containing (binary)
files are skipped and counted, never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
from pathlib import Path

import numpy as np

from basis_train.data.tokenizer import EOT, get_encoding

SPLIT_BELOW_FILES = 20
BLOCK_CHARS = 4000
# A block may not grow past this many characters (text without blank lines is cut anyway).
_MAX_BLOCK = 4 * BLOCK_CHARS
_PARAGRAPH_END = re.compile(r"\n[ \t\r\f\v]*\n")
READER_ID = f"text-v1-split{SPLIT_BELOW_FILES}-block{BLOCK_CHARS}"
log = logging.getLogger("basis_train.data")


def split_blocks(text: str) -> list[str]:
    """Cut text at blank lines into blocks of >= BLOCK_CHARS characters; joined they give back text."""
    blocks, start = [], 0
    cuts = [m.end() for m in _PARAGRAPH_END.finditer(text)] + [len(text)]
    for cut in cuts:
        while cut - start > _MAX_BLOCK:  # no blank line for a long stretch: cut blindly
            blocks.append(text[start : start + BLOCK_CHARS])
            start += BLOCK_CHARS
        if cut - start >= BLOCK_CHARS or cut == len(text):
            if cut > start:
                blocks.append(text[start:cut])
            start = cut
    return blocks


def _encode_file(job: tuple[str, bool]):
    """(status, digest, n_bytes, tokens, doc lengths) of one file; runs in a worker process."""
    path, split = job
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return "unreadable", None, 0, None, None
    digest = hashlib.sha256(raw).digest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", digest, len(raw), None, None
    if "\x00" in text:
        return "binary", digest, len(raw), None, None
    docs = [d for d in (split_blocks(text) if split else [text]) if d.strip()]
    ids = get_encoding().encode_ordinary_batch(docs, num_threads=1) if docs else []
    for doc in ids:
        doc.append(EOT)
    lengths = np.array([len(d) for d in ids], dtype=np.int64)
    tokens = np.fromiter((t for d in ids for t in d), np.uint16, count=int(lengths.sum()))
    return "ok", digest, len(raw), tokens, lengths


def _results(jobs: list[tuple[str, bool]], workers: int):
    if workers <= 1 or len(jobs) < 2:
        yield from map(_encode_file, jobs)
        return
    # fork: a spawned worker would re-import the parent's __main__ (the CLI, hence torch). The
    # workers only run tiktoken and numpy, never CUDA, so forking a CUDA-using parent is safe.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(_encode_file, jobs, chunksize=8)  # ordered: deterministic corpus


def tokenize_files(files: list[Path], max_docs: int | None = None, workers: int | None = None):
    """(uint16 tokens, int64 offsets, stats) of the text in ``files`` (sorted paths)."""
    from tqdm.auto import tqdm

    split = len(files) < SPLIT_BELOW_FILES
    workers = workers or int(os.environ.get("BASIS_TRAIN_TOKENIZE_WORKERS", 0)) or os.cpu_count() or 1
    stats = {"n_files_matched": len(files), "n_files_used": 0, "n_duplicates": 0, "n_unreadable": 0,
             "n_not_utf8": 0, "n_binary": 0, "n_empty": 0, "bytes_used": 0,
             "documents": f"blocks of >= {BLOCK_CHARS} chars cut at blank lines" if split else "one per file"}
    seen, parts, lengths = set(), [], []
    jobs = [(str(p), split) for p in files]
    with tqdm(total=len(jobs), unit="file", desc=f"tokenizing ({workers} procs)", disable=None) as bar:
        for status, digest, n_bytes, tokens, lens in _results(jobs, workers):
            bar.update(1)
            if status != "ok":
                stats[f"n_{status}"] += 1
            elif digest in seen:
                stats["n_duplicates"] += 1
            elif not len(lens):
                stats["n_empty"] += 1
            elif max_docs is None or len(lengths) < max_docs:
                seen.add(digest)
                keep = len(lens) if max_docs is None else min(len(lens), max_docs - len(lengths))
                parts.append(tokens[: int(lens[:keep].sum())])
                lengths.extend(lens[:keep].tolist())
                stats["n_files_used"] += 1
                stats["bytes_used"] += n_bytes
    skipped = stats["n_unreadable"] + stats["n_not_utf8"] + stats["n_binary"]
    if skipped or stats["n_duplicates"]:
        log.warning("text files: skipped %d unreadable, %d non-UTF-8, %d binary; dropped %d duplicates",
                    stats["n_unreadable"], stats["n_not_utf8"], stats["n_binary"], stats["n_duplicates"])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    stats.update(n_docs=len(lengths), n_tokens=int(len(tokens)))
    return tokens, offsets, stats
