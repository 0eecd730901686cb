"""GrowMemCache: growmem's per-layer caches behind transformers' ``Cache`` interface."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from growmem.layers import AttentionLayerCache, MemoryCachingLayerCache

LayerCache = MemoryCachingLayerCache | AttentionLayerCache


class GrowMemCache(Cache):
    """The caches of every layer of a growmem model and the number of token slots they saw.

    Memory layers keep a ``MemoryCachingLayerCache`` (cached segment memories, online state,
    conv state), attention layers an ``AttentionLayerCache`` (keys and values). The adapter
    gives ``generate`` what it asks of a cache: the sequence length, batch reordering for
    beam search and batch expansion. Padding slots count in ``get_seq_length`` (as for
    transformers' own caches): it is the length of the attention mask seen so far.

    Args:
        num_layers: layers of the model.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.layers: list[LayerCache | None] = [None] * num_layers
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"GrowMemCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def batch_size(self) -> int:
        first = next((c for c in self.layers if c is not None), None)
        return 0 if first is None else first.batch_size

    def nbytes(self) -> int:
        """Bytes held by the tensors of every layer's cache."""
        return sum(c.nbytes() for c in self.layers if c is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (beam search; the batch may grow or shrink)."""
        self.layers = [None if c is None else c.reorder(beam_idx) for c in self.layers]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        index = torch.arange(self.batch_size).repeat_interleave(repeats)
        self.reorder_cache(index)

    def reset(self) -> None:
        self.layers = [None] * len(self.layers)
        self.seen_tokens = 0

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "GrowMemCache cannot be cropped: recurrent memories cannot forget tokens "
            "(assisted and prompt-lookup decoding need cropping)"
        )
