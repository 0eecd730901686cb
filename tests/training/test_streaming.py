"""Corpora that scale: ``hf:`` datasets streamed in order with an exact resume cursor
(offline, on a local dataset folder), and pre-tokenized ``.bin``/``.npy`` token files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from growmem.cli import main
from growmem.tasks import ByteTokenizer, TokenBlocks
from growmem.tasks.corpus import hf_records, load_token_file
from growmem.tasks.streaming import DocumentTokens, StreamedBlocks
from growmem.train import train
from growmem.training.checkpoint import latest_checkpoint, load_trainer_state, read_run_config
from growmem.training.config import LMTask
from growmem.training.data import lm_data
from growmem.training.rundir import check_resume

from .common import loss_lines, text_corpus, tiny_config

EOS = ByteTokenizer.eos_id


def assert_same_weights_of(a, b) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def write_dataset(folder, splits: dict[str, list[str]], field: str = "text"):
    """A local dataset folder that ``datasets.load_dataset(folder)`` reads: one
    <split>.jsonl per split."""
    folder.mkdir(parents=True)
    for split, texts in splits.items():
        lines = [json.dumps({field: text, "id": i}) for i, text in enumerate(texts)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def documents(n: int, seed: int) -> list[str]:
    """Texts of 0 to 60 characters (some empty: they give no tokens, not even an eos)."""
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdef ") for _ in range(rng.randrange(0, 60))) for _ in range(n)]


def byte_stream(texts: list[str]) -> np.ndarray:
    """The token stream of texts: each non-empty one's bytes, then eos."""
    ids = [t for text in texts if text for t in [*text.encode(), EOS]]
    return np.asarray(ids, dtype=np.int64)


