"""GrowMemCache: growmem's per-layer caches behind transformers' ``Cache`` interface."""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from growmem.layers import AttentionLayerCache, MemoryCachingLayerCache

LayerCache = MemoryCachingLayerCache | AttentionLayerCache

# The name under which the installed transformers carries the cache in model outputs (and
# passes it to forward during generate): "cache" since transformers 5.24, "past_key_values"
# before. Detected here, once; the models read and write the output field under this name.
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)


class GrowMemCache(Cache):
    """The caches of every layer of a growmem model and the number of token slots they saw.

    Memory layers keep a ``MemoryCachingLayerCache`` (cached segment memories, online state,
    conv state), attention layers an ``AttentionLayerCache`` (keys and values). The adapter
    gives ``generate`` what it asks of a cache: the sequence length, batch reordering for
    beam search and batch expansion. Padding slots count in ``get_seq_length`` (as for
    transformers' own caches): it is the length of the attention mask seen so far.

    A cache remembers what it was built for (layers, dtype of the hidden states, the model's
    configuration) and refuses to be continued by anything else (``check_compatible``). A cache
    created empty, ``GrowMemCache(num_layers)``, takes the dtype and configuration of the first
    model that uses it.

    Args:
        num_layers: layers of the model.
        dtype: dtype of the hidden states the cache continues (None: set on first use).
        fingerprint: the model's configuration values that shape its state (None: set on first
            use).
    """

    is_compileable = False
    # a recurrent memory cannot forget tokens: assisted decoding and rollbacks need cropping
    is_croppable = False

    def __init__(
        self,
        num_layers: int,
        dtype: torch.dtype | None = None,
        fingerprint: dict | None = None,
    ):
        super().__init__(layers=[])
        self.layers: list[LayerCache | None] = [None] * num_layers
        self.seen_tokens = 0
        self.dtype = dtype
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (
            f"GrowMemCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, "
            f"dtype={self.dtype})"
        )

    def check_compatible(self, num_layers: int, dtype: torch.dtype, fingerprint: dict) -> None:
        """Raise ValueError unless this cache can be continued by a model of ``num_layers``
        layers and configuration ``fingerprint`` with hidden states of ``dtype``; an empty
        cache without dtype or fingerprint takes the given ones."""
        if len(self.layers) != num_layers:
            raise ValueError(
                f"cache holds {len(self.layers)} layers, the model has {num_layers}: a cache "
                "can only be continued by the model that built it"
            )
        if self.dtype is None:
            self.dtype = dtype
        elif self.dtype != dtype:
            raise ValueError(
                f"cache was built with {self.dtype} hidden states, got {dtype} (convert the "
                "model before the prefill, not in the middle of a sequence)"
            )
        if self.fingerprint is None:
            self.fingerprint = dict(fingerprint)
        elif self.fingerprint != fingerprint:
            keys = sorted(set(self.fingerprint) | set(fingerprint))
            diff = ", ".join(
                f"{k}={self.fingerprint.get(k)!r} (model: {fingerprint.get(k)!r})"
                for k in keys
                if self.fingerprint.get(k) != fingerprint.get(k)
            )
            raise ValueError(f"cache was built by a model of another configuration: {diff}")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Token slots (padding included) the cache has seen; the same for every layer."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: no maximum (the memories have a fixed size, the attention caches grow)."""
        return -1

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def batch_size(self) -> int:
        """Rows of the cache (0 before the first forward)."""
        first = next((c for c in self.layers if c is not None), None)
        return 0 if first is None else first.batch_size

    def nbytes(self) -> int:
        """Bytes held by the tensors of every layer's cache."""
        return sum(c.nbytes() for c in self.layers if c is not None)

    def nbytes_by_part(self) -> dict[str, int]:
        """`nbytes` split by what the bytes hold: ``"cached_segments"``, the memories of the
        finished segments and their key summaries (what Memory Caching adds; it grows by one
        memory per segment); ``"online"``, the memory layers' state of the current segment
        (memory, key sum, convolution state: a fixed size); ``"attention"``, the keys and
        values of the attention layers (they grow by one slot per token). The parts sum to
        `nbytes`."""
        parts = {"cached_segments": 0, "online": 0, "attention": 0}
        for cache in self.layers:
            if isinstance(cache, AttentionLayerCache):
                parts["attention"] += cache.nbytes()
            elif cache is not None:
                cached = sum(g.memory.cached_nbytes() for g in cache.groups if g.memory)
                parts["cached_segments"] += cached
                parts["online"] += cache.nbytes() - cached
        return parts

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes row beam_idx[i] (beam search; the batch may grow or shrink)."""
        self.layers = [None if c is None else c.reorder(beam_idx) for c in self.layers]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` [n], in that order."""
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times in place: rows [a, b] become [a, a, b, b]."""
        self.reorder_cache(torch.arange(self.batch_size).repeat_interleave(repeats))

    def reset(self) -> None:
        """Forget every token (the cache stays bound to its model's dtype and configuration)."""
        self.layers = [None] * len(self.layers)
        self.seen_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' contract: ``crop(0)`` does nothing, ``crop(-n)`` removes the last n
        tokens. Removing tokens is refused: a recurrent memory cannot forget them (assisted
        and prompt-lookup decoding, which need it, check ``is_croppable`` first).

        Raises:
            TypeError: ``tokens_to_remove`` is not an int.
            ValueError: it is positive (transformers refuses that too).
            NotImplementedError: it is negative.
        """
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise TypeError(
                f"tokens_to_remove must be an int, got {type(tokens_to_remove).__name__}"
            )
        if tokens_to_remove > 0:
            raise ValueError(
                "tokens_to_remove must be 0 or negative (crop(-n) removes the last n tokens), "
                f"got {tokens_to_remove}"
            )
        if tokens_to_remove < 0:
            raise NotImplementedError(
                f"GrowMemCache cannot remove tokens (crop({tokens_to_remove})): a recurrent "
                "memory cannot forget tokens it has seen"
            )
