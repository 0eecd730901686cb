"""Model specs: a model named in a few characters, for the command line, the sweep and the docs.

    transformer                      every layer softmax attention (Transformer++)
    RULE                             a recurrent memory, no Memory Caching (gated_delta, titans)
    RULE+AGGREGATION                 with Memory Caching (gated_delta+grm, titans+ssc)
    RULE+AGGREGATION@SEGMENTS        and its segments: a length (gated_delta+grm@32), "log"
                                     (Log-Linear++'s logarithmic segments:
                                     gated_delta+loglinear@log) or lengths (swla+grm@8,8,16)

A spec sets the model's mixer and leaves every other setting to the config it is applied to
(``ModelSpec.apply``); without ``@SEGMENTS`` the config's segments stay.
"""

from __future__ import annotations

from dataclasses import dataclass

from growmem.ops.aggregations import AGGREGATIONS
from growmem.ops.checks import LINEAR_RULES
from growmem.ops.spec import DEEP_RULES

TRANSFORMER = "transformer"
MEMORY_RULES = (*LINEAR_RULES, *DEEP_RULES)
GRAMMAR = (
    f"'{TRANSFORMER}' or RULE[+AGGREGATION][@SEGMENTS] with RULE one of {list(MEMORY_RULES)}, "
    f"AGGREGATION one of {list(AGGREGATIONS)} (default none) and SEGMENTS a length, 'log' or "
    "lengths such as 8,8,16 (e.g. gated_delta+grm, titans+ssc@32, gated_delta+loglinear@log)"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        rule: the memory rule, or "transformer" (no memory layers).
        aggregation: the Memory Caching aggregation ("none": a plain recurrent memory).
        segments: None (keep the config's), a segment length, "log" or a tuple of lengths.
    """

    rule: str
    aggregation: str = "none"
    segments: int | str | tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """The spec written as ``text``.

        Raises:
            ValueError: ``text`` does not follow the grammar, naming the part that does not
                and listing the valid rules and aggregations.
        """
        if not isinstance(text, str):
            raise ValueError(f"a model spec is a string: {GRAMMAR}; got {text!r}")
        head, at, segments_text = text.strip().partition("@")
        rule, plus, aggregation = head.partition("+")
        if rule == TRANSFORMER:
            if plus or at:
                problem = "the transformer has no memory to cache or segment"
                raise ValueError(f"model spec {text!r}: {problem}; a model spec is {GRAMMAR}")
            return cls(TRANSFORMER)
        problem = None
        if rule not in MEMORY_RULES:
            problem = f"unknown rule {rule!r}"
        elif plus and aggregation not in AGGREGATIONS:
            problem = f"unknown aggregation {aggregation!r}"
        segments = None
        if at and problem is None:
            segments = _segments(segments_text)
            if segments is None:
                problem = f"segments {segments_text!r} are not a length, 'log' or lengths"
        if problem is not None:
            raise ValueError(f"model spec {text!r}: {problem}; a model spec is {GRAMMAR}")
        return cls(rule, aggregation if plus else "none", segments)

    def __str__(self) -> str:
        if self.rule == TRANSFORMER:
            return TRANSFORMER
        text = self.rule + ("" if self.aggregation == "none" else f"+{self.aggregation}")
        if self.segments is None:
            return text
        if isinstance(self.segments, tuple):
            return f"{text}@{','.join(map(str, self.segments))}"
        return f"{text}@{self.segments}"

    @property
    def slug(self) -> str:
        """The spec in a file name: gated_delta+grm@32 -> gated_delta_grm_32."""
        return "".join(c if c.isalnum() else "_" for c in str(self))

    def apply(self, model: dict) -> dict:
        """The model section (GrowMemConfig arguments, ``memory`` as a dict) ``model`` with this
        spec's mixer: ``memory`` None for the transformer, else its rule and aggregation (and
        segments, when the spec names them) written over the section's memory dict."""
        model = dict(model)
        if self.rule == TRANSFORMER:
            return {**model, "memory": None}
        memory = dict(model.get("memory") or {})
        caching = dict(memory.get("caching") or {})
        caching["aggregation"] = self.aggregation
        if isinstance(self.segments, int):
            caching.update(segment_size=self.segments, segments=None)
        elif self.segments is not None:  # "log" or lengths (a list, as YAML writes them)
            segments = self.segments if self.segments == "log" else list(self.segments)
            caching.update(segment_size=None, segments=segments)
        return {**model, "memory": {**memory, "rule": self.rule, "caching": caching}}


def _segments(text: str) -> int | str | tuple[int, ...] | None:
    """``text`` after the @ as a segment length, "log" or lengths; None if it is none of them."""
    if text == "log":
        return "log"
    parts = text.split(",")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    lengths = tuple(int(p) for p in parts)
    return lengths[0] if len(lengths) == 1 else lengths


def spec_of(config) -> ModelSpec:
    """The spec of a GrowMemConfig's mixer (its other settings are not part of a spec)."""
    if config.memory is None:
        return ModelSpec(TRANSFORMER)
    caching = config.memory.caching
    segments = caching.segment_size if caching.segments is None else caching.segments
    return ModelSpec(config.memory.rule, caching.aggregation, segments)