def in_order(texts: list[str], seq_len: int, num_blocks: int) -> np.ndarray:
    """[num_blocks, T] the stream's blocks in order, the texts repeated epoch after epoch."""
    stream = byte_stream(texts)
    epochs = 1 + num_blocks * seq_len // len(stream)
    blocks = TokenBlocks(np.tile(stream, epochs), np.ones(EOS + 1), seq_len)
    return np.stack(
        [blocks._gather(np.array([i]))["input_ids"][0].numpy() for i in range(num_blocks)]
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    texts = {"train": documents(40, 0), "validation": documents(10, 1), "test": documents(5, 2)}
    return write_dataset(folder, texts), texts


def streamed(folder, split="train", num_workers=0, seq_len=16) -> StreamedBlocks:
    task = LMTask(corpus=f"hf:{folder}", seq_len=seq_len, num_workers=num_workers)
    data = lm_data(task, folder.parent / "run")
    assert isinstance(data.train, StreamedBlocks)
    return data.train


def batches(blocks: StreamedBlocks, steps: range, batch_size: int = 3, **kw) -> list[torch.Tensor]:
    return [blocks.batch_at(s, batch_size, seed=0, **kw)["input_ids"] for s in steps]


def test_streamed_blocks_are_the_streams_blocks_in_order_epoch_after_epoch(dataset):
    folder, texts = dataset
    # 40 documents of ~30 bytes make ~1200 tokens: 40 steps of 3 blocks of 15 wrap an epoch
    got = torch.cat(batches(streamed(folder), range(40)))
    assert torch.equal(got, torch.from_numpy(in_order(texts["train"], 16, 120)))


def test_evaluation_blocks_are_the_first_of_the_eval_split(dataset):
    folder, texts = dataset
    task = LMTask(corpus=f"hf:{folder}", seq_len=16, eval_blocks=4, eval_split="test")
    evaluation = lm_data(task, folder.parent / "run").lm_eval
    assert np.array_equal(np.asarray(evaluation.tokens), byte_stream(texts["test"])[: 4 * 15 + 1])
    every = LMTask(corpus=f"hf:{folder}", seq_len=16, eval_blocks=0)  # "val": "validation"
    tokens = lm_data(every, folder.parent / "run").lm_eval.tokens
    assert np.array_equal(np.asarray(tokens), byte_stream(texts["validation"]))


def test_resume_cursor_continues_at_the_same_token(dataset):
    folder, _ = dataset
    whole = batches(streamed(folder), range(30))
    for k in (1, 7, 13, 29):  # inside a document, across records and past an epoch
        first = streamed(folder)
        batches(first, range(k))
        state = first.state_dict()
        resumed = streamed(folder)
        resumed.load_state_dict(state)
        assert state["step"] == k
        assert all(map(torch.equal, batches(resumed, range(k, 30)), whole[k:])), k


def test_worker_processes_and_ranks_give_the_same_blocks(dataset):
    folder, _ = dataset
    whole = batches(streamed(folder), range(12), batch_size=4)

    def records(start: int):
        return hf_records(str(folder), "train", start=start)

    # windows of 2 x 3 documents: the pool encodes the next while one is read
    pooled = DocumentTokens(records, ByteTokenizer(), num_workers=1, chunk=3)
    in_pool = StreamedBlocks(pooled, [1] * EOS + [0], 16)
    assert all(map(torch.equal, batches(in_pool, range(12), 4), whole))
    ranks = [batches(streamed(folder), range(12), 2, rank=r, world_size=2) for r in (0, 1)]
    assert all(torch.equal(torch.cat(pair), w) for *pair, w in zip(*ranks, whole, strict=True))


def test_streamed_batches_are_read_in_order(dataset):
    blocks = streamed(dataset[0])
    with pytest.raises(ValueError, match="read in order, the next step is 0, got 3"):
        blocks.batch_at(3, 2, seed=0)
    with pytest.raises(ValueError, match="state: expected integers"):
        blocks.load_state_dict({"step": 1})


def test_text_field_and_split_names_are_settings(tmp_path):
    texts = documents(12, 3)
    folder = write_dataset(
        tmp_path / "d", {"validation": texts, "test": texts[:4]}, field="content"
    )
    task = LMTask(
        corpus=f"hf:{folder}",
        seq_len=8,
        text_field="content",
        train_split="validation",
        eval_split="test",
    )
    data = lm_data(task, tmp_path / "run")
    assert torch.equal(
        data.train.batch_at(0, 2, seed=0)["input_ids"][0],
        torch.from_numpy(in_order(texts, 8, 1)[0]),
    )
    assert np.array_equal(np.asarray(data.lm_eval.tokens), byte_stream(texts[:4])[: 64 * 7 + 1])
    with pytest.raises(ValueError, match="text_field: 'text' is not a column"):
        lm_data(LMTask(corpus=f"hf:{folder}", train_split="validation"), tmp_path)


def test_a_streamed_run_resumes_exactly(tmp_path):
    texts = documents(60, 4)
    folder = write_dataset(tmp_path / "d", {"train": texts, "validation": texts[:8]})
    task = {"name": "lm", "corpus": f"hf:{folder}", "seq_len": 16, "eval_blocks": 2}
    settings = {"steps": 6, "checkpoint_every": 3}
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, task=task, train=settings))
    config_b = tiny_config(b, task=task, train=settings)
    assert train(config_b, stop_after=4) is None  # a checkpoint at 3 and one at 4
    cursor = load_trainer_state(latest_checkpoint(b))["data"]
    assert cursor["step"] == 4 and cursor["offset"] > 0  # mid-document
    # the number of tokenizing processes does not change the data: a resume may change it
    checkpoint = latest_checkpoint(b)
    more_workers = tiny_config(b, task={**task, "num_workers": 3}, train=settings)
    assert check_resume(checkpoint, read_run_config(checkpoint), more_workers, 1) == []
    train(config_b, resume=True)
    assert [m["loss"] for m in loss_lines(b)] == [m["loss"] for m in loss_lines(a)]
    assert_same_weights_of(a / "model", b / "model")


# ---------------------------------------------------------------- token files


