import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
import torch

from basis_train.data import corpus as data
from basis_train.data.corpus import Corpus, DataError, cached_corpus_path, load_corpus_dir, load_tokens
from basis_train.data.loaders import TrainLoader, ValStream, heldout_batches, make_splits, n_chunks
from basis_train.data.tokenizer import EOT, get_encoding


@pytest.fixture(scope="session")
def wiki_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("wiki-cache")
    return cache, load_tokens("wiki-offline", cache_dir=cache)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def no_tokenizing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setattr(data, "encode_documents", fail)


def synthetic_corpus(doc_lengths):
    # Every token of doc i is i, so splits can be checked document by document.
    tokens = np.concatenate([np.full(n, i, np.uint16) for i, n in enumerate(doc_lengths)])
    offsets = np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int64)
    return Corpus(tokens, offsets, "synthetic")


def ramp(n):
    return (np.arange(n) % 50000).astype(np.uint16)


def docs_of(corpus):
    enc = get_encoding()
    offs = corpus.doc_offsets
    return [enc.decode(corpus.tokens[offs[i]:offs[i + 1] - 1].tolist())
            for i in range(corpus.n_docs)]


# ------------------------------------------------------------ wiki corpus


def test_wiki_offline_corpus(wiki_cache):
    _, corpus = wiki_cache
    assert corpus.n_docs == 10_033
    assert 1_000_000 < len(corpus.tokens) < 1_200_000
    assert corpus.tokens.dtype == np.uint16 and corpus.doc_offsets.dtype == np.int64
    assert int((np.asarray(corpus.tokens) == EOT).sum()) == corpus.n_docs
    assert (corpus.tokens[corpus.doc_offsets[1:] - 1] == EOT).all()
    first = get_encoding().decode(corpus.tokens[: corpus.doc_offsets[1]].tolist())
    assert first.startswith("20th-century classical music\n\n")
    assert "CC BY-SA" in corpus.source


def test_wiki_cache_reused(wiki_cache, monkeypatch):
    cache, corpus = wiki_cache
    no_tokenizing(monkeypatch)
    again = load_tokens("wiki-offline", cache_dir=cache)
    assert np.array_equal(again.tokens, corpus.tokens)
    assert isinstance(again.tokens, np.memmap)
    # The config's max_docs default exceeds the corpus: it must hit the same entry.
    assert cached_corpus_path("wiki-offline", None, 50_000, cache) == again.cache_path
    assert cached_corpus_path(None, None, None, cache) == again.cache_path


def test_wiki_splits(wiki_cache):
    _, corpus = wiki_cache
    held = make_splits(corpus, "heldout", 64)
    assert held.info["heldout_every"] == 10
    assert held.info["n_val_docs"] == 1003 and held.info["n_train_docs"] == 9030
    assert held.info["n_val_tokens"] >= 100_000
    assert len(held.train_tokens) + len(held.val_tokens) == len(corpus.tokens)
    paper = make_splits(corpus, "paper", 64)
    assert paper.info["n_val_docs"] == 500 and len(paper.train_tokens) == len(corpus.tokens)
    assert 50_000 < paper.info["n_val_tokens"] < 60_000


def test_carried_cache_loads_without_sources(wiki_cache, tmp_path, monkeypatch):
    cache, corpus = wiki_cache
    carried = tmp_path / "elsewhere" / corpus.cache_path.name
    shutil.copytree(corpus.cache_path, carried)
    no_tokenizing(monkeypatch)
    monkeypatch.setattr(data, "_import_datasets", lambda: pytest.fail("needed datasets"))
    assert np.array_equal(load_corpus_dir(carried).tokens, corpus.tokens)
    other = tmp_path / "elsewhere-root"
    shutil.copytree(cache, other)
    assert load_tokens("wiki-offline", cache_dir=other).n_docs == corpus.n_docs


def test_wiki_max_docs(cache):
    corpus = load_tokens("wiki-offline", max_docs=25, cache_dir=cache)
    assert corpus.n_docs == 25
    assert docs_of(corpus)[0].startswith("20th-century classical music\n\n")


