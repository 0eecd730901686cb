"""The S-NIAH prompt rules of growmem.tasks.niah's docstring, rebuilt independently: used to
check that an example is the longest that fits its length."""

from __future__ import annotations

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
