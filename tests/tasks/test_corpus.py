"""Tests of growmem.tasks.corpus: splits, sources, token blocks, resumption, sharding, bytes."""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
import torch

from growmem.tasks.corpus import (
    SPLITS,
    TokenBlocks,
    load_corpus,
    split_of,
    stdlib_corpus,
    text_files,
)
from growmem.tasks.tokenizers import BPETokenizer, ByteTokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def stdlib_splits():
    return {split: stdlib_corpus(split) for split in SPLITS}


def test_split_of_is_a_stable_hash_rule():
    assert split_of("json/decoder.py") == split_of(Path("json") / "decoder.py")
    counts = Counter(split_of(f"dir/file_{i}.txt") for i in range(4000))
    assert set(counts) == set(SPLITS)
    assert 0.87 < counts["train"] / 4000 < 0.93 and 0.035 < counts["test"] / 4000 < 0.065


def test_split_of_bucket_bounds():
    """bucket = first 8 hex digits of the path's sha256 mod 100: 0-89 train, 90-94 val, 95-99
    test (the rule of the module docstring, at each bound)."""
    expected = {0: "train", 89: "train", 90: "val", 94: "val", 95: "test", 99: "test"}
    names = {}
    for i in range(10_000):
        bucket = int(hashlib.sha256(f"f{i}.txt".encode()).hexdigest()[:8], 16) % 100
        names.setdefault(bucket, f"f{i}.txt")
    assert {bucket: split_of(names[bucket]) for bucket in expected} == expected


def test_stdlib_splits_disjoint_covering_and_sized(stdlib_splits):
    everything = stdlib_corpus()
    parts = [set(files) for files in stdlib_splits.values()]
    assert sum(map(len, parts)) == len(everything) == len(set().union(*parts))
    for split, files in stdlib_splits.items():
        assert files == sorted(files, key=lambda f: f.relative_to(STDLIB).as_posix())
        assert all(split_of(f.relative_to(STDLIB)) == split for f in files)
        assert files == stdlib_corpus(split)  # deterministic
        size = sum(f.stat().st_size for f in files)
        assert size > (5_000_000 if split == "train" else 200_000)
    assert STDLIB / "json" / "decoder.py" in everything


def test_stdlib_excludes_tests_and_site_packages():
    for f in stdlib_corpus():
        parts = set(f.relative_to(STDLIB).parts[:-1])
        assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}
        assert f.suffix == ".py"
    if (STDLIB / "test").is_dir():  # CPython ships its test suite next to the stdlib
        assert any((STDLIB / "test").rglob("test_*.py"))


def make_tree(root: Path) -> None:
    for i in range(60):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"f{i}.txt").write_text(f"document {i}\n")
    (root / "notes.md").write_text("markdown")
    (root / "data.csv").write_text("a,b")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("no")


def test_text_files_folder_split(tmp_path):
    make_tree(tmp_path)
    everything = text_files(tmp_path)
    assert len(everything) == 61  # 60 .txt + notes.md; csv and hidden skipped
    splits = {split: text_files(tmp_path, split) for split in SPLITS}
    assert sorted(chain.from_iterable(splits.values())) == sorted(everything)
    for split, files in splits.items():
        assert all(split_of(f.relative_to(tmp_path)) == split for f in files)
    assert len(text_files(tmp_path, extensions=(".csv",))) == 1


def test_text_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        text_files(tmp_path / "missing_dir")
    single = tmp_path / "one.txt"
    single.write_text("hello")
    assert text_files(single) == [single]
    with pytest.raises(ValueError, match="split"):
        text_files(single, "train")
    with pytest.raises(ValueError, match="split"):
        text_files(tmp_path, "validation")


