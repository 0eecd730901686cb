"""growmem.evaluate against oracles: stub models whose logits are known exactly give exactly
known MQAR accuracies (per slice and token-weighted overall) and LM losses, bits per byte
(from the decoded bytes, byte and BPE tokenizers), per-position buckets and block counts;
NIAH exact match is checked against teacher forcing on a real model, and the NIAH data of a
run against its rules (evaluation examples unlike training's, default lengths, maximal
examples, ``train_on_prompt`` in the batch labels)."""

from __future__ import annotations

import itertools
import math
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from growmem.cli import CONFIGS
from growmem.evaluate import evaluate_lm, evaluate_mqar, evaluate_niah
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import (
    IGNORE_INDEX,
    BPETokenizer,
    ByteTokenizer,
    MQARConfig,
    TokenBlocks,
    fold_seed,
    mqar_splits,
    niah_dataset,
    niah_tokenizer,
)
from growmem.tasks.niah import NOISE_HAYSTACK
from growmem.train import evaluate_run
from growmem.training.config import load_config
from growmem.training.data import build_task_data

from ..tasks.niah_rules import grown_prompts
from .common import TINY_MODEL, tiny_config


class Stub(torch.nn.Module):
    """A model whose logits [B, T, V] are ``logits_of(input_ids)``."""

    def __init__(self, logits_of):
        super().__init__()
        self.logits_of = logits_of

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits_of(input_ids))


def next_token(vocab_size: int, scale: float = 1.0) -> Stub:
    """Position t scores the input's token t + 1 (the last position its own token)."""

    def logits(ids):
        following = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # [B, T]
        return scale * F.one_hot(following, vocab_size).float()

    return Stub(logits)


def current_token(vocab_size: int, scales=None) -> Stub:
    """Position t scores the input's token t itself, with weight ``scales[t]`` (default 1)."""

    def logits(ids):
        weight = torch.ones(ids.shape[1]) if scales is None else scales[: ids.shape[1]]
        return F.one_hot(ids, vocab_size).double() * weight[:, None]

    return Stub(logits)


# ---------------------------------------------------------------- MQAR


@pytest.fixture(scope="module")
def mqar_slices():
    def config(seq_len, pairs, n):
        return MQARConfig(vocab_size=32, seq_len=seq_len, num_kv_pairs=pairs, num_examples=n)

    # slices of unequal examples and pairs: 13 and 28 labelled tokens
    return mqar_splits(config(32, 1, 4), [config(32, 1, 13), config(48, 4, 7)], seed=0).test


