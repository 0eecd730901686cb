"""Needle-in-a-haystack, single (S-NIAH-1/2/3) and multi-key, in the style of RULER's
niah_single_1/2/3 and niah_multikey_1.

Hsieh et al., "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(2024). A prompt reads (with ``{kind}`` "number" or "uuid")::

    A special magic {kind} is hidden within the following text. Make sure to memorize it. I will
    quiz you about the {kind} afterwards.
    <haystack words ... One of the special magic {kind}s for {key} is: {value}. ... words>
    What is the special magic {kind} for {key} mentioned in the provided text? The special magic
    {kind} for {key} mentioned in the provided text is

and the answer is `` {value}``. Keys are RULER-style adjective-noun words ("brave-lantern").

=========  ====================================  ==========================================
variant    haystack                              value
=========  ====================================  ==========================================
1          "noise": The grass is green. ...      7-digit number (RULER's niah_single_1)
2          "essay": stdlib docstring prose       7-digit number
3          "essay"                               UUID4 string, e.g. 1b4e28ba-2fa1-4ed2-...
=========  ====================================  ==========================================

RULER's essays are downloaded Paul Graham essays; here the essay is prose collected offline from
the docstrings of the running interpreter's top-level standard-library modules (`stdlib_essay`),
so it depends on the Python version. The haystack is a run of words starting at a sentence
chosen by the seed (wrapping around the text when it runs out). Its number of words is the
largest that keeps ``prompt + answer`` within the target length for the given tokenizer (any
object with ``encode(str) -> list[int]``), so examples fall short of the target by at most one
word's tokens. The needle goes in at the sentence boundary nearest ``depth`` (fraction of the
haystack's words: 0 = first, 1 = last); the haystack may end mid-sentence, and the needle never
follows such a fragment, so depth 1 is off by at most one sentence.

Multi-key needles (``num_needles`` K > 1), in the style of RULER's niah_multikey_1: the
haystack holds K needles of the variant's format with K distinct keys and K distinct values,
and the question asks for one of them, so a model must tell the queried key's value from the
K - 1 distractors' (a fixed-size state has to keep all K pairs apart). The queried needle goes
at the sentence boundary nearest ``depth``; each distractor at the free boundary nearest a
depth drawn uniformly from [0, 1) by the example's seed, so every needle sits at its own
sentence boundary (in the order queried, then distractors as drawn; the first on a tie); a
length whose haystack has fewer than K boundaries is an error. The seed draws the queried key,
its value and the haystack's first sentence, then each distractor's key and value (redrawn
until unlike all earlier ones), then the distractors' depths, so K = 1 gives exactly the
single-needle examples.

=========  ==============================================================================
K          needles in the haystack (the question asks for the one at ``depth``)
=========  ==============================================================================
1          the queried needle only (S-NIAH-1/2/3, the default)
K > 1      the queried needle and K - 1 distractors with other keys and values
=========  ==============================================================================
"""

from __future__ import annotations

import ast
import functools
import random
import re
import sysconfig
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from growmem.tasks._common import IGNORE_INDEX, fold_seed
from growmem.tasks.tokenizers import BPETokenizer, ByteTokenizer

__all__ = [
    "NOISE_HAYSTACK",
    "NIAHExample",
    "depth_grid",
    "make_niah_example",
    "niah_dataset",
    "niah_tokenizer",
    "niah_training_batch",
    "score_exact_match",
    "stdlib_essay",
]

