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
    dtype: torch.dtype  # of the states: float32, or float64 for float64 inputs
    # deep memories only: (mini_batch, norm, max_grad_norm, eps, decay_to, hidden dim of the MLP)
    deep: tuple | None = None

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
        changes = {
            f.name: map_tensors(getattr(self, f.name), lambda x: x.index_select(0, index))
            for f in fields(self)
            if f.name != "config"
        }
        return replace(self, config=replace(self.config, batch_size=int(index.numel())), **changes)

    @property
    def num_cached(self) -> int:
        """Number of finished (cached) segments."""
        return self.states.shape[2]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (a tensor held twice counts once: the online
        state is the initial state at a segment start)."""
        unique = {
            (t.data_ptr(), t.numel(), t.element_size())
            for f in fields(self)
            for t in _tensors(getattr(self, f.name))
        }
        return sum(numel * size for _, numel, size in unique)


@dataclass
class DeepMemoryCache(MemoryCache):
    """MemoryCache of a deep memory (dla, titans).

    ``states`` is a DeepState of the cached weights (W1 [B, H, N, Dv, Dh], W2 [B, H, N, Dh,
    Dk]); ``state_sum`` is None; ``online_state`` is the DeepState at the last mini-batch
    boundary, and ``pending`` holds the inputs of the tokens after it (fewer than a
    mini-batch, whose gradients are all taken at that boundary): a call recomputes them before
    its own tokens. ``last_state`` is the DeepState after the last token (the memory pushed to
    the caches when its segment closes).
    """

    pending: dict[str, torch.Tensor] | None = None
    last_state: object = None

    @property
    def num_cached(self) -> int:
        return self.states.W1.shape[2]

    @property
    def pending_tokens(self) -> int:
        return 0 if not self.pending else self.pending["k"].shape[1]


def _tensors(value):
    """The tensors in a cache field (a tensor, a tuple/NamedTuple or dict of them, or None)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for x in value:
            yield from _tensors(x)
    elif isinstance(value, dict):
        for x in value.values():
            yield from _tensors(x)


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to each of its tensors (structure kept)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(map_tensors(x, fn) for x in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(x, fn) for x in value)
    if isinstance(value, dict):
        return {n: map_tensors(x, fn) for n, x in value.items()}
    return value
