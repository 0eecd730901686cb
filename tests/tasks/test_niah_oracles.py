"""S-NIAH examples are the longest that fit their length: one more haystack word, placed by
the documented rules (tests/tasks/niah_rules.py), would not fit."""

from __future__ import annotations

import pytest

from growmem.tasks.niah import NOISE_HAYSTACK, make_niah_example
from growmem.tasks.tokenizers import BPETokenizer, ByteTokenizer

from .niah_rules import grown_prompts, multikey_prompts

# a haystack with every sentence end the rules know, short sentences and a long one
PROSE = (
    "Memory grows with the context. Does it? It does! Each segment keeps a cached state that "
    "later tokens read from when they need to, and the cache is a list of small matrices. "
    "Short one. Another sentence follows here."
)
KIND = {1: "number", 2: "number", 3: "uuid"}


@pytest.fixture(scope="module")
def tokenizers():
    texts = [NOISE_HAYSTACK * 40, PROSE * 40]
    return {"byte": ByteTokenizer(), "bpe": BPETokenizer.train(texts, vocab_size=400)}


def example(tokenizer, variant: int, length: int, depth: float, seed: int, **settings):
    """The S-NIAH example of these arguments, variants 2 and 3 in the test prose."""
    haystack = None if variant == 1 else PROSE
    return make_niah_example(
        tokenizer, variant=variant, length=length, depth=depth, seed=seed, haystack=haystack,
        **settings,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["byte", "bpe"])
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_each_example_is_the_longest_that_fits(tokenizers, name, variant):
    tokenizer = tokenizers[name]
    haystack = NOISE_HAYSTACK if variant == 1 else PROSE
    for length in (430, 701, 1300, 2600):
        for seed, depth in enumerate((0.0, 0.35, 0.5, 1.0)):
            ex = example(tokenizer, variant, length, depth, seed)
            total = len(ex.input_ids) + len(ex.answer_ids)
            assert total <= length, (length, depth)  # never longer
            grown = grown_prompts(
                ex.prompt,
                answer=ex.answer,
                key=ex.key,
                kind=KIND[variant],
                depth=depth,
                haystack=haystack,
            )
            for prompt in grown:  # one more word does not fit
                assert len(tokenizer.encode(prompt)) + len(ex.answer_ids) > length, (length, depth)


@pytest.mark.parametrize("name", ["byte", "bpe"])
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_each_multikey_example_is_the_rules_and_the_longest_that_fits(tokenizers, name, variant):
    """A K-needle example is what the documented rules build from its seed (keys, values,
    first sentence, distractor depths, placement), and one more haystack word would not fit."""
    tokenizer = tokenizers[name]
    haystack = NOISE_HAYSTACK if variant == 1 else PROSE
    for length in (1100, 2600):
        for seed, depth in enumerate((0.0, 0.35, 1.0)):
            ex = example(tokenizer, variant, length, depth, seed, num_needles=4)
            assert len(ex.input_ids) + len(ex.answer_ids) <= length
            same, grown = multikey_prompts(
                ex.prompt,
                seed=seed,
                variant=variant,
                num_needles=4,
                depth=depth,
                haystack=haystack,
            )
            assert ex.prompt == same, (length, seed)
            assert len(tokenizer.encode(grown)) + len(ex.answer_ids) > length, (length, seed)
