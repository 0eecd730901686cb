"""Tests of growmem.tasks.niah: prompt format, sizing, needle depth, batches and scoring."""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from growmem.tasks.niah import (
    NOISE_HAYSTACK,
    depth_grid,
    make_niah_example,
    niah_dataset,
    niah_tokenizer,
    niah_training_batch,
    score_exact_match,
    stdlib_essay,
)
from growmem.tasks.tokenizers import BPETokenizer, ByteTokenizer

from .niah_rules import haystack_count, multikey_prompts, run_boundaries, seed_draws

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
VALUE_FORMAT = {1: r"[1-9]\d{6}", 2: r"[1-9]\d{6}", 3: UUID}
KIND = {1: "number", 2: "number", 3: "uuid"}


@pytest.fixture(scope="module")
def byte():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([stdlib_essay()[:60_000]], vocab_size=1000)


@pytest.fixture(params=["byte", "bpe"])
def tokenizer(request, byte, bpe):
    return {"byte": byte, "bpe": bpe}[request.param]


def needle_fraction(prompt: str, needle: str) -> float:
    """Relative position of the needle within the haystack part of the prompt."""
    begin = prompt.index("\n") + 1
    end = prompt.rindex("\nWhat is the special magic")
    at = prompt.index(needle)
    return (at - begin) / max(1, end - begin - len(needle))


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_length_format_and_answer(tokenizer, variant):
    length = 1200
    ex = make_niah_example(tokenizer, variant=variant, length=length, depth=0.4, seed=11)
    total = len(ex.input_ids) + len(ex.answer_ids)
    assert length - 25 <= total <= length
    assert ex.input_ids == tokenizer.encode(ex.prompt)
    assert ex.answer_ids == tokenizer.encode(" " + ex.answer)
    assert re.fullmatch(VALUE_FORMAT[variant], ex.answer)
    assert re.fullmatch(r"[a-z]+-[a-z]+", ex.key)
    kind = KIND[variant]
    needle = f"One of the special magic {kind}s for {ex.key} is: {ex.answer}."
    assert ex.prompt.count(needle) == 1 and ex.prompt.count(ex.answer) == 1
    assert ex.prompt.startswith(f"A special magic {kind} is hidden within the following text.")
    assert ex.prompt.endswith(
        f"What is the special magic {kind} for {ex.key} mentioned in the provided text? "
        f"The special magic {kind} for {ex.key} mentioned in the provided text is"
    )
    assert ("The grass is green." in ex.prompt) == (variant == 1)
    assert (ex.variant, ex.depth) == (variant, 0.4)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("variant", [1, 2])
def test_needle_at_requested_depth(byte, variant, depth):
    ex = make_niah_example(byte, variant=variant, length=20_000, depth=depth, seed=3)
    needle = f"One of the special magic numbers for {ex.key} is: {ex.answer}."
    assert abs(needle_fraction(ex.prompt, needle) - depth) < 0.015  # a sentence is <= 200 chars
    before = ex.prompt[: ex.prompt.index(needle)]
    assert before.endswith(("\n", ". "))  # at a sentence boundary


def test_deterministic_by_seed(bpe):
    a = make_niah_example(bpe, variant=3, length=800, depth=0.5, seed=5)
    assert a == make_niah_example(bpe, variant=3, length=800, depth=0.5, seed=5)
    b = make_niah_example(bpe, variant=3, length=800, depth=0.5, seed=6)
    assert a.answer != b.answer and a.prompt != b.prompt


def test_custom_haystack(byte):
    haystack = "Alpha beta gamma. Delta epsilon zeta! Eta theta iota? Kappa lambda mu."
    ex = make_niah_example(byte, variant=2, length=2000, depth=0.5, seed=0, haystack=haystack)
    assert "Delta epsilon zeta!" in ex.prompt and "The grass" not in ex.prompt
    assert len(ex.input_ids) + len(ex.answer_ids) > 1980  # the haystack wraps around


def test_tokenizer_with_special_tokens(byte):
    class WithBos:
        def encode(self, text):
            return [999, *byte.encode(text)]

    ex = make_niah_example(WithBos(), variant=1, length=600, depth=0.5, seed=0)
    assert ex.input_ids[0] == 999 and len(ex.input_ids) + len(ex.answer_ids) <= 600