def test_load_corpus_sources(tmp_path):
    make_tree(tmp_path)
    docs = list(load_corpus(str(tmp_path), "val"))
    assert docs == [f.read_text() for f in text_files(tmp_path, "val")]
    assert list(load_corpus(str(tmp_path / "notes.md"), None)) == ["markdown"]
    stdlib_val = list(load_corpus("stdlib", "val"))
    assert len(stdlib_val) == len(stdlib_corpus("val")) and all(
        isinstance(d, str) for d in stdlib_val
    )
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(tmp_path / "nope"), None)
    with pytest.raises(ValueError, match="split"):
        load_corpus("stdlib", "dev")
    with pytest.raises(ValueError, match="split"):
        load_corpus("hf:wikitext", None)


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"pip install 'growmem\[datasets\]'"):
        list(load_corpus("hf:wikitext:wikitext-2-raw-v1", "val"))


# Token blocks --------------------------------------------------------------------------------


def position_blocks(num_tokens: int, seq_len: int) -> TokenBlocks:
    """Blocks over the stream 0, 1, 2, ...: block i starts with token i * (seq_len - 1)."""
    return TokenBlocks(np.arange(num_tokens), np.ones(num_tokens, dtype=np.int64), seq_len)


def block_ids(batch, seq_len: int) -> list[int]:
    return (batch["input_ids"][:, 0] // (seq_len - 1)).tolist()


def test_blocks_from_documents_layout():
    tok = ByteTokenizer()
    docs = ["abcdef", "ghij", "k"]
    blocks = TokenBlocks.from_documents(docs, tok, seq_len=4)
    stream = [*b"abcdef", 258, *b"ghij", 258, *b"k", 258]  # 14 tokens
    assert blocks.tokens.tolist() == stream
    assert blocks.num_blocks == (14 - 1) // 3 == 4
    batch = next(blocks.eval_batches(batch_size=10))
    expected = [stream[3 * i : 3 * i + 4] for i in range(4)]  # consecutive blocks share a token
    assert batch["input_ids"].tolist() == expected
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    # targets are tokens 1..3 of each block; the eos separators count 0 bytes
    assert batch["num_bytes"].tolist() == [3, 2, 3, 2]


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_num_bytes_matches_text_of_targets(tokenizer):
    docs = [
        "Return the number of items. Ünïcödé and emoji 😀 too.",
        "Read and return up to n bytes.",
    ] * 20
    tok = ByteTokenizer() if tokenizer == "byte" else BPETokenizer.train(docs, vocab_size=320)
    blocks = TokenBlocks.from_documents(docs, tok, seq_len=16)
    total = 0
    for batch in blocks.eval_batches(batch_size=7):
        for row, n in zip(batch["input_ids"].tolist(), batch["num_bytes"].tolist(), strict=True):
            assert n == sum(tok.token_byte_lengths()[t] for t in row[1:])
            total += n
    if tokenizer == "byte":
        covered = blocks.tokens[1 : 1 + blocks.num_blocks * 15]  # every target, once
        assert total == len(tok.decode(covered.tolist()).encode("utf-8"))
    corpus_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert corpus_bytes - 2 * 16 * 4 < total <= corpus_bytes  # minus the first and tail tokens


def test_batch_at_resumes_exactly():
    seq_len, num_tokens = 5, 4 * 7 + 1  # 7 blocks; batches of 3 cross epoch boundaries
    run = position_blocks(num_tokens, seq_len)
    uninterrupted = [run.batch_at(step, 3, seed=5) for step in range(10)]
    resumed = position_blocks(num_tokens, seq_len)  # a fresh process resuming at step 6
    for step in range(6, 10):
        batch = resumed.batch_at(step, 3, seed=5)
        for name in ("input_ids", "labels", "num_bytes"):
            assert torch.equal(batch[name], uninterrupted[step][name])
    order = list(chain.from_iterable(block_ids(b, seq_len) for b in uninterrupted))
    for epoch in range(30 // 7):
        assert sorted(order[7 * epoch : 7 * epoch + 7]) == list(range(7))  # each block once
    assert order[:7] != order[7:14]  # a new order every epoch
    other_seed = [i for s in range(3) for i in block_ids(run.batch_at(s, 3, seed=6), seq_len)]
    assert other_seed != order[:9]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_shard_the_global_batch(world_size):
    seq_len = 4
    blocks = position_blocks(3 * 50 + 1, seq_len)  # 50 blocks
    per_rank = 4
    for step in range(8):
        shards = [
            blocks.batch_at(step, per_rank, seed=1, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        whole = blocks.batch_at(step, per_rank * world_size, seed=1)
        assert torch.equal(torch.cat([s["input_ids"] for s in shards]), whole["input_ids"])
        ids = [set(block_ids(s, seq_len)) for s in shards]
        assert all(len(i) == per_rank for i in ids)
        if (step + 1) * per_rank * world_size <= 50:  # within the first epoch: all distinct
            assert len(set().union(*ids)) == per_rank * world_size


def test_eval_batches_cover_every_block_once_across_ranks():
    blocks = position_blocks(3 * 23 + 1, seq_len=4)  # 23 blocks
    seen = []
    for rank in range(3):
        batches = list(blocks.eval_batches(5, rank=rank, world_size=3))
        assert all(len(b["input_ids"]) <= 5 for b in batches)
        seen += chain.from_iterable(block_ids(b, 4) for b in batches)
    assert sorted(seen) == list(range(23))


def test_block_errors():
    blocks = position_blocks(20, seq_len=4)
    for kwargs, name in [
        (dict(step=-1), "step"),
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-2), "seed"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(world_size=0), "world_size"),
    ]:
        args = {"step": 0, "batch_size": 2, "seed": 0, **kwargs}
        with pytest.raises(ValueError, match=name):
            blocks.batch_at(args.pop("step"), args.pop("batch_size"), **args)
    with pytest.raises(ValueError, match="batch_size"):
        next(blocks.eval_batches(0))
    with pytest.raises(ValueError, match="rank"):
        next(blocks.eval_batches(2, rank=-1))
    with pytest.raises(ValueError, match="seq_len"):
        position_blocks(20, seq_len=1)
    with pytest.raises(ValueError, match="tokens"):
        position_blocks(3, seq_len=4)


def test_token_cache(tmp_path, monkeypatch):
    tok = ByteTokenizer()
    docs = ["first document", "second one"]
    built = TokenBlocks.from_documents(docs, tok, seq_len=4, cache_dir=tmp_path)
    (cached_file,) = tmp_path.glob("*.npy")
    assert tok.fingerprint() in cached_file.name
    monkeypatch.setattr(ByteTokenizer, "encode_batch", lambda self, texts: 1 / 0)
    loaded = TokenBlocks.from_documents(docs, tok, seq_len=4, cache_dir=tmp_path)
    assert np.array_equal(np.asarray(loaded.tokens), built.tokens)
    with pytest.raises(ZeroDivisionError):  # other content: a cache miss tokenizes again
        TokenBlocks.from_documents([*docs, "third"], tok, seq_len=4, cache_dir=tmp_path)
    monkeypatch.undo()
    # the same text cut into other documents is another stream (eos between documents)
    TokenBlocks.from_documents(["ab", "c"], tok, seq_len=2, cache_dir=tmp_path)
    split_elsewhere = TokenBlocks.from_documents(["a", "bc"], tok, seq_len=2, cache_dir=tmp_path)
    assert np.asarray(split_elsewhere.tokens).tolist() == [97, tok.eos_id, 98, 99, tok.eos_id]
    assert not list(tmp_path.glob("*.tmp"))


def test_stdlib_val_blocks_bits_per_byte_bookkeeping():
    tok = ByteTokenizer()
    docs = list(load_corpus("stdlib", "val"))
    blocks = TokenBlocks.from_documents(docs, tok, seq_len=1024)
    total = sum(int(b["num_bytes"].sum()) for b in blocks.eval_batches(64))
    corpus_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert corpus_bytes - 1024 - len(docs) < total < corpus_bytes
    assert blocks.num_blocks == (len(blocks.tokens) - 1) // 1023