def test_wiki_corpus_builds_without_datasets(tmp_path, monkeypatch):
    # The GPU hosts have no `datasets`: the embedded corpus is a JSON file and must not need it.
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    corpus = load_tokens("wiki-offline", max_docs=3, cache_dir=tmp_path)
    assert corpus.n_docs == 3 and docs_of(corpus)[0].startswith("20th-century classical music\n\n")


# ------------------------------------------------------------ local files


def test_txt_files_one_document_each(tmp_path, cache, monkeypatch):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.txt").write_text("first file\nsecond line\n\nthird\n")
    corpus = load_tokens(data_files=str(tmp_path / "*.txt"), cache_dir=cache)
    assert docs_of(corpus) == ["first file\nsecond line\n\nthird\n", "second file\n"]
    assert corpus.cache_path.name.startswith("files-")
    no_tokenizing(monkeypatch)
    assert load_tokens("files", str(tmp_path / "*.txt"), cache_dir=cache).n_docs == 2


def test_changed_file_invalidates_cache(tmp_path, cache):
    path = tmp_path / "a.txt"
    path.write_text("one")
    before = cached_corpus_path(None, str(path), None, cache)
    path.write_text("one two three")
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert cached_corpus_path(None, str(path), None, cache) != before
    assert docs_of(load_tokens(None, str(path), None, cache)) == ["one two three"]


def test_jsonl_and_json(tmp_path, cache):
    lines = [{"text": "alpha doc", "id": 1}, {"text": "beta doc", "id": 2}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert docs_of(load_tokens(data_files=str(tmp_path / "*.jsonl"), cache_dir=cache)) == [
        "alpha doc", "beta doc"]
    (tmp_path / "arr.json").write_text(json.dumps([{"text": "gamma"}, {"text": "delta"}]))
    corpus = load_tokens(data_files=str(tmp_path / "arr.json"), cache_dir=cache)
    assert docs_of(corpus) == ["gamma", "delta"]


def test_parquet(tmp_path, cache):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two", "three"]}), tmp_path / "p.parquet")
    corpus = load_tokens(data_files=str(tmp_path / "*.parquet"), max_docs=2, cache_dir=cache)
    assert docs_of(corpus) == ["one", "two"]


def test_cache_write_leaves_no_temp_dirs(tmp_path, cache):
    (tmp_path / "a.txt").write_text("x y z")
    load_tokens(data_files=str(tmp_path / "a.txt"), cache_dir=cache)
    names = [p.name for p in (cache / "tokens").iterdir()]
    assert len(names) == 1 and not names[0].startswith(".")
    assert sorted(p.name for p in (cache / "tokens" / names[0]).iterdir()) == [
        "meta.json", "offsets.npy", "tokens.npy"]


@pytest.mark.parametrize(
    "files, content, match",
    [
        ({}, None, "no files match"),
        ({"a.txt": b"x", "b.jsonl": b'{"text": "y"}\n'}, None, "mixes extensions"),
        ({"a.jsonl": b'{"text": "y"}\n', "b.parquet": b"PAR1"}, None, "mixes extensions"),
        ({"empty.txt": b""}, None, "no documents"),
        ({"blank.txt": b"  \n\n"}, None, "no documents"),
        ({"zbad.txt": b"\xff\xfe\x00bad"}, None, "1 not-utf8"),
        ({"broken.jsonl": b'{"text": "a"}\n{"text": \n'}, None, "broken.jsonl"),
        ({"notext.jsonl": b'{"body": "a"}\n'}, None, "no 'text' field"),
    ],
)
def test_bad_local_files(tmp_path, cache, files, content, match):
    for name, body in files.items():
        (tmp_path / name).write_bytes(body)
    with pytest.raises(DataError, match=match) as err:
        load_tokens(data_files=str(tmp_path / "*"), cache_dir=cache)
    assert "\n" not in str(err.value)


def test_bad_arguments(tmp_path, cache):
    with pytest.raises(DataError, match="unknown dataset"):
        load_tokens("imagenet", cache_dir=cache)
    with pytest.raises(DataError, match="needs --data-files"):
        load_tokens("files", cache_dir=cache)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match="cannot be combined"):
        load_tokens("wiki-offline", str(tmp_path / "a.txt"), cache_dir=cache)