def test_argument_errors(byte):
    kwargs = dict(variant=1, length=500, depth=0.5, seed=0)
    for name, bad in [("variant", 4), ("depth", 1.5), ("depth", -0.1), ("seed", -1)]:
        with pytest.raises(ValueError, match=name):
            make_niah_example(byte, **{**kwargs, name: bad})
    with pytest.raises(ValueError, match="length"):
        make_niah_example(byte, **{**kwargs, "length": 100})
    with pytest.raises(ValueError, match="haystack"):
        make_niah_example(byte, **kwargs, haystack="   ")


def test_dataset_depths_and_seeds(byte):
    examples = niah_dataset(byte, variant=1, length=700, num_examples=5, seed=0)
    assert [e.depth for e in examples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len({e.answer for e in examples}) == 5
    cycled = niah_dataset(byte, variant=1, length=700, num_examples=3, seed=0, depths=[0.2, 0.8])
    assert [e.depth for e in cycled] == [0.2, 0.8, 0.2]
    with pytest.raises(ValueError, match="num_examples"):
        niah_dataset(byte, variant=1, length=700, num_examples=0, seed=0)
    with pytest.raises(ValueError, match="depths"):
        niah_dataset(byte, variant=1, length=700, num_examples=1, seed=0, depths=[])


def test_depth_grid():
    assert depth_grid(3) == [0.0, 0.5, 1.0]
    assert depth_grid(1) == [0.5]
    with pytest.raises(ValueError, match="n"):
        depth_grid(0)


@pytest.mark.parametrize("eos_id", [None, 258])
def test_training_batch_labels_only_the_answer(byte, eos_id):
    examples = niah_dataset(byte, variant=2, length=600, num_examples=2, seed=1)
    short = make_niah_example(byte, variant=1, length=450, depth=0.5, seed=2)
    examples.append(short)
    batch = niah_training_batch(examples, pad_id=256, eos_id=eos_id)
    x, y, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert x.shape == y.shape == mask.shape and x.shape[0] == 3
    tail = [] if eos_id is None else [eos_id]
    for i, ex in enumerate(examples):
        n = len(ex.input_ids) + len(ex.answer_ids) + len(tail)
        assert x[i, :n].tolist() == ex.input_ids + ex.answer_ids + tail
        assert mask[i].tolist() == [1] * n + [0] * (x.shape[1] - n)
        assert (x[i, n:] == 256).all()
        labelled = (y[i] != -100).nonzero().flatten().tolist()
        assert labelled == list(range(len(ex.input_ids), n))
        assert y[i, labelled].tolist() == ex.answer_ids + tail
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="examples"):
        niah_training_batch([], pad_id=0)


def test_training_batch_train_on_prompt_labels_every_real_token(byte):
    examples = [
        make_niah_example(byte, variant=1, length=500, depth=0.3, seed=3),
        make_niah_example(byte, variant=1, length=420, depth=0.7, seed=4),
    ]
    answer_only = niah_training_batch(examples, pad_id=256)
    batch = niah_training_batch(examples, pad_id=256, train_on_prompt=True)
    assert torch.equal(batch["input_ids"], answer_only["input_ids"])
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == -100).all()
    # the answer positions carry the same labels either way
    answered = answer_only["labels"] != -100
    assert torch.equal(batch["labels"][answered], answer_only["labels"][answered])


def test_score_exact_match():
    assert score_exact_match("  4821937", "4821937")
    assert score_exact_match("The number is 4821937.", "4821937")
    assert score_exact_match(
        "1B4E28BA-2FA1-4ED2-883F-0F8E3C1A6D3B", "1b4e28ba-2fa1-4ed2-883f-0f8e3c1a6d3b"
    )
    assert not score_exact_match("48219370", "4821937")
    assert not score_exact_match("4821936", "4821937")
    assert not score_exact_match("", "4821937")
    with pytest.raises(ValueError, match="answer"):
        score_exact_match("x", " ")


def test_essay_is_offline_prose():
    essay = stdlib_essay()
    assert len(essay) > 100_000
    assert ">>>" not in essay and "def " not in essay and "\n" not in essay
    assert essay == stdlib_essay()
    assert NOISE_HAYSTACK.startswith("The grass is green.")


# ---------------------------------------------------------------- multi-key needles

VALUE = {1: r"\d{7}", 2: r"\d{7}", 3: UUID}


