"""Which cached segments a token reads: top-k for SSC, logarithmic buckets for Log-Linear++."""

from __future__ import annotations

import torch

from growmem.ops.caching.segments import log_segments


def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores along the last dim and their indices, ties to the lower index.

    ``torch.topk`` leaves the order of equal scores unspecified, so the parallel path, the
    reference and a decode step could pick different caches on a tie (segments of zero keys,
    say); a stable sort makes the choice one and the same everywhere.
    """
    top, idx = scores.sort(dim=-1, descending=True, stable=True)
    return top[..., :k], idx[..., :k]


def log_bucket_bounds(n: int) -> list[tuple[int, int]]:
    """Log-Linear++'s buckets of n finished segments, oldest first, as (start, end) segment
    indices (end exclusive): the binary decomposition of n, 11 -> [(0, 8), (8, 10), (10, 11)].
    """
    bounds, end = [], 0
    for size in log_segments(n) if n else []:
        bounds.append((end, end + size))
        end += size
    return bounds


def log_bucket_summaries(summaries: list, summary: str):
    """Log-Linear++'s buckets for one token, literally (the references' version of
    ``log_buckets`` and ``bucket_summaries``).

    Args:
        summaries: the cached segments' [B, H, Dk] summaries, oldest first (centred ones for
            gate_norm "centered"); summary: "mean" or "sum", how a bucket combines its
            segments'.

    Returns:
        the m buckets' [B, H, Dk] summaries, oldest first, and the cache each is read from
        (its last segment).
    """
    bounds = log_bucket_bounds(len(summaries))
    buckets = []
    for start, end in bounds:
        total = sum(summaries[start:end])
        buckets.append(total / (end - start) if summary == "mean" else total)
    return buckets, [end - 1 for _, end in bounds]


def log_buckets(n_seen: torch.Tensor, levels: int):
    """``log_bucket_bounds`` for many tokens at once, one slot per bucket size.

    Slot l holds the bucket of 2**l segments, present when bit l of n is set: segments
    [(n >> (l + 1)) << (l + 1), (n >> l) << l). For n = 11: slot 0 is (10, 11), slot 1
    (8, 10), slot 2 empty, slot 3 (0, 8).

    Args:
        n_seen: [T] int64, finished segments each token sees.
        levels: slots, at least ``int(n_seen.max()).bit_length()``.

    Returns:
        start, end: [T, levels] int64 segment indices (end exclusive; equal on empty slots);
        valid: [T, levels] bool, False on empty slots.
    """
    level = torch.arange(levels, device=n_seen.device)
    n = n_seen[:, None]
    end = (n >> level) << level
    start = (n >> (level + 1)) << (level + 1)
    return start, end, (n >> level) & 1 == 1


def bucket_summaries(cached: torch.Tensor, summary: str):
    """The summary of the one log bucket that ends at each cache, for all caches at once.

    Every bucket ``log_buckets`` hands a token ends at a segment e whose lowest set bit is
    its size (a Fenwick tree): the bucket ending at e (1-based) holds segments
    [e & (e - 1), e), and its slot reads cache e - 1. So N vectors serve every token.

    Args:
        cached: [B, H, N, Dk] the cached segments' summaries, oldest first; summary: "mean"
            or "sum", how a bucket combines its segments'.

    Returns:
        buckets [B, H, N, Dk] (index e - 1: the bucket ending at segment e) and their sizes
        [N] (int64).
    """
    N = cached.shape[2]
    end = torch.arange(1, N + 1, device=cached.device)
    start = end & (end - 1)
    prefix = torch.cat([torch.zeros_like(cached[:, :, :1]), cached.cumsum(2)], 2)
    sums = prefix[:, :, end] - prefix[:, :, start]  # [B, H, N, Dk]
    size = end - start
    return (sums / size[:, None].to(sums.dtype) if summary == "mean" else sums), size