# ------------------------------------------------------------ fineweb


def test_fineweb_unreachable_is_one_line_error(cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="cannot reach the Hugging Face hub") as err:
        load_tokens("fineweb-edu", cache_dir=cache)
    assert "--dataset wiki-offline" in str(err.value) and "\n" not in str(err.value)


def test_fineweb_respects_hf_hub_offline(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: pytest.fail("probed"))
    with pytest.raises(DataError, match="cannot reach"):
        load_tokens("fineweb-edu", cache_dir=cache)


def test_hub_probe_is_bounded():
    start = time.monotonic()
    assert data._hub_reachable(timeout=1.0) in (True, False)
    assert time.monotonic() - start < 3.0


def test_fineweb_cache_key_defaults_max_docs(cache):
    assert cached_corpus_path("fineweb-edu", None, None, cache) == cached_corpus_path(
        "fineweb-edu", None, 50_000, cache)


# ---------------------------------------------------------------- splits


def test_heldout_halves_k_and_is_disjoint():
    corpus = synthetic_corpus([100] * 40)
    split = make_splits(corpus, "heldout", 8, heldout_every=20, heldout_min_tokens=500)
    # k=20 -> 200 val tokens, k=10 -> 400, k=5 -> 800 >= 500.
    assert split.info["heldout_every"] == 5 and split.info["heldout_every_requested"] == 20
    val_docs, train_docs = set(split.val_tokens.tolist()), set(split.train_tokens.tolist())
    assert val_docs == {4, 9, 14, 19, 24, 29, 34, 39}
    assert not val_docs & train_docs and len(val_docs | train_docs) == 40
    assert split.info["n_val_tokens"] == 800 and split.info["n_train_docs"] == 32


def test_heldout_stops_at_two():
    split = make_splits(synthetic_corpus([10] * 7), "heldout", 4, heldout_min_tokens=10**9)
    assert split.info["heldout_every"] == 2
    assert set(split.val_tokens.tolist()) == {1, 3, 5}


def test_paper_val_overlaps_train():
    corpus = synthetic_corpus([30] * 10)
    split = make_splits(corpus, "paper", 4, paper_val_docs=3)
    assert np.array_equal(split.train_tokens, corpus.tokens)
    assert np.array_equal(split.val_tokens, corpus.tokens[:90])
    assert split.info["val_overlaps_train"] and split.info["n_val_docs"] == 3


def test_split_errors():
    corpus = synthetic_corpus([3, 3])
    with pytest.raises(DataError, match="val protocol"):
        make_splits(corpus, "random", 4)
    with pytest.raises(DataError, match="fewer than block_size"):
        make_splits(corpus, "heldout", 64)


# -------------------------------------------------------------- loaders


def chunk(tokens, i, block):
    return torch.from_numpy(tokens[i * (block + 1):(i + 1) * (block + 1)].astype(np.int64))


def test_n_chunks_drops_tail():
    assert n_chunks(ramp(50), 4) == 10 and n_chunks(ramp(54), 4) == 10
    assert n_chunks(ramp(55), 4) == 11 and n_chunks(ramp(4), 4) == 0


def test_train_loader_order_and_restart():
    tokens, block, b = ramp(10 * 9 + 5), 8, 3  # 10 chunks and a dropped partial one
    loader = TrainLoader(tokens, b, block, "cpu")
    assert loader.n_chunks == 10 and loader.steps_per_epoch == 3

    def check(batch, first_chunk):
        x, y = batch
        assert x.shape == y.shape == (b, block) and x.dtype == y.dtype == torch.int64
        for r in range(b):
            c = chunk(tokens, first_chunk + r, block)
            assert torch.equal(x[r], c[:-1]) and torch.equal(y[r], c[1:])

    check(loader.first_batch(), 0)
    check(loader.first_batch(), 0)  # does not advance
    assert loader.state_dict() == {"epoch": 0, "pos": 3}
    check(loader.next(), 3)
    check(next(loader), 6)
    assert loader.state_dict() == {"epoch": 0, "pos": 9}
    check(loader.next(), 0)  # chunk 9 is dropped and the epoch restarts
    assert loader.state_dict() == {"epoch": 1, "pos": 3}
    check(loader.first_batch(), 0)