def needles_of(prompt: str, variant: int) -> list[tuple[str, str, int]]:
    """(key, value, character offset) of every needle in ``prompt``."""
    pattern = (
        rf"One of the special magic {KIND[variant]}s for ([a-z]+-[a-z]+) is: ({VALUE[variant]})\."
    )
    return [(m[1], m[2], m.start()) for m in re.finditer(pattern, prompt)]


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_multikey_needles_are_distinct_apart_and_the_queried_one_answers(tokenizer, variant):
    for seed, depth in enumerate((0.0, 0.3, 0.5, 1.0)):
        ex = make_niah_example(
            tokenizer, variant=variant, length=1600, depth=depth, seed=seed, num_needles=4
        )
        needles = needles_of(ex.prompt, variant)
        assert len(needles) == 4
        assert len({k for k, _, _ in needles}) == len({v for _, v, _ in needles}) == 4
        by_key = {k: v for k, v, _ in needles}
        assert by_key[ex.key] == ex.answer  # the question's key names the answer's needle
        assert ex.prompt.endswith(f"for {ex.key} mentioned in the provided text is")
        assert sorted(ex.distractors) == sorted((k, v) for k, v, _ in needles if k != ex.key)
        assert ex.prompt.count(ex.answer) == 1
        # each at its own sentence boundary: after a sentence's end, with haystack between
        offsets = sorted(at for _, _, at in needles)
        for at in offsets:
            assert ex.prompt[:at].endswith(("\n", ". ", "! ", "? "))
        for at, following in itertools.pairwise(offsets):
            between = ex.prompt[at:following].split(".", 1)[1]  # after the needle's own end
            assert between.strip(), "two needles at one boundary"


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_multikey_queried_needle_at_requested_depth(byte, depth):
    ex = make_niah_example(byte, variant=2, length=20_000, depth=depth, seed=4, num_needles=5)
    prompt = ex.prompt
    for key, value in ex.distractors:  # the haystack as the queried needle sees it
        prompt = prompt.replace(f"One of the special magic numbers for {key} is: {value}. ", "")
    assert len(needles_of(prompt, 2)) == 1
    needle = f"One of the special magic numbers for {ex.key} is: {ex.answer}."
    assert abs(needle_fraction(prompt, needle) - depth) < 0.015  # a sentence is <= 200 chars


def test_multikey_distractors_spread_over_the_haystack(byte):
    """Distractor depths are drawn per example: over many examples they cover the haystack."""
    fractions = []
    for seed in range(12):
        ex = make_niah_example(byte, variant=1, length=3000, depth=0.5, seed=seed, num_needles=3)
        for key, value in ex.distractors:
            needle = f"One of the special magic numbers for {key} is: {value}."
            fractions.append(needle_fraction(ex.prompt, needle))
    assert min(fractions) < 0.2 and max(fractions) > 0.8


def test_multikey_deterministic_by_seed(tokenizer):
    kwargs = dict(variant=3, length=1500, depth=0.5, num_needles=3)
    a = make_niah_example(tokenizer, seed=5, **kwargs)
    assert a == make_niah_example(tokenizer, seed=5, **kwargs)
    b = make_niah_example(tokenizer, seed=6, **kwargs)
    assert a.answer != b.answer and a.distractors != b.distractors and a.prompt != b.prompt


@pytest.mark.parametrize("num_needles", [2, 4, 8])
def test_multikey_length_contract(tokenizer, num_needles):
    """prompt + answer within the target, short of it by at most one word's tokens."""
    longest_word = max(len(tokenizer.encode(" " + w)) for w in NOISE_HAYSTACK.split())
    for length in (1100, 1500, 2500):
        for seed in range(3):
            ex = make_niah_example(
                tokenizer, variant=1, length=length, depth=0.7, seed=seed, num_needles=num_needles
            )
            total = len(ex.input_ids) + len(ex.answer_ids)
            assert length - longest_word - 2 <= total <= length, (length, seed)
            assert ex.input_ids == tokenizer.encode(ex.prompt)
            assert len(needles_of(ex.prompt, 1)) == num_needles


@pytest.mark.parametrize("variant", [1, 2])
def test_multikey_shortest_length_is_stated_and_exact(byte, variant):
    """Too short for K needles at their own boundaries: the error states the shortest length
    that fits, and that length does fit."""
    for seed in range(4):
        kwargs = dict(variant=variant, depth=0.5, seed=seed, num_needles=4)
        with pytest.raises(ValueError, match=r"length: .* with num_needles=4, got 500") as caught:
            make_niah_example(byte, length=500, **kwargs)
        shortest = int(re.search(r"at least (\d+) tokens", str(caught.value))[1])
        ex = make_niah_example(byte, length=shortest, **kwargs)
        assert len(needles_of(ex.prompt, variant)) == 4
        # its haystack is the shortest run from its first sentence with 4 sentence starts
        haystack = NOISE_HAYSTACK if variant == 1 else stdlib_essay()
        first = seed_draws(seed, variant=variant, num_needles=4, haystack=haystack)[2]
        count = haystack_count(ex.prompt, 4)
        assert len(run_boundaries(haystack, first, count)) >= 4
        assert len(run_boundaries(haystack, first, count - 1)) < 4
        with pytest.raises(ValueError, match="length"):
            make_niah_example(byte, length=shortest - 1, **kwargs)


