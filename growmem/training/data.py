"""The data of a run: what a task config turns into (training batches, evaluation sets)."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from growmem.tasks import (
    BPETokenizer,
    ByteTokenizer,
    MQARConfig,
    MQARSlice,
    TokenBlocks,
    Tokenizer,
    fold_seed,
    load_corpus,
    load_tokenizer,
    mqar_splits,
    niah_dataset,
    niah_tokenizer,
    niah_training_batch,
)
from growmem.tasks.corpus import hf_records, hf_source, hf_split, is_token_file, load_token_file
from growmem.tasks.sampling import EpochSampler
from growmem.tasks.streaming import DocumentTokens, StreamedBlocks
from growmem.training.config import LMTask, MQARTask, NIAHTask


class ExampleSet:
    """Fixed training examples served with the same sampling contract as ``TokenBlocks``:
    ``batch_at(step, batch_size, seed=, rank=, world_size=)`` is a pure function of its
    arguments, and the ranks' batches concatenated in rank order form the global batch.

    Args:
        tensors: equally long [N, ...] tensors, e.g. input_ids and labels.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"tensors: expected one number of examples, got sizes {sizes}")
        self.tensors = tensors
        self.sampler = EpochSampler(sizes.pop())

    def batch_at(
        self, step: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(
            self.sampler.indices_at(step, batch_size, seed=seed, rank=rank, world_size=world_size)
        )
        return {name: t[index] for name, t in self.tensors.items()}


@dataclass
class TaskData:
    """What training and evaluation of one task need.

    Attributes:
        vocab_size: the model's vocabulary (task tokens or the tokenizer's).
        train: a batch source (``ExampleSet``, ``StagedExamples``, ``TokenBlocks``, or
            ``StreamedBlocks``,
            which is read in order and whose cursor a checkpoint keeps).
        max_seq_len: longest sequence the run trains or evaluates on.
        tokenizer: the tokenizer (NIAH and LM), or None (MQAR works on ids).
        mqar_test: MQAR test slices.
        lm_eval: LM evaluation blocks.
    """

    vocab_size: int
    train: ExampleSet | StagedExamples | TokenBlocks | StreamedBlocks
    max_seq_len: int
    tokenizer: Tokenizer | None = None
    mqar_test: list[MQARSlice] | None = None
    lm_eval: TokenBlocks | None = None


def mqar_test_configs(task: MQARTask) -> list[MQARConfig]:
    """The test slices of an MQAR task: every (seq_len, num_kv_pairs) pair that fits."""
    pairs = task.num_kv_pairs if isinstance(task.num_kv_pairs, list) else [task.num_kv_pairs]
    lengths = task.test_seq_lens or [task.seq_len]
    kv_counts = task.test_num_kv_pairs or pairs
    configs = [
        MQARConfig(
            vocab_size=task.vocab_size,
            seq_len=T,
            num_kv_pairs=k,
            num_examples=task.num_test_examples,
            power_a=task.power_a,
            random_non_queries=task.random_non_queries,
        )
        for T in lengths
        for k in kv_counts
        if 4 * k <= T
    ]
    if not configs:
        raise ValueError(
            f"task: no test slice fits (test_seq_lens {lengths}, test_num_kv_pairs "
            f"{kv_counts}; seq_len must be >= 4 * num_kv_pairs)"
        )
    return configs


def mqar_data(task: MQARTask, seed: int) -> TaskData:
    pairs = task.num_kv_pairs if isinstance(task.num_kv_pairs, list) else [task.num_kv_pairs]
    train = [
        MQARConfig(
            vocab_size=task.vocab_size,
            seq_len=task.seq_len,
            num_kv_pairs=k,
            num_examples=task.num_train_examples,
            power_a=task.power_a,
            random_non_queries=task.random_non_queries,
        )
        for k in pairs
    ]
    test = mqar_test_configs(task)
    splits = mqar_splits(train, test, seed=seed)
    max_len = max(task.seq_len, *(c.seq_len for c in test))
    return TaskData(task.vocab_size, ExampleSet(splits.train), max_len, mqar_test=splits.test)


def niah_tokenizer_of(task: NIAHTask) -> Tokenizer:
    """The task's tokenizer: bytes, its own BPE (`niah_tokenizer`) or a saved one."""
    if task.tokenizer != "bpe":
        return load_tokenizer(task.tokenizer)
    return niah_tokenizer(
        variant=task.variant,
        vocab_size=task.bpe_vocab_size,
        haystack=task.haystack,
    )


def niah_eval_needles(task: NIAHTask) -> int:
    """Needles per evaluation example: ``eval_num_needles``, else the most of ``num_needles``."""
    if task.eval_num_needles is not None:
        return task.eval_num_needles
    return task.num_needles if isinstance(task.num_needles, int) else max(task.num_needles)


class StagedExamples:
    """Training examples that change with the step (a curriculum): stage k serves the steps
    from ``starts[k]`` to the next start, its batch at step s being ``stages[k]``'s batch at
    step ``s - starts[k]``; so batches stay a pure function of the step, and a resumed run
    replays them.

    Args:
        starts: the first step of each stage, increasing from 0.
        stages: one ``ExampleSet`` per stage.
    """

    def __init__(self, starts: list[int], stages: list[ExampleSet]):
        if len(starts) != len(stages) or not starts or starts[0] != 0:
            raise ValueError(f"starts: expected one step per stage, the first 0, got {starts}")
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"starts: expected increasing steps, got {starts}")
        self.starts, self.stages = starts, stages

    def batch_at(
        self, step: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        k = bisect.bisect_right(self.starts, step) - 1
        return self.stages[k].batch_at(
            step - self.starts[k], batch_size, seed=seed, rank=rank, world_size=world_size
        )


def niah_data(task: NIAHTask, seed: int) -> TaskData:
    """S-NIAH training examples: one set (a needle count or a mixture of them), or with
    ``curriculum_steps`` one set per count (stage k's examples from seed stream (seed, 2, k)),
    each of ``num_train_examples``."""
    tokenizer = niah_tokenizer_of(task)

    def example_set(num_needles: int | list[int], stream_seed: int) -> ExampleSet:
        examples = niah_dataset(
            tokenizer,
            variant=task.variant,
            length=task.seq_len,
            num_examples=task.num_train_examples,
            seed=stream_seed,
            haystack=task.haystack,
            num_needles=num_needles,
        )
        batch = niah_training_batch(
            examples, pad_id=tokenizer.pad_id, train_on_prompt=task.train_on_prompt
        )
        return ExampleSet({"input_ids": batch["input_ids"], "labels": batch["labels"]})

    if task.curriculum_steps is None:
        train = example_set(task.num_needles, seed)
    else:
        stages = [example_set(k, fold_seed(seed, 2, i)) for i, k in enumerate(task.num_needles)]
        train = StagedExamples(list(task.curriculum_steps), stages)
    max_len = max(niah_eval_lengths(task))
    return TaskData(tokenizer.vocab_size, train, max_len, tokenizer=tokenizer)


def niah_eval_lengths(task: NIAHTask) -> list[int]:
    """The evaluation lengths of ``task``: its own, or the training length first, then 2x,
    4x and 8x it (extrapolation)."""
    return task.eval_lengths or [task.seq_len * m for m in (1, 2, 4, 8)]


def lm_tokenizer(task: LMTask, out_dir: Path) -> Tokenizer:
    """The run's tokenizer: byte, a saved one, or a BPE trained on the training split (once:
    a run that resumes reuses the one saved in out_dir/tokenizer)."""
    if task.tokenizer == "byte":
        return ByteTokenizer()
    if task.tokenizer != "bpe":
        return load_tokenizer(task.tokenizer)
    saved = out_dir / "tokenizer"
    if saved.is_dir():
        return load_tokenizer(saved)
    documents = load_corpus(task.corpus, task.train_split, task.text_field)
    tokenizer = BPETokenizer.train(documents, task.bpe_vocab_size)
    tokenizer.save(saved)
    return tokenizer


def lm_data(task: LMTask, out_dir: Path) -> TaskData:
    tokenizer = lm_tokenizer(task, out_dir)
    cache_dir = Path(task.cache_dir) if task.cache_dir else out_dir.parent / ".token_cache"
    token_bytes = tokenizer.token_byte_lengths()
    if task.corpus.startswith("hf:"):
        train = StreamedBlocks(
            hf_tokens(task, task.train_split, tokenizer), token_bytes, task.seq_len
        )
    elif is_token_file(task.corpus):
        train = TokenBlocks(token_file_splits(task)[0], token_bytes, task.seq_len)
    else:
        documents = load_corpus(task.corpus, "train")
        train = TokenBlocks.from_documents(documents, tokenizer, task.seq_len, cache_dir=cache_dir)
    return TaskData(
        tokenizer.vocab_size,
        train,
        task.seq_len,
        tokenizer=tokenizer,
        lm_eval=lm_eval_blocks(task, tokenizer, cache_dir),
    )


def lm_eval_blocks(
    task: LMTask, tokenizer: Tokenizer, cache_dir: Path | None = None
) -> TokenBlocks:
    """The evaluation blocks of an LM task: its eval split (local corpora: tokenized once
    into ``cache_dir``), the first ``eval_blocks`` blocks of a streamed eval split (all: 0),
    or a token file's evaluation tokens (`token_file_splits`)."""
    token_bytes = tokenizer.token_byte_lengths()
    if task.corpus.startswith("hf:"):
        stream = StreamedBlocks(
            hf_tokens(task, task.eval_split, tokenizer), token_bytes, task.seq_len
        )
        return TokenBlocks(stream.leading_tokens(task.eval_blocks), token_bytes, task.seq_len)
    if is_token_file(task.corpus):
        return TokenBlocks(token_file_splits(task)[1], token_bytes, task.seq_len)
    documents = load_corpus(task.corpus, task.eval_split)
    return TokenBlocks.from_documents(documents, tokenizer, task.seq_len, cache_dir=cache_dir)


def hf_tokens(task: LMTask, split: str, tokenizer: Tokenizer) -> DocumentTokens:
    """The tokenized records of a split of a streamed Hugging Face corpus."""
    name, config = hf_source(task.corpus)

    def records(start: int):
        return hf_records(name, hf_split(split), task.text_field, config, start)

    return DocumentTokens(records, tokenizer, task.num_workers)


def token_file_splits(task: LMTask) -> tuple[np.ndarray, np.ndarray]:
    """([L] training, [L'] evaluation) token ids of a token-file corpus, memory-mapped: the
    ``eval_corpus`` file, or the corpus's last ``eval_fraction`` (at least seq_len tokens)."""
    tokens = load_token_file(task.corpus, task.token_dtype)  # [L]
    if task.eval_corpus is not None:
        return tokens, load_token_file(task.eval_corpus, task.token_dtype)
    held_out = max(task.seq_len, round(task.eval_fraction * len(tokens)))
    if held_out >= len(tokens):
        raise ValueError(
            f"task.corpus: {len(tokens)} tokens leave none for training after holding "
            f"out {held_out} for evaluation (task.eval_fraction, at least seq_len)"
        )
    return tokens[:-held_out], tokens[-held_out:]


def build_task_data(task: MQARTask | NIAHTask | LMTask, seed: int, out_dir: Path) -> TaskData:
    """Generate or load the data of ``task`` (deterministic given ``seed``)."""
    if isinstance(task, MQARTask):
        return mqar_data(task, seed)
    if isinstance(task, NIAHTask):
        return niah_data(task, seed)
    return lm_data(task, out_dir)
