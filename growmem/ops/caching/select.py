"""Top-k selection of cached segments for Sparse Selective Caching."""

from __future__ import annotations

import torch


def select_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores along the last dim and their indices, ties to the lower index.

    ``torch.topk`` leaves the order of equal scores unspecified, so the parallel path, the
    reference and a decode step could pick different caches on a tie (segments of zero keys,
    say); a stable sort makes the choice one and the same everywhere.
    """
    top, idx = scores.sort(dim=-1, descending=True, stable=True)
    return top[..., :k], idx[..., :k]