def test_train_loader_rejects_tiny_data():
    with pytest.raises(DataError, match="fewer than one global batch"):
        TrainLoader(ramp(20), 2, 8, "cpu", world_size=2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_train_loader_resume(shuffle):
    tokens = ramp(37 * 17)
    a = TrainLoader(tokens, 4, 16, "cpu", shuffle=shuffle, seed=3)
    for _ in range(11):
        a.next()
    state = a.state_dict()
    b = TrainLoader(tokens, 4, 16, "cpu", shuffle=shuffle, seed=3)
    b.load_state_dict(state)
    for _ in range(20):  # crosses several epoch boundaries
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_split_the_global_batch(shuffle):
    tokens, b = ramp(41 * 9), 3
    whole = TrainLoader(tokens, 2 * b, 8, "cpu", shuffle=shuffle, seed=1)
    ranks = [TrainLoader(tokens, b, 8, "cpu", shuffle=shuffle, seed=1, proc_rank=r, world_size=2)
             for r in range(2)]
    batches = [(whole.first_batch(), [r.first_batch() for r in ranks])]
    batches += [(whole.next(), [r.next() for r in ranks]) for _ in range(15)]
    for (x, y), parts in batches:
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not set(parts[0][0][:, 0].tolist()) & set(parts[1][0][:, 0].tolist())
    assert whole.state_dict() == ranks[0].state_dict() == ranks[1].state_dict()


def test_shuffle_permutes_each_epoch_deterministically():
    tokens = ramp(12 * 5)  # 12 chunks of 5 tokens, first token identifies the chunk
    loader = TrainLoader(tokens, 4, 4, "cpu", shuffle=True, seed=7)
    first = [loader.first_batch()] + [loader.next() for _ in range(2)]
    second = [loader.next() for _ in range(3)]
    epochs = [torch.cat([x[:, 0] for x, _ in e]).tolist() for e in (first, second)]
    assert all(sorted(e) == list(range(0, 60, 5)) for e in epochs)
    assert epochs[0] != epochs[1]
    again = TrainLoader(tokens, 4, 4, "cpu", shuffle=True, seed=7)
    assert again.first_batch()[0][:, 0].tolist() == epochs[0][:4]


def test_val_stream_restarts_and_resumes():
    tokens, block = ramp(10 * 7), 6
    stream = ValStream(tokens, block, "cpu", batches_per_eval=3)
    firsts = [stream.next()[0][:, 0].tolist() for _ in range(3)]
    assert firsts == [[0, 7, 14], [21, 28, 35], [42, 49, 56]] and stream.restarts == 0
    x, y = stream.next()
    assert x[:, 0].tolist() == [0, 7, 14] and stream.restarts == 1
    assert x.shape == y.shape == (3, block) and torch.equal(x[:, 1:], y[:, :-1])
    resumed = ValStream(tokens, block, "cpu", batches_per_eval=3)
    resumed.load_state_dict(stream.state_dict())
    assert torch.equal(resumed.next()[0], stream.next()[0]) and resumed.restarts == 1


def test_heldout_batches_cover_everything():
    tokens, block = ramp(11 * 9 + 4), 8
    batches = heldout_batches(tokens, block, 4, "cpu")
    assert [len(x) for x, _ in batches] == [4, 4, 3]
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    for i in range(11):
        c = chunk(tokens, i, block)
        assert torch.equal(xs[i], c[:-1]) and torch.equal(ys[i], c[1:])


def test_fineweb_streams_the_papers_split_in_order(cache, monkeypatch):
    # No hub here: stand in for `datasets.load_dataset` and check what the real call asks for.
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return ({"text": f"document {i}"} for i in range(1000))

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_tokens("fineweb-edu", max_docs=3, cache_dir=cache)
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]
    enc = get_encoding()
    expected = [t for i in range(3) for t in [*enc.encode_ordinary(f"document {i}"), EOT]]
    assert corpus.tokens.tolist() == expected and corpus.n_docs == 3
