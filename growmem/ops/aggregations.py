"""The aggregations of Memory Caching, each declared once with the properties the code asks.

docs/design.md §3.3 gives the equations. The fast paths, the API, the layer and the caches decide
what to compute from these properties, never from the aggregation's name; only the per-token
references (``naive.py``) spell each aggregation out on purpose, since they are the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Aggregation:
    """How a token combines its online memory with the cached segment memories.

    Attributes:
        name: the name users pass (``Caching.aggregation``).
        keeps_segments: finished segments are cached (false only for ``none``, the plain
            recurrent memory, which never reads a cache).
        gated: each read is weighted by a content gate γ from r = scale · <u_t, c_i>, so the
            gate queries ``u`` are needed.
        select: how a routed aggregation picks the few caches a token reads instead of every
            visible one: ``"top_k"`` (the ``Caching.top_k`` best-scored caches) or
            ``"log_buckets"`` (the binary decomposition of the visible caches, each bucket
            read through the memory at its end); None: every visible cache is read.
        mixes_parameters: the gates mix the memories' parameters into one memory that is then
            read (Memory Soup); on matrix memories this equals mixing the reads.
        uniform: for ungated reads, how the online output and the visible caches' outputs are
            combined: ``"sum"`` (residual) or ``"mean"``; None for gated ones.
        needs_continuous_init: each read memory must hold everything before it (Log-Linear++
            reads a bucket of segments through the memory at the bucket's end).
    """

    name: str
    keeps_segments: bool
    gated: bool
    select: Literal["top_k", "log_buckets"] | None = None
    mixes_parameters: bool = False
    uniform: Literal["sum", "mean"] | None = None
    needs_continuous_init: bool = False

    @property
    def routed(self) -> bool:
        """Only the selected caches are read (``select``), not every visible one."""
        return self.select is not None


TABLE: dict[str, Aggregation] = {
    a.name: a
    for a in (
        Aggregation("none", keeps_segments=False, gated=False),
        Aggregation("residual", keeps_segments=True, gated=False, uniform="sum"),
        Aggregation("grm", keeps_segments=True, gated=True),
        Aggregation("soup", keeps_segments=True, gated=True, mixes_parameters=True),
        Aggregation("ssc", keeps_segments=True, gated=True, select="top_k"),
        Aggregation(
            "loglinear",
            keeps_segments=True,
            gated=True,
            select="log_buckets",
            needs_continuous_init=True,
        ),
        Aggregation("mean", keeps_segments=True, gated=False, uniform="mean"),
    )
}
AGGREGATIONS = tuple(TABLE)  # the names, in the order users see them listed


def aggregation(name: str) -> Aggregation:
    """The declared aggregation ``name``; a ValueError lists the known ones otherwise."""
    if not isinstance(name, str) or name not in TABLE:
        raise ValueError(f"aggregation must be one of {list(AGGREGATIONS)}, got {name!r}")
    return TABLE[name]