def test_token_files_give_the_blocks_of_the_same_tokens_as_text(tmp_path):
    corpus = text_corpus(tmp_path / "corpus", num_train=3, num_val=1, chars=300)
    text = lm_data(LMTask(corpus=str(corpus), seq_len=16), tmp_path / "run")
    train_ids, val_ids = np.asarray(text.train.tokens), np.asarray(text.lm_eval.tokens)
    train_ids.astype(np.uint16).tofile(tmp_path / "train.bin")
    val_ids.astype(np.uint16).tofile(tmp_path / "val.bin")
    np.save(tmp_path / "train.npy", train_ids.astype(np.int32))
    for corpus_file in ("train.bin", "train.npy"):
        task = LMTask(
            corpus=str(tmp_path / corpus_file), eval_corpus=str(tmp_path / "val.bin"), seq_len=16
        )
        tokens = lm_data(task, tmp_path / "run")
        assert isinstance(tokens.train.tokens, np.memmap | np.ndarray)
        for step in range(3):
            a = tokens.train.batch_at(step, 4, seed=1)
            b = text.train.batch_at(step, 4, seed=1)
            assert all(torch.equal(a[k], b[k]) for k in a), (corpus_file, step)
        assert np.array_equal(np.asarray(tokens.lm_eval.tokens), val_ids)
    assert isinstance(load_token_file(tmp_path / "train.bin"), np.memmap)


def test_a_token_file_run_trains_and_evaluates(tmp_path, capsys):
    (np.arange(2000) % 97).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    corpus = str(tmp_path / "tokens.bin")
    task = {"name": "lm", "corpus": corpus, "seq_len": 16, "eval_blocks": 2, "eval_fraction": 0.1}
    train(tiny_config(tmp_path / "run", task=task, train={"steps": 2}))
    assert main(["eval", str(tmp_path / "run" / "model"), "--max-blocks", "3"]) == 0
    assert '"tokens": 45' in capsys.readouterr().out  # 3 blocks of 15 targets


def test_token_file_holds_out_its_tail_for_evaluation(tmp_path):
    ids = np.arange(1000) % 256
    ids.astype(np.uint32).tofile(tmp_path / "tokens.bin")
    task = LMTask(
        corpus=str(tmp_path / "tokens.bin"), token_dtype="uint32", eval_fraction=0.1, seq_len=8
    )
    data = lm_data(task, tmp_path / "run")
    assert np.array_equal(np.asarray(data.train.tokens), ids[:900])
    assert np.array_equal(np.asarray(data.lm_eval.tokens), ids[900:])


def test_token_file_errors(tmp_path):
    (np.arange(10, dtype=np.uint16) + 300).tofile(tmp_path / "big.bin")
    data = lm_data(LMTask(corpus=str(tmp_path / "big.bin"), seq_len=4, eval_fraction=0.5), tmp_path)
    with pytest.raises(ValueError, match=r"id 30[0-9] .* beyond the tokenizer's vocabulary of 259"):
        data.train.batch_at(0, 1, seed=0)
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a whole number of uint16 ids"):
        load_token_file(tmp_path / "odd.bin")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        load_token_file(tmp_path / "missing.bin")
    np.save(tmp_path / "floats.npy", np.zeros(8))
    with pytest.raises(ValueError, match="1-D array of integer token ids"):
        load_token_file(tmp_path / "floats.npy")


@pytest.mark.parametrize(
    "task, expected",
    [
        ({"corpus": "t.bin", "tokenizer": "bpe"}, "a token file needs the tokenizer that made it"),
        ({"corpus": "t.bin", "token_dtype": "int8"}, "task.token_dtype must be one of"),
        ({"corpus": "t.npy", "eval_fraction": 1.0}, "task.eval_fraction must be in"),
        ({"corpus": "stdlib", "train_split": "main"}, "task.train_split applies to hf: corpora"),
        ({"corpus": "hf:x", "text_field": " "}, "task.text_field must name a split or column"),
        ({"corpus": "hf:x", "num_workers": -1}, "task.num_workers must be >= 0"),
    ],
)
def test_corpus_settings_are_checked(tmp_path, task, expected):
    with pytest.raises(ValueError, match=expected):
        tiny_config(tmp_path, task={"name": "lm", **task})
