"""The streaming state of Memory Caching: what a layer keeps between calls."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from growmem.ops.caching.segments import SegmentPlan


@dataclass(frozen=True)
class CachingConfig:
    """Everything a cache must agree on with the call that continues it."""

    rule: str
    aggregation: str
    init: str
    summary: str
    top_k: int | None  # None unless aggregation is ssc
    gate_scale: float
    plan: SegmentPlan
    batch_size: int
    num_heads: int
    key_dim: int
    value_dim: int

    def check_matches(self, other: CachingConfig) -> None:
        """Raise a ValueError naming every field in which ``other`` differs from self."""
        if self == other:
            return
        diffs = [
            f"{f.name}: cache has {getattr(self, f.name)!r}, call has {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]
        if diffs:
            raise ValueError("cache was built for another configuration: " + "; ".join(diffs))


@dataclass
class MemoryCache:
    """Per-layer Memory Caching state after ``seen_tokens`` tokens.

    Cached memories are kept transposed and heads-first, the layout their reads use, so a
    decode step never re-lays them out.

    Attributes:
        config: the configuration the cache was built with.
        states: [B, H, N, Dk, Dv] final memories S_i^T of the N finished segments.
        summaries: [B, H, N, Dk] their key summaries c_i (mean or sum of the segment's keys).
        state_sum: [B, H, Dk, Dv] Σ_i S_i^T over the cached memories (residual and mean read
            it instead of every cache).
        online_state: [B, H, Dv, Dk] the memory after the last seen token.
        key_sum: [B, H, Dk] sum of the keys of the current segment seen so far.
        segment_tokens: how many tokens of the current segment have been seen (>= 1 after a
            call; the segment is pushed to ``states`` when the next token starts a new one).
        seen_tokens: tokens consumed so far.
        prev_kv: swla only: (k [B, H, Dk], v [B, H, Dv]) of the last token, or None.
        initial_state: [B, H, Dv, Dk] or None (zeros): the state every segment starts from
            with init="independent" (and the first segment with "continuous").
    """

    config: CachingConfig
    states: torch.Tensor
    summaries: torch.Tensor
    state_sum: torch.Tensor
    online_state: torch.Tensor
    key_sum: torch.Tensor
    segment_tokens: int
    seen_tokens: int
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    initial_state: torch.Tensor | None = None

    def index_select(self, index: torch.Tensor) -> MemoryCache:
        """The cache of the batch rows ``index`` (a 1-D long tensor), e.g. to split a batch or
        to reorder beams."""

        def pick(x):
            return None if x is None else x.index_select(0, index)

        return replace(
            self,
            config=replace(self.config, batch_size=int(index.numel())),
            states=pick(self.states),
            summaries=pick(self.summaries),
            state_sum=pick(self.state_sum),
            online_state=pick(self.online_state),
            key_sum=pick(self.key_sum),
            prev_kv=None if self.prev_kv is None else tuple(pick(x) for x in self.prev_kv),
            initial_state=pick(self.initial_state),
        )

    @property
    def num_cached(self) -> int:
        """Number of finished (cached) segments."""
        return self.states.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        tensors = [self.states, self.summaries, self.state_sum, self.online_state, self.key_sum]
        tensors += [*(self.prev_kv or ()), self.initial_state]
        # a tensor held twice (the online state is the initial state at a segment start)
        # counts once
        unique = {(t.data_ptr(), t.numel(), t.element_size()) for t in tensors if t is not None}
        return sum(numel * size for _, numel, size in unique)
