"""Constants and seed derivation shared by the task modules."""

from __future__ import annotations

import numpy as np

# Label of positions that carry no loss (PyTorch cross_entropy's default ignore_index).
IGNORE_INDEX = -100


def fold_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative ints with NumPy's SeedSequence hashing.

    Distinct ``parts`` give unrelated streams, e.g. ``fold_seed(seed, 0, i)`` for training
    example i and ``fold_seed(seed, 1, i)`` for test example i.

    Raises:
        ValueError: a negative part.
    """
    if any(part < 0 for part in parts):
        raise ValueError(f"seed: expected non-negative integers, got {parts}")
    state = np.random.SeedSequence([int(part) for part in parts]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)
