"""Stateless, shardable sampling of training items: the batch of a step is a pure function."""

from __future__ import annotations

import numpy as np
import torch

from growmem.tasks._common import fold_seed


class EpochSampler:
    """Walks one infinite sequence of item indices: epoch e is a permutation of all items
    drawn from (seed, e).

    Global batch ``step`` is the next ``world_size * batch_size`` entries; rank r takes
    entries ``[r * batch_size, (r + 1) * batch_size)`` of it. Hence the ranks' batches
    concatenated in rank order are ``indices_at(step, world_size * batch_size, seed=seed)``,
    ranks never share an entry, and resuming at step s (even with another world size of the
    same global batch) replays exactly the batches of an uninterrupted run.

    Args:
        num_items: items to sample from, >= 1.
    """

    def __init__(self, num_items: int):
        if num_items < 1:
            raise ValueError(f"num_items: expected >= 1, got {num_items}")
        self.num_items = num_items
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of one epoch; the two most recently drawn are kept."""
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) == 2:
                del self._orders[next(iter(self._orders))]
            generator = torch.Generator().manual_seed(fold_seed(seed, epoch))
            self._orders[key] = torch.randperm(self.num_items, generator=generator).numpy()
        return self._orders[key]

    def indices_at(
        self, step: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> np.ndarray:
        """[batch_size] int64 item indices of ``rank``'s batch at optimizer step ``step``.

        Args:
            step: optimizer step, >= 0.
            batch_size: items per rank, >= 1.
            seed: >= 0; the same seed gives the same order.
            rank: this process's rank in [0, world_size).
            world_size: number of data-parallel processes, >= 1.
        """
        for name, value, low in (
            ("step", step, 0),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("world_size", world_size, 1),
        ):
            if value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        first = (step * world_size + rank) * batch_size
        positions = np.arange(first, first + batch_size)  # [B] positions in the infinite order
        epochs, offsets = np.divmod(positions, self.num_items)
        indices = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            indices[here] = self._order(seed, int(epoch))[offsets[here]]
        return indices
