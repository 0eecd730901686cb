"""The streaming state of Memory Caching: what a layer keeps between calls."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from growmem.ops.caching.segments import SegmentPlan


@dataclass(frozen=True)
class CachingConfig:
    """Everything a cache must agree on with the call that continues it."""

    rule: str
    aggregation: str
    init: str
    summary: str
    top_k: int
    gate_scale: float
    plan: SegmentPlan
    batch_size: int
    num_heads: int
    key_dim: int
    value_dim: int

    def check_matches(self, other: CachingConfig) -> None:
        """Raise a ValueError naming every field in which ``other`` differs from self."""
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

    Attributes:
        config: the configuration the cache was built with.
        states: [B, N, H, Dv, Dk] final memories of the N finished segments (read-only).
        summaries: [B, N, H, Dk] their key summaries c_i (mean or sum of the segment's keys).
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
    online_state: torch.Tensor
    key_sum: torch.Tensor
    segment_tokens: int
    seen_tokens: int
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    initial_state: torch.Tensor | None = None

    @property
    def num_cached(self) -> int:
        """Number of finished (cached) segments."""
        return self.states.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        tensors = [self.states, self.summaries, self.online_state, self.key_sum]
        tensors += [*(self.prev_kv or ()), self.initial_state]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)
