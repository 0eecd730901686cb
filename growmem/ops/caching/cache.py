"""The streaming state of Memory Caching: what a layer keeps between calls."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from growmem.ops.aggregations import Aggregation
from growmem.ops.aggregations import aggregation as lookup_aggregation
from growmem.ops.caching.backend import backend_for, iter_tensors, map_tensors
from growmem.ops.caching.segments import SegmentPlan


@dataclass(frozen=True)
class CachingConfig:
    """Everything a cache must agree on with the call that continues it (its fingerprint).

    memory: the memory object (MatrixMemory, DeepMemory: the rule and its knobs); aggregation,
    init, summary, gate_norm, detach_summaries: as in ``Caching``; top_k: ``Caching.top_k``
    where the aggregation selects the top k caches, else None (nothing reads it); gate_scale:
    the resolved scale; summary_keys: the summaries are of the ``summary_keys`` gate input,
    not of k; plan: the segmentation of the stream; the shapes; memory_sizes: the memory's own
    sizes (an MLP's hidden size); dtype: of the states (float32, or float64 for float64
    inputs).
    """

    memory: Any
    aggregation: str
    init: str
    summary: str
    top_k: int | None
    gate_scale: float
    gate_norm: str
    detach_summaries: bool
    summary_keys: bool
    plan: SegmentPlan
    batch_size: int
    num_heads: int
    key_dim: int
    value_dim: int
    memory_sizes: tuple
    dtype: torch.dtype

    @property
    def spec(self) -> Aggregation:
        """The declared properties of the aggregation (ops/aggregations.py)."""
        return lookup_aggregation(self.aggregation)

    def check_matches(self, other: CachingConfig) -> None:
        """Raise a ValueError naming every field in which ``other`` differs from self."""
        if self == other:
            return
        diffs = [
            f"{f.name}: cache has {getattr(self, f.name)!r}, call has {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        raise ValueError("cache was built for another configuration: " + "; ".join(diffs))


# the fields of the former per-memory caches, and where they went
_MOVED = {
    "states": "cached (the backend's stacked memories)",
    "state_sum": "cached.total (matrix memories)",
    "online_state": "online.state (matrix memories) or online.entry (MLP memories)",
    "last_state": "online.last (MLP memories)",
    "prev_kv": "online.prev_kv (matrix memories)",
}


@dataclass
class MemoryCache:
    """Per-layer Memory Caching state after ``seen_tokens`` tokens, for any memory backend
    (ops/caching/backend.py).

    Attributes:
        config: the configuration the cache was built with.
        cached: the N finished segments' final memories, stacked by the backend (matrix:
            MatrixCached(states [B, H, N, Dk, Dv], total [B, H, Dk, Dv]); MLP: DeepState(W1
            [B, H, N, Dv, Dh], W2 [B, H, N, Dh, Dk])).
        summaries: [B, H, N, Dk] their key summaries c_i (mean or sum of the segment's keys, or
            of its summary keys).
        online: the backend's stream state (matrix: MatrixOnline, the state after the last
            token and swla's last key and value; MLP: DeepOnline, the state at the last
            mini-batch boundary, after the last token, and the tokens after the boundary).
        key_sum: [B, H, Dk] sum of the keys (summary keys) of the current segment seen so far.
        segment_tokens: how many tokens of the current segment have been seen (>= 1 after a
            call; the segment joins ``cached`` when the next token starts a new one).
        seen_tokens: tokens consumed so far.
        initial_state: the stream's initial state, or None (the memory's default start): every
            segment starts from it with init="independent" (the first with "continuous").
    """

    config: CachingConfig
    cached: Any
    summaries: torch.Tensor
    online: Any
    key_sum: torch.Tensor
    segment_tokens: int
    seen_tokens: int
    initial_state: Any = None

    def __getattr__(self, name: str):
        # (only reached for a name the cache does not have)
        if name in _MOVED:
            raise AttributeError(f"MemoryCache.{name} is now MemoryCache.{_MOVED[name]}")
        raise AttributeError(f"'MemoryCache' object has no attribute {name!r}")

    def index_select(self, index: torch.Tensor) -> MemoryCache:
        """The cache of the batch rows ``index`` (a 1-D long tensor), e.g. to split a batch or
        to reorder beams."""
        changes = {
            f.name: map_tensors(getattr(self, f.name), lambda x: x.index_select(0, index))
            for f in fields(self)
            if f.name != "config"
        }
        return replace(self, config=replace(self.config, batch_size=int(index.numel())), **changes)

    @property
    def num_cached(self) -> int:
        """Number of finished (cached) segments."""
        return self.summaries.shape[2]

    @property
    def pending_tokens(self) -> int:
        """Tokens the next call recomputes before its own (an MLP memory's open mini-batch)."""
        pending = backend_for(self.config.memory).pending(self.online)
        return next(iter(pending.values())).shape[1] if pending else 0

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds."""
        return [t for f in fields(self) for t in iter_tensors(getattr(self, f.name))]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (a tensor held twice counts once: the online
        state is the initial state at a segment start)."""
        unique = {(t.data_ptr(), t.numel(), t.element_size()) for t in self.tensors()}
        return sum(numel * size for _, numel, size in unique)

    def cached_nbytes(self) -> int:
        """Bytes of the finished segments: their memories (``cached``) and key summaries; the
        rest of `nbytes` is the online state of the current segment."""
        tensors = [*iter_tensors(self.cached), *iter_tensors(self.summaries)]
        unique = {(t.data_ptr(), t.numel(), t.element_size()) for t in tensors}
        return sum(numel * size for _, numel, size in unique)
