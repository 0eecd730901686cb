"""Segmentations of a token stream into Memory Caching segments."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


def log_segments(T: int) -> list[int]:
    """Binary decomposition of T, largest segment first: 37 -> [32, 4, 1]."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive int, got {T!r}")
    return [1 << i for i in reversed(range(T.bit_length())) if T >> i & 1]


@dataclass(frozen=True)
class SegmentPlan:
    """Where segments start in a stream: every ``size`` tokens, or after each of ``lengths``.

    Constant plans go on forever (the last segment of a sequence may be shorter); an explicit
    plan covers ``sum(lengths)`` tokens.
    """

    size: int | None = None
    lengths: tuple[int, ...] | None = None

    @classmethod
    def build(cls, T: int, segment_size: int | None, segments) -> SegmentPlan:
        """The plan of ``Caching``'s (checked) ``segment_size`` or ``segments`` (lengths, or
        "log": the binary decomposition of T)."""
        if segments is None:
            return cls(size=segment_size)
        return cls(lengths=tuple(log_segments(T) if segments == "log" else segments))

    @property
    def covered(self) -> int | None:
        """Number of tokens the plan covers (None: unbounded)."""
        return None if self.lengths is None else sum(self.lengths)

    def _starts(self) -> list[int]:
        return list(itertools.accumulate(self.lengths))[:-1]

    def starts_between(self, t0: int, t1: int) -> list[int]:
        """Positions p with t0 < p < t1 at which a new segment starts."""
        if self.size is not None:
            first = (t0 // self.size + 1) * self.size
            return list(range(first, t1, self.size))
        starts = self._starts()
        return starts[bisect.bisect_right(starts, t0) : bisect.bisect_left(starts, t1)]

    def pieces(self, t0: int, T: int) -> list[tuple[int, int]]:
        """Tokens t0..t0+T-1 cut at segment starts, as (start, end) offsets from t0."""
        if T == 1:
            # (no start lies strictly inside one token; said without reading t0, which a
            # decode step under torch.compile holds as a dynamic int: range() or bisect on it
            # would specialise the graph to every position)
            return [(0, 1)]
        bounds = [t0, *self.starts_between(t0, t0 + T), t0 + T]
        return [(a - t0, b - t0) for a, b in itertools.pairwise(bounds)]

    def is_start(self, p: int) -> bool:
        """Whether token p (0-based) is the first of a segment."""
        if self.size is not None:
            return p % self.size == 0
        # (comparisons, not a set lookup: hashing p would specialise a compiled decode step
        # to its position; compared, p != each start is one guard for every step inside a
        # segment)
        return p == 0 or any(p == start for start in self._starts())
