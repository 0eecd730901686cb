"""The S-NIAH prompt rules of growmem.tasks.niah's docstring, rebuilt independently: used to
check that an example is the longest that fits its length, and that an example (one needle or
several) is what its seed's documented draws and the placement rules build."""

from __future__ import annotations

import random

QUESTION = "\nWhat is the special magic"


def grown_prompts(prompt: str, *, answer: str, key: str, kind: str, depth: float, haystack: str):
    """The prompts with one more haystack word than ``prompt``.

    From the documented rules: the haystack is a run of words of ``haystack`` that starts at a
    sentence (wrapping around the text), the needle goes before the sentence start nearest to
    word ``depth * count`` (the first on a tie; the end of the run counts only where a sentence
    starts after it). Asserts that these rules rebuild ``prompt`` itself, so the prompts
    returned are those the generator would have made one word longer (one per start of the
    run consistent with ``prompt``: a run can repeat in the text).

    Args:
        prompt: an example's prompt.
        answer, key, depth: the example's.
        kind: "number" or "uuid".
        haystack: the text the example's haystack was cut from.
    """
    header_end = prompt.index("\n") + 1
    question_start = prompt.rindex(QUESTION)
    header, middle, question = (
        prompt[:header_end],
        prompt[header_end:question_start],
        prompt[question_start:],
    )
    needle = f"One of the special magic {kind}s for {key} is: {answer}."
    before, after = middle.split(needle)
    run = before.split() + after.split()
    assert run, "the example has no haystack word: the rules cannot place the run"
    words = haystack.split()
    n = len(words)
    starts = {0} | {i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "!", "?"))}

    def build(first: int, count: int) -> str:
        chosen = [words[(first + j) % n] for j in range(count)]
        boundaries = [j for j in range(count + 1) if (first + j) % n in starts]
        cut = min(boundaries, key=lambda j: abs(j - depth * count))
        return header + " ".join([*chosen[:cut], needle, *chosen[cut:]]) + question

    head = run[:3]  # a cheap filter before rebuilding
    candidates = [
        f for f in sorted(starts) if [words[(f + j) % n] for j in range(len(head))] == head
    ]
    firsts = [f for f in candidates if build(f, len(run)) == prompt]
    assert firsts, "the documented rules do not rebuild the prompt"
    return [build(f, len(run) + 1) for f in firsts]


def run_boundaries(haystack: str, first: int, count: int) -> list[int]:
    """Where the rules may put a needle in the run of ``count`` words of ``haystack`` from word
    ``first`` (wrapping): the offsets j in [0, count] whose word starts a sentence."""
    words = haystack.split()
    starts = {0} | {i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "!", "?"))}
    return [j for j in range(count + 1) if (first + j) % len(words) in starts]


def haystack_count(prompt: str, num_needles: int) -> int:
    """Haystack words of a prompt (its middle's words less the needles' 10 each)."""
    middle = prompt[prompt.index("\n") + 1 : prompt.rindex(QUESTION)]
    return len(middle.split()) - 10 * num_needles  # "One of the ... for {key} is: {value}."


def seed_draws(seed: int, *, variant: int, num_needles: int, haystack: str):
    """The documented draws of an example's seed: the queried key, its value, the haystack's
    first sentence, then each distractor's key and value (redrawn until unlike the earlier
    ones), then the distractors' depths.

    Returns: (key, value, first word index, [(key, value, depth) of each distractor]).
    """
    from growmem.tasks.niah import _ADJECTIVES, _NOUNS, _VARIANTS

    make_value = _VARIANTS[variant].make_value
    words = haystack.split()
    starts = {0} | {i + 1 for i, w in enumerate(words[:-1]) if w.endswith((".", "!", "?"))}
    rng = random.Random(seed)

    def new_key():
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"

    key, value, first = new_key(), make_value(rng), rng.choice(sorted(starts))
    keys, values, others = [key], [value], []
    for _ in range(num_needles - 1):
        while (other_key := new_key()) in keys:
            pass
        while (other_value := make_value(rng)) in values:
            pass
        keys.append(other_key)
        values.append(other_value)
        others.append((other_key, other_value))
    return key, value, first, [(k, v, rng.random()) for k, v in others]


def multikey_prompts(
    prompt: str, *, seed: int, variant: int, num_needles: int, depth: float, haystack: str
) -> tuple[str, str]:
    """The prompt the documented rules give for a (multi-key) example's seed, with as many
    haystack words as ``prompt`` has, and the one with one word more.

    The rules: the seed's draws (`seed_draws`); the haystack is a run of words from the drawn
    first sentence (wrapping); the queried needle goes before the sentence start nearest to
    word ``depth * count``, then each distractor before the free sentence start nearest to its
    drawn depth (the first on a tie; the end of the run counts only where a sentence starts
    after it).
    """
    kind = "uuid" if variant == 3 else "number"
    key, value, first, others = seed_draws(
        seed, variant=variant, num_needles=num_needles, haystack=haystack
    )
    header = prompt[: prompt.index("\n") + 1]
    question = prompt[prompt.rindex(QUESTION) :]
    count = haystack_count(prompt, num_needles)
    words = haystack.split()
    n = len(words)
    needles = [(depth, key, value)] + [(d, k, v) for k, v, d in others]

    def build(count: int) -> str:
        boundaries = run_boundaries(haystack, first, count)
        cuts = {}
        for d, k, v in needles:
            free = [j for j in boundaries if j not in cuts]
            cuts[min(free, key=lambda j: abs(j - d * count))] = (
                f"One of the special magic {kind}s for {k} is: {v}."
            )
        out = []
        for j in range(count + 1):
            if j in cuts:
                out.append(cuts[j])
            if j < count:
                out.append(words[(first + j) % n])
        return header + " ".join(out) + question

    return build(count), build(count + 1)