def labelled_per_row(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum(1)  # [N]


def test_mqar_perfect_and_current_token_oracles(mqar_slices):
    results = evaluate_mqar(next_token(32), mqar_slices, batch_size=5)
    assert results == {
        "accuracy": 1.0,
        "slices": [
            {"seq_len": 32, "num_kv_pairs": 1, "accuracy": 1.0},
            {"seq_len": 48, "num_kv_pairs": 4, "accuracy": 1.0},
        ],
    }
    # the token at a query is its key, never the value that follows (other halves of V)
    results = evaluate_mqar(current_token(32), mqar_slices, batch_size=5)
    assert results["accuracy"] == 0.0
    assert [s["accuracy"] for s in results["slices"]] == [0.0, 0.0]


def test_mqar_overall_accuracy_is_token_weighted(mqar_slices):
    short, long = (int(labelled_per_row(s.labels).sum()) for s in mqar_slices)
    assert (short, long) == (13, 28)
    right_when_short = Stub(
        lambda ids: (next_token(32) if ids.shape[1] == 32 else current_token(32))(ids).logits
    )
    results = evaluate_mqar(right_when_short, mqar_slices, batch_size=5)
    assert [s["accuracy"] for s in results["slices"]] == [1.0, 0.0]
    assert results["accuracy"] == pytest.approx(13 / 41, abs=1e-15)


def test_mqar_slice_accuracy_counts_every_row(mqar_slices):
    """Right on the rows whose first key is odd: each slice scores that share of its rows."""

    def logits(ids):
        right, wrong = next_token(32)(ids).logits, current_token(32)(ids).logits.float()
        odd = (ids[:, 0] % 2 == 1)[:, None, None]
        return torch.where(odd, right, wrong)

    results = evaluate_mqar(Stub(logits), mqar_slices, batch_size=3)
    correct = total = 0
    for s, row in zip(mqar_slices, results["slices"], strict=True):
        per_row = labelled_per_row(s.labels)
        odd = s.input_ids[:, 0] % 2 == 1
        assert 0 < odd.sum() < len(odd)
        assert row["accuracy"] == pytest.approx(float(per_row[odd].sum() / per_row.sum()))
        correct, total = correct + int(per_row[odd].sum()), total + int(per_row.sum())
    assert results["accuracy"] == pytest.approx(correct / total, abs=1e-15)


# ---------------------------------------------------------------- LM


def documents() -> list[str]:
    """Short documents, so that blocks hold end-of-document tokens (0 bytes), with characters
    of 2 and 3 UTF-8 bytes."""
    rng = random.Random(0)
    words = ["the", "mémoire", "of", "a", "model", "grows", "cached", "state", "→", "to"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "." for _ in range(40)]


@pytest.fixture(scope="module")
def tokenizers():
    return {"byte": ByteTokenizer(), "bpe": BPETokenizer.train(documents(), vocab_size=300)}


SEQ_LEN = 33  # 32 scored positions: 5 buckets of 6, 7, 6, 7 and 6 positions
BUCKET_EDGES = [0, 6, 13, 19, 26, 32]
SCALES = 0.5 + 0.25 * torch.arange(SEQ_LEN, dtype=torch.float64)  # position t's logit weight


def oracle_nll(stub: str, blocks: np.ndarray, vocab_size: int) -> np.ndarray:
    """[N, T - 1] nats of the next token at every position of ``blocks``, in closed form."""
    V = vocab_size
    shape = (blocks.shape[0], blocks.shape[1] - 1)
    if stub == "uniform":  # every token has probability 1/V
        return np.full(shape, math.log(V))
    if stub == "next":  # logit 3 on the right token, 0 elsewhere
        return np.full(shape, math.log1p((V - 1) * math.exp(-3.0)))
    # "current": logit c_t on the current token: right only where the token repeats
    c = SCALES[: shape[1]].numpy()
    same = blocks[:, 1:] == blocks[:, :-1]
    return np.log(np.exp(c) + V - 1) - c * same


def stub_model(stub: str, vocab_size: int) -> Stub:
    if stub == "uniform":
        return Stub(lambda ids: torch.zeros(*ids.shape, vocab_size))
    if stub == "next":
        return next_token(vocab_size, scale=3.0)
    return current_token(vocab_size, SCALES)


@pytest.mark.parametrize("name", ["byte", "bpe"])
@pytest.mark.parametrize("stub", ["uniform", "next", "current"])
@pytest.mark.parametrize("max_blocks", [0, 5, 1000])
def test_lm_scores_equal_the_oracle(tokenizers, name, stub, max_blocks):
    tokenizer = tokenizers[name]
    V = tokenizer.vocab_size
    blocks = TokenBlocks.from_documents(documents(), tokenizer, SEQ_LEN)
    # the stream and its blocks, rebuilt: documents each followed by eos, blocks of T tokens
    # that share one token with the next
    stream = [t for d in documents() for t in [*tokenizer.encode(d), tokenizer.eos_id]]
    assert np.asarray(blocks.tokens).tolist() == stream
    count = (len(stream) - 1) // (SEQ_LEN - 1)
    assert count > 5
    scored = count if max_blocks == 0 else min(max_blocks, count)
    block = np.array([stream[i * 32 : i * 32 + SEQ_LEN] for i in range(scored)])  # [N, T]
    nll = oracle_nll(stub, block, V)
    # the bytes of the scored text: the blocks' targets (tokens 1..T-1) follow each other in
    # the stream, so they decode together (the range's ends cut no character: no U+FFFD)
    text = tokenizer.decode(stream[1 : scored * 32 + 1])
    assert "\ufffd" not in text and "é" in text and "→" in text
    num_bytes = len(text.encode("utf-8"))
    tokens = scored * (SEQ_LEN - 1)
    assert num_bytes != tokens  # bits per byte differs from bits per token here

    model = stub_model(stub, V)
    results = evaluate_lm(model, blocks, max_blocks=max_blocks, batch_size=2, position_buckets=5)
    assert results["blocks"] == scored and results["tokens"] == tokens
    assert results["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert results["bits_per_byte"] == pytest.approx(nll.sum() / math.log(2) / num_bytes, rel=1e-5)
    rows = results["by_position"]
    assert [(r["start"], r["end"]) for r in rows] == [
        (lo + 1, hi) for lo, hi in itertools.pairwise(BUCKET_EDGES)
    ]
    for r, (lo, hi) in zip(rows, itertools.pairwise(BUCKET_EDGES), strict=True):
        assert r["loss"] == pytest.approx(nll[:, lo:hi].mean(), rel=1e-5), (lo, hi)
        assert r["perplexity"] == pytest.approx(math.exp(nll[:, lo:hi].mean()), rel=1e-5)


# ---------------------------------------------------------------- NIAH on a real model


def chain_model(vocab_size: int, chain: list[int]) -> GrowMemForCausalLM:
    """A real tiny model (random mixer and MLP) that predicts ``chain[i + 1]`` after
    ``chain[i]``: those tokens' embeddings are large orthogonal vectors the untied head maps to
    their successors, which the small random blocks cannot overturn."""
    torch.manual_seed(0)
    config = GrowMemConfig(vocab_size=vocab_size, **TINY_MODEL, tie_word_embeddings=False)
    model = GrowMemForCausalLM(config)
    assert len(set(chain[:-1])) == len(chain) - 1 <= config.hidden_size
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for i, (token, following) in enumerate(itertools.pairwise(chain)):
            embed[token] = 0.0
            embed[token, i] = 100.0
            head[following, i] = 10.0
    return model


def test_niah_exact_match_iff_every_teacher_forced_token_is_right():
    """Per example, on real models that know one example's answer (and so part of the
    others'): the greedy generation matches exactly iff teacher forcing predicts every answer
    token; the token accuracy is the mean share of right answer tokens."""
    tokenizer = ByteTokenizer()
    length, seed, n = 400, 0, 6
    # the evaluation's examples, from its documented seed stream
    examples = niah_dataset(
        tokenizer, variant=1, length=length, num_examples=n, seed=fold_seed(seed, 1, length)
    )
    known = [i for i, e in enumerate(examples) if len(set(e.answer[:6])) == 6][:3]
    assert len(known) >= 2
    exact_matches = 0
    for target in known:
        # the prompt ends in "... text is": "s", then " " and the digits
        chain = tokenizer.encode("s" + " " + examples[target].answer)
        model = chain_model(tokenizer.vocab_size, chain)
        results = evaluate_niah(
            model, tokenizer, variant=1, lengths=[length], num_examples=n, seed=seed
        )
        row = results["lengths"][0]
        hits = [hit for _, hit in row["depths"]]
        shares = []
        for e, hit in zip(examples, hits, strict=True):
            with torch.no_grad():
                logits = model(torch.tensor([e.input_ids + e.answer_ids])).logits[0]
            start = len(e.input_ids) - 1  # the last prompt position predicts the first token
            predicted = logits[start : start + len(e.answer_ids)].argmax(-1)
            right = predicted == torch.tensor(e.answer_ids)
            assert hit == bool(right.all()), (target, e.answer)
            shares.append(right.double().mean().item())
        assert hits[target] and not all(hits)
        assert 0.0 < min(shares) < 1.0  # every answer starts with " ": partial credit
        assert row["token_accuracy"] == pytest.approx(sum(shares) / n, rel=1e-12)
        assert row["accuracy"] == pytest.approx(sum(hits) / n, rel=1e-12)
        exact_matches += sum(hits)
    assert exact_matches >= len(known)


# ---------------------------------------------------------------- NIAH data of a run


class PromptRecorder(torch.nn.Module):
    """Records the prompts it is asked to continue; its logits are uniform."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.prompts = vocab_size, []

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        self.prompts.append((input_ids[0].tolist(), max_new_tokens))
        return torch.cat([input_ids, torch.zeros(1, max_new_tokens, dtype=torch.long)], dim=1)


NEEDLE = re.compile(r"One of the special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.")


def training_prompts(data, tensors: dict | None = None) -> list[str]:
    """The prompts of a NIAH run's training examples (the tokens before the first label), or
    of a batch of them (``tensors``)."""
    tensors = data.train.tensors if tensors is None else tensors
    ids, labels = tensors["input_ids"], tensors["labels"]
    prompts = []
    for row, label in zip(ids, labels, strict=True):
        first = int((label != IGNORE_INDEX).nonzero()[0])
        prompts.append(data.tokenizer.decode(row[:first].tolist()))
    return prompts


def test_niah_evaluation_lengths_and_examples(tmp_path):
    """Default lengths 1, 2, 4 and 8 times seq_len; every evaluation example the longest
    that fits its length, with needle depths on a grid, and none a training example (nor
    with a training example's value)."""
    task = {"name": "niah", "variant": 1, "seq_len": 384, "num_train_examples": 12}
    config = tiny_config(tmp_path, task={**task, "num_eval_examples": 3})
    data = build_task_data(config.task, config.train.seed, tmp_path)
    assert data.max_seq_len == 8 * 384
    model = PromptRecorder(data.tokenizer.vocab_size)
    results = evaluate_run(model, data, config)
    lengths = [384, 768, 1536, 3072]
    assert [r["length"] for r in results["lengths"]] == lengths
    assert all([d for d, _ in r["depths"]] == [0.0, 0.5, 1.0] for r in results["lengths"])
    assert len(model.prompts) == 3 * len(lengths)

    trained = training_prompts(data)
    trained_values = {NEEDLE.search(p)[2] for p in trained}
    assert len(trained) == len(trained_values) == 12
    evaluated_values = set()
    for i, (ids, answer_len) in enumerate(model.prompts):
        length, depth = lengths[i // 3], [0.0, 0.5, 1.0][i % 3]
        prompt = data.tokenizer.decode(ids)
        assert prompt not in trained
        key, value = NEEDLE.search(prompt).groups()
        evaluated_values.add(value)
        assert answer_len == len(" " + value)
        assert len(ids) + answer_len <= length
        grown = grown_prompts(
            prompt, answer=value, key=key, kind="number", depth=depth, haystack=NOISE_HAYSTACK
        )
        assert all(len(p) + answer_len > length for p in grown)  # bytes: one token each
    assert len(evaluated_values) == 12
    assert not evaluated_values & trained_values


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_niah_train_on_prompt_reaches_the_batch_labels(tmp_path, train_on_prompt):
    task = {"name": "niah", "variant": 1, "seq_len": 400, "num_train_examples": 5}
    config = tiny_config(tmp_path, task={**task, "train_on_prompt": train_on_prompt})
    data = build_task_data(config.task, config.train.seed, tmp_path)
    batch = data.train.batch_at(0, 5, seed=config.train.seed)  # the trainer's call
    ends = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        text = data.tokenizer.decode(ids.tolist())
        ending = "mentioned in the provided text is"
        prompt_len = text.rindex(ending) + len(ending)  # bytes: tokens
        value = NEEDLE.search(text)[2]
        end = prompt_len + len(" " + value)  # then padding
        assert data.tokenizer.decode(ids[prompt_len:end].tolist()) == " " + value
        expected_prompt = (
            ids[:prompt_len] if train_on_prompt else torch.full_like(ids[:prompt_len], IGNORE_INDEX)
        )
        assert torch.equal(labels[:prompt_len], expected_prompt)
        assert torch.equal(labels[prompt_len:end], ids[prompt_len:end])
        assert (labels[end:] == IGNORE_INDEX).all()
        ends.append(end)
    assert len(set(ends)) > 1  # rows of several lengths: padding is present


@pytest.mark.parametrize("eval_num_needles", [None, 2])
def test_niah_needle_mixture_trains_on_each_count_and_evaluates_at_one(tmp_path, eval_num_needles):
    """num_needles [1, 3]: the training examples alternate 1 and 3 needles; the evaluation
    asks with eval_num_needles needles, by default the most of the mixture."""
    task = {"name": "niah", "variant": 1, "seq_len": 700, "num_train_examples": 4}
    task |= {"num_needles": [1, 3], "eval_lengths": [700], "num_eval_examples": 2}
    config = tiny_config(tmp_path, task={**task, "eval_num_needles": eval_num_needles})
    data = build_task_data(config.task, config.train.seed, tmp_path)
    assert [len(NEEDLE.findall(p)) for p in training_prompts(data)] == [1, 3, 1, 3]
    model = PromptRecorder(data.tokenizer.vocab_size)
    results = evaluate_run(model, data, config)
    expected = eval_num_needles or 3
    assert results["num_needles"] == expected
    assert [len(NEEDLE.findall(data.tokenizer.decode(ids))) for ids, _ in model.prompts] == [
        expected
    ] * 2


def test_niah_needle_curriculum_changes_the_examples_at_its_steps(tmp_path):
    """num_needles [1, 3] with curriculum_steps [0, 2]: the batches of steps 0-1 hold one
    needle, later ones three (from another seed stream: no queried value repeats), and a
    batch is the same whenever it is asked for (a resumed run replays it)."""
    task = {"name": "niah", "variant": 1, "seq_len": 700, "num_train_examples": 4}
    task |= {"num_needles": [1, 3], "curriculum_steps": [0, 2], "eval_lengths": [700]}
    config = tiny_config(tmp_path, task={**task, "num_eval_examples": 1})
    data = build_task_data(config.task, config.train.seed, tmp_path)
    seed = config.train.seed
    counts, values = [], []
    for step in range(5):
        prompts = training_prompts(data, data.train.batch_at(step, 2, seed=seed))
        counts.append([len(NEEDLE.findall(p)) for p in prompts])
        values += [NEEDLE.search(p)[2] for p in prompts]
    assert counts == [[1, 1], [1, 1], [3, 3], [3, 3], [3, 3]]
    assert len(set(values[:4]) & set(values[4:])) == 0
    again = build_task_data(config.task, seed, tmp_path).train.batch_at(3, 2, seed=seed)
    assert torch.equal(again["input_ids"], data.train.batch_at(3, 2, seed=seed)["input_ids"])
    model = PromptRecorder(data.tokenizer.vocab_size)
    assert evaluate_run(model, data, config)["num_needles"] == 3


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_niah_multikey_run_trains_and_evaluates_with_its_needles(tmp_path, tokenizer):
    """A run with num_needles K: every training example and every evaluation prompt holds K
    needles with distinct keys, the label is the queried key's value, and the evaluation marks
    its lengths against the training length; with tokenizer "bpe" the run reads the task's
    own BPE."""
    task = {"name": "niah", "variant": 1, "seq_len": 700, "num_train_examples": 6}
    task |= {"num_needles": 3, "eval_lengths": [600, 700, 900], "num_eval_examples": 2}
    config = tiny_config(tmp_path, task={**task, "tokenizer": tokenizer})
    data = build_task_data(config.task, config.train.seed, tmp_path)
    expected = ByteTokenizer() if tokenizer == "byte" else niah_tokenizer(variant=1)
    assert data.tokenizer.fingerprint() == expected.fingerprint()
    ids, labels = data.train.tensors["input_ids"], data.train.tensors["labels"]
    for prompt, row, label in zip(training_prompts(data), ids, labels, strict=True):
        needles = dict(m.groups() for m in NEEDLE.finditer(prompt))
        assert len(needles) == 3
        asked = re.search(r"special magic number for ([a-z-]+) mentioned", prompt)[1]
        answer = data.tokenizer.decode(row[label != IGNORE_INDEX].tolist())
        assert answer == " " + needles[asked]

    model = PromptRecorder(data.tokenizer.vocab_size)
    results = evaluate_run(model, data, config)
    assert [(r["length"], r["regime"]) for r in results["lengths"]] == [
        (600, "within"),
        (700, "within"),
        (900, "beyond"),
    ]
    assert results["train_length"] == 700 and results["num_needles"] == 3
    assert len(model.prompts) == 6
    for prompt_ids, _ in model.prompts:
        prompt = data.tokenizer.decode(prompt_ids)
        assert len({key for key, _ in NEEDLE.findall(prompt)}) == 3


def test_niah_uuid_base_trains_on_a_uuid_copy(tmp_path):
    """The niah_uuid task base (as the sweep loads it, shrunk): every training example's label
    is the UUID of the prompt's one needle, one token per character, and the evaluation marks
    192 and 256 tokens within the training length, 512 beyond."""
    sizes = ["task.num_train_examples=4", "task.num_eval_examples=1"]
    config = load_config(CONFIGS / "niah_uuid.yaml", [*sizes, f"train.out_dir={tmp_path}"])
    assert (config.task.variant, config.task.seq_len, config.model["head_dim"]) == (3, 256, 16)
    data = build_task_data(config.task, config.train.seed, tmp_path)
    uuid4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    ids, labels = data.train.tensors["input_ids"], data.train.tensors["labels"]
    for prompt, row, label in zip(training_prompts(data), ids, labels, strict=True):
        (needle,) = re.findall(rf"special magic uuids for [a-z-]+ is: ({uuid4})\.", prompt)
        answer = row[label != IGNORE_INDEX].tolist()
        assert data.tokenizer.decode(answer) == " " + needle
        # digits a token each; letters one or a few (the BPE's merges): 31-37 tokens
        pieces = [data.tokenizer.decode([i]) for i in answer]
        assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p))
        assert 30 < len(answer) <= 1 + 36
    results = evaluate_run(PromptRecorder(data.tokenizer.vocab_size), data, config)
    assert [(r["length"], r["regime"]) for r in results["lengths"]] == [
        (192, "within"),
        (256, "within"),
        (512, "beyond"),
    ]