def test_num_needles_errors(byte):
    kwargs = dict(variant=1, length=2000, depth=0.5, seed=0)
    for bad in (0, -1, 1.5, True, "2", 2501):
        with pytest.raises(ValueError, match="num_needles"):
            make_niah_example(byte, **kwargs, num_needles=bad)
    with pytest.raises(ValueError, match="num_needles"):
        niah_dataset(byte, variant=1, length=2000, num_examples=2, seed=0, num_needles=0)


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_one_needle_is_the_single_needle_example(tokenizer, variant):
    """num_needles=1 rebuilds, from the seed's documented draws and the placement rules
    (tests/tasks/niah_rules.py), exactly the single-needle example."""
    haystack = NOISE_HAYSTACK if variant == 1 else stdlib_essay()
    for seed, (length, depth) in enumerate(itertools.product((450, 900, 2000), (0.0, 0.35, 1.0))):
        ex = make_niah_example(tokenizer, variant=variant, length=length, depth=depth, seed=seed)
        assert ex == make_niah_example(
            tokenizer, variant=variant, length=length, depth=depth, seed=seed, num_needles=1
        )
        key, value, _, others = seed_draws(seed, variant=variant, num_needles=1, haystack=haystack)
        assert (ex.key, ex.answer, ex.distractors, others) == (key, value, (), [])
        same, _ = multikey_prompts(
            ex.prompt, seed=seed, variant=variant, num_needles=1, depth=depth, haystack=haystack
        )
        assert ex.prompt == same


def test_multikey_dataset(byte):
    examples = niah_dataset(byte, variant=1, length=1200, num_examples=4, seed=0, num_needles=3)
    assert [e.depth for e in examples] == depth_grid(4)
    for e in examples:
        assert len(e.distractors) == 2 and len(needles_of(e.prompt, 1)) == 3
    assert len({e.answer for e in examples}) == 4


def test_dataset_mixture_of_needle_counts(byte):
    """A list of counts: example i has the (i mod n)-th count and is the example that count
    alone gives at its seed and depth."""
    examples = niah_dataset(
        byte, variant=1, length=1200, num_examples=5, seed=4, num_needles=[1, 3]
    )
    assert [len(needles_of(e.prompt, 1)) for e in examples] == [1, 3, 1, 3, 1]
    for i, e in enumerate(examples):
        alone = niah_dataset(
            byte, variant=1, length=1200, num_examples=5, seed=4, num_needles=[1, 3][i % 2]
        )[i]
        assert e == alone
    with pytest.raises(ValueError, match="num_needles: expected an int or a non-empty list"):
        niah_dataset(byte, variant=1, length=1200, num_examples=2, seed=0, num_needles=[])


def test_niah_tokenizer_is_a_function_of_its_arguments_and_keeps_digits_apart(byte):
    """The task's own BPE: the same on every call, another for another kind of example; words
    of the prompt become single tokens, every digit of a value its own token, and a 4-needle
    example fits in 256 tokens (bytes need about 600)."""
    tok = niah_tokenizer(variant=1)
    assert tok.fingerprint() == niah_tokenizer(variant=1).fingerprint()
    smaller = niah_tokenizer(variant=1, vocab_size=600)
    assert tok.fingerprint() != smaller.fingerprint()
    ex = make_niah_example(tok, variant=1, length=256, depth=0.5, seed=3, num_needles=4)
    assert len(ex.input_ids) + len(ex.answer_ids) <= 256
    assert len(needles_of(ex.prompt, 1)) == 4
    assert [tok.decode([i]) for i in ex.answer_ids] == [" ", *ex.answer]
    assert tok.decode(ex.input_ids) == ex.prompt
    for word in (" grass", " special", " magic", " mentioned"):
        assert len(tok.encode(word)) == 1
    with pytest.raises(ValueError, match="length: expected at least"):
        make_niah_example(byte, variant=1, length=256, depth=0.5, seed=3, num_needles=4)