NOISE_HAYSTACK = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_HEADER = (
    "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n"
)
_NEEDLE = "One of the special magic {kind}s for {key} is: {value}."
_QUESTION = (
    "\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
    "The special magic {kind} for {key} mentioned in the provided text is"
)
_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "curious",
    "damp", "eager", "faint", "fancy", "fierce", "gentle", "glossy", "grand", "hollow", "humble",
    "icy", "jolly", "keen", "lively", "lucky", "merry", "misty", "noble", "odd", "pale",
    "plain", "proud", "quiet", "rapid", "rusty", "shy", "silent", "sleepy", "smooth", "solid",
    "spicy", "steady", "swift", "tall", "tidy", "vivid", "warm", "wild", "witty", "young",
)  # fmt: skip
_NOUNS = (
    "anchor", "apple", "badge", "basket", "beacon", "bridge", "candle", "canyon", "castle",
    "cherry", "cloud", "comet", "compass", "cottage", "crystal", "desert", "engine", "falcon",
    "feather", "forest", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle",
    "ladder", "lantern", "meadow", "mirror", "needle", "orchard", "otter", "painting", "pebble",
    "pillow", "planet", "river", "saddle", "shadow", "signal", "spoon", "thunder", "tower",
    "tunnel", "velvet", "violin", "wagon", "whistle",
)  # fmt: skip
# A prose sentence: capitalized, plain punctuation, 20-200 characters, ends with a period.
_PROSE_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9 ,;:'\-]{19,198}[a-z0-9]\.")


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _seven_digits(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclass(frozen=True)
class _Variant:
    kind: str
    essay: bool  # essay haystack (else the noise haystack)
    make_value: Callable[[random.Random], str]


_VARIANTS = {
    1: _Variant("number", essay=False, make_value=_seven_digits),
    2: _Variant("number", essay=True, make_value=_seven_digits),
    3: _Variant("uuid", essay=True, make_value=_uuid4),
}


@dataclass(frozen=True)
class NIAHExample:
    """One S-NIAH example.

    Attributes:
        prompt: the text up to and including "... mentioned in the provided text is".
        answer: the value, e.g. "4821937" (the completion is " " + answer).
        input_ids: ``encode(prompt)``.
        answer_ids: ``encode(" " + answer)``, encoded separately so the split between prompt
            and answer tokens is exact; the full sequence is input_ids + answer_ids.
        depth: the requested needle depth in [0, 1].
        variant: 1, 2 or 3.
        key: the queried needle's key, e.g. "brave-lantern".
        distractors: (key, value) of the other needles (multi-key examples), in the order
            the seed drew them; empty for a single needle.
    """

    prompt: str
    answer: str
    input_ids: list[int]
    answer_ids: list[int]
    depth: float
    variant: int
    key: str
    distractors: tuple[tuple[str, str], ...] = ()


def _docstring_sentences(source: str) -> list[str]:
    """Prose sentences of the module, class and function docstrings of one source file."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    sentences = []
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        docstring = ast.get_docstring(node) if isinstance(node, nodes) else None
        for paragraph in re.split(r"\n\s*\n", docstring or ""):
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                if _PROSE_SENTENCE.fullmatch(sentence):
                    sentences.append(sentence)
    return sentences


@functools.cache
def stdlib_essay() -> str:
    """The essay haystack: docstring prose of the stdlib's top-level modules, offline.

    The module, class and function docstrings of every ``<stdlib>/*.py`` file (sorted by name)
    are split into sentences; plain sentences of 20-200 characters ending in a period are kept
    (code, doctests and markup are dropped) and joined with spaces. About 280 KB on 3.11.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sentences = []
    for path in sorted(root.glob("*.py")):
        sentences += _docstring_sentences(path.read_text(encoding="utf-8", errors="replace"))
    return " ".join(sentences)


@functools.lru_cache(maxsize=8)
def _haystack_words(text: str) -> tuple[tuple[str, ...], frozenset[int], tuple[int, ...]]:
    """(words, indices of the words that start a sentence, the same sorted)."""
    words = tuple(text.split())
    if not words:
        raise ValueError("haystack: expected text with at least one word")
    starts = [0] + [i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "!", "?"))]
    return words, frozenset(starts), tuple(starts)


def _boundaries(words: Sequence[str], starts: frozenset[int], first: int, count: int) -> list[int]:
    """Where a needle may go in ``count`` words from word ``first`` (wrapping): the offsets
    j in [0, count] of the sentence starts (offset ``count`` only if a sentence starts after
    the run; offset 0 always does)."""
    return [j for j in range(count + 1) if (first + j) % len(words) in starts]


def _context(
    words: Sequence[str],
    starts: frozenset[int],
    first: int,
    count: int,
    needles: Sequence[tuple[float, str]],
) -> str:
    """``count`` haystack words from word ``first`` (wrapping), the needles inserted by depth.

    ``needles`` are (depth, text), the queried one first: each goes before the sentence start
    nearest to word ``depth * count`` (the first on a tie) that no earlier needle took; once
    every boundary is taken the rest share the nearest one (`make_niah_example` rejects such a
    haystack, it only sizes with it).
    """
    boundaries = _boundaries(words, starts, first, count)
    at: dict[int, list[str]] = {}
    for depth, needle in needles:
        free = [j for j in boundaries if j not in at] or boundaries
        cut = min(free, key=lambda j: abs(j - depth * count))
        at.setdefault(cut, []).append(needle)
    chosen = [words[(first + j) % len(words)] for j in range(count)]
    parts = []
    for j in range(count + 1):
        parts += at.get(j, [])
        if j < count:
            parts.append(chosen[j])
    return " ".join(parts)


def _largest_fitting(fits: Callable[[int], bool], guess: int, limit: int) -> int:
    """Largest n in [0, limit] with fits(n), fits being true up to some n; -1 if not fits(0)."""
    if not fits(0):
        return -1
    low, high = 0, None  # fits(low) holds; fits(high) fails
    n = max(1, min(guess, limit))
    while high is None:
        if fits(n):
            low = n
            if n == limit:
                return n
            n = min(2 * n, limit)
        else:
            high = n
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _draw_distinct(draw: Callable[[], str], taken: set[str]) -> str:
    """``draw()`` until it gives a string not in ``taken``; adds it there."""
    while (drawn := draw()) in taken:
        pass
    taken.add(drawn)
    return drawn


def make_niah_example(
    tokenizer: _Encoder,
    *,
    variant: int,
    length: int,
    depth: float,
    seed: int,
    haystack: str | None = None,
    num_needles: int = 1,
) -> NIAHExample:
    """One S-NIAH example of ``length`` tokens (prompt and answer), a function of its arguments.

    Args:
        tokenizer: anything with ``encode(str) -> list[int]`` (specials it adds are counted).
        variant: 1, 2 or 3 (see the module docstring).
        length: target number of tokens of prompt + answer; the result has between
            ``length`` minus one word's tokens and ``length``.
        depth: the queried needle's position as a fraction of the haystack, in [0, 1].
        seed: non-negative; picks keys, values, the distractors' depths and the haystack's
            first sentence.
        haystack: text to hide the needles in, instead of the variant's default.
        num_needles: K >= 1 needles with distinct keys and values, each at its own sentence
            boundary; the question asks for the one at ``depth`` (1: S-NIAH, K > 1: multi-key,
            see the module docstring).

    Raises:
        ValueError: a bad variant, depth, seed, num_needles or haystack, or a length too small
            for the prompt with its needles and the haystack words that give every needle its
            own sentence boundary (none for one needle).
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant: expected 1, 2 or 3, got {variant!r}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], got {depth}")
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed}")
    max_needles = len(_ADJECTIVES) * len(_NOUNS)  # one key each
    if (
        isinstance(num_needles, bool)
        or not isinstance(num_needles, int)
        or not 1 <= num_needles <= max_needles
    ):
        raise ValueError(f"num_needles: expected an int in [1, {max_needles}], got {num_needles!r}")
    spec = _VARIANTS[variant]
    if haystack is None:
        haystack = stdlib_essay() if spec.essay else NOISE_HAYSTACK
    words, starts, start_list = _haystack_words(haystack)

    # The single-needle draws come first, so one needle gives the examples it always gave.
    rng = random.Random(seed)
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    answer = spec.make_value(rng)
    first = rng.choice(start_list)
    keys, values = {key}, {answer}
    distractors = []  # (key, value), each unlike the queried pair and the other distractors
    for _ in range(num_needles - 1):
        other_key = _draw_distinct(lambda: f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}", keys)
        distractors.append((other_key, _draw_distinct(lambda: spec.make_value(rng), values)))
    needles = [(depth, _NEEDLE.format(kind=spec.kind, key=key, value=answer))]
    needles += [
        (rng.random(), _NEEDLE.format(kind=spec.kind, key=k, value=v)) for k, v in distractors
    ]
    header = _HEADER.format(kind=spec.kind)
    question = _QUESTION.format(kind=spec.kind, key=key)
    answer_ids = list(tokenizer.encode(" " + answer))

    def prompt(count: int) -> str:
        return header + _context(words, starts, first, count, needles) + question

    def fits(count: int) -> bool:
        return len(tokenizer.encode(prompt(count))) + len(answer_ids) <= length

    # The shortest haystack with a sentence boundary per needle: the offset of the K-th
    # sentence start from word ``first`` (0 for one needle: word ``first`` starts one).
    enough, seen = -1, 0
    while seen < num_needles:
        enough += 1
        seen += (first + enough) % len(words) in starts
    # Every word costs at least one token for the tokenizers in use; the limit guards the rest.
    count = _largest_fitting(fits, guess=length // 8, limit=16 * length)
    if count < enough:
        minimum = len(tokenizer.encode(prompt(enough))) + len(answer_ids)
        needles_note = f" with num_needles={num_needles}" if num_needles > 1 else ""
        raise ValueError(
            f"length: expected at least {minimum} tokens for variant {variant}{needles_note}, "
            f"got {length}"
        )
    text = prompt(count)
    return NIAHExample(
        prompt=text,
        answer=answer,
        input_ids=list(tokenizer.encode(text)),
        answer_ids=answer_ids,
        depth=depth,
        variant=variant,
        key=key,
        distractors=tuple(distractors),
    )


def depth_grid(n: int) -> list[float]:
    """``n`` evenly spaced needle depths from 0 to 1 inclusive; ``[0.5]`` for n = 1."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    if n == 1:
        return [0.5]
    return [i / (n - 1) for i in range(n)]


def niah_dataset(
    tokenizer: _Encoder,
    *,
    variant: int,
    length: int,
    num_examples: int,
    seed: int,
    depths: Sequence[float] | None = None,
    haystack: str | None = None,
    num_needles: int | Sequence[int] = 1,
) -> list[NIAHExample]:
    """``num_examples`` examples; example i uses seed ``fold_seed(seed, i)``.

    Args:
        tokenizer, variant, length, haystack: as in `make_niah_example`.
        num_examples: >= 1.
        seed: non-negative.
        depths: example i gets ``depths[i % len(depths)]``; default ``depth_grid(num_examples)``.
        num_needles: as in `make_niah_example`, or a mixture: example i gets
            ``num_needles[i % len(num_needles)]`` needles (as MQAR's mixture of pair counts:
            examples with fewer needles teach the retrieval, those with more the discrimination).
    """
    if num_examples < 1:
        raise ValueError(f"num_examples: expected >= 1, got {num_examples}")
    depths = depth_grid(num_examples) if depths is None else list(depths)
    if not depths:
        raise ValueError("depths: expected at least one depth")
    counts = [num_needles] if isinstance(num_needles, int) else list(num_needles)
    if not counts:
        raise ValueError("num_needles: expected an int or a non-empty list of them")
    return [
        make_niah_example(
            tokenizer,
            variant=variant,
            length=length,
            depth=depths[i % len(depths)],
            seed=fold_seed(seed, i),
            haystack=haystack,
            num_needles=counts[i % len(counts)],
        )
        for i in range(num_examples)
    ]


# The text a task's BPE learns from: examples of one generator seed (no training or evaluation
# example is drawn from it; their seeds fold the run's seed), long enough to see every haystack
# sentence, key word and template word many times.
TOKENIZER_TEXT_SEED = 987_654_321
TOKENIZER_TEXT_EXAMPLES = 400
TOKENIZER_TEXT_LENGTH = 2048


def niah_tokenizer(
    *,
    variant: int,
    vocab_size: int = 1024,
    haystack: str | None = None,
) -> BPETokenizer:
    """A byte-level BPE trained on S-NIAH text of this kind, with every digit its own token.

    The prompt's words (header, question, haystack sentences, the keys' adjectives and nouns)
    become a token or a few each, so an example of T tokens holds about 4x the text a
    byte-level one does (a 4-needle variant-1 prompt fits in 256 tokens instead of ~600), while
    values stay digit by digit (UUIDs: digits split, letter runs merged where frequent). The
    text is single-needle examples whatever the run's needle count, so runs with 1, K or a
    mixture of needles share one tokenizer, and the same arguments give the same tokenizer (its
    fingerprint) on every call.

    Args:
        variant, haystack: the examples' kind, as in `make_niah_example`.
        vocab_size: the most tokens (the text allows about 700 for the noise haystack).
    """
    examples = niah_dataset(
        ByteTokenizer(),
        variant=variant,
        length=TOKENIZER_TEXT_LENGTH,
        num_examples=TOKENIZER_TEXT_EXAMPLES,
        seed=TOKENIZER_TEXT_SEED,
        haystack=haystack,
    )
    texts = [example.prompt + " " + example.answer for example in examples]
    return BPETokenizer.train(texts, vocab_size, split_digits=True)


def niah_training_batch(
    examples: Sequence[NIAHExample],
    pad_id: int,
    eos_id: int | None = None,
    train_on_prompt: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded batch for a causal LM that shifts labels internally (Hugging Face style).

    Row i is ``input_ids + answer_ids (+ [eos_id])``; labels equal the tokens on the answer
    (and eos) positions and -100 on the prompt and padding, so the loss
    ``cross_entropy(logits[:, :-1], labels[:, 1:])`` trains only the answer. With
    ``train_on_prompt`` the prompt's tokens are labelled too (language-modelling loss on the
    whole example).

    Args:
        examples: at least one.
        pad_id: token of the padding positions.
        eos_id: if given, appended after the answer and trained too.
        train_on_prompt: also train the prompt tokens.
    Returns: ``input_ids`` [N, T], ``labels`` [N, T], ``attention_mask`` [N, T] (1 = real token),
        all int64, T the longest row.
    """
    if not examples:
        raise ValueError("examples: expected at least one NIAHExample")
    tail = [] if eos_id is None else [eos_id]
    rows = [(e.input_ids, e.answer_ids + tail) for e in examples]
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [N, T]
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # [N, T]
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)  # [N, T]
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        start = 0 if train_on_prompt else len(prompt)
        labels[i, start:n] = input_ids[i, start:n]
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def score_exact_match(generated: str, answer: str) -> bool:
    """Whether the answer appears in the generation as a whole token (case-insensitive).

    RULER's ``string_match`` checks ``answer.lower() in generated.lower()``; here the match
    must also not touch a letter or digit on either side, so "12345678" does not count as
    "1234567". Both strings are stripped first.

    Raises:
        ValueError: an empty answer.
    """
    answer = answer.strip().lower()
    if not answer:
        raise ValueError("answer: expected a non-empty string")
    pattern = rf"(?<![0-9a-z]){re.escape(answer)}(?![0-9a-z])"
    return re.search(pattern, generated.strip().lower()) is not None
