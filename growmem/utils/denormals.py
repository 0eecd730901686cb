"""Subnormal floats flushed to zero on the CPU while growmem trains or evaluates.

A decaying memory's chunkwise scan multiplies by exp(G_i - G_j), the decay between two tokens
of a chunk. Once the learned decays are strong, many of these factors fall below the smallest
normal float (about 1.2e-38 in float32), and x86 CPUs compute with such subnormal numbers many
times slower than with normal ones. Measured: a gated_delta model training on S-NIAH went from
about 9,300 to 3,300 tokens/s around step 400 as its decays grew (with another run
beside it); benchmarks/bench_denormals.py times a training step 1.5x slower with subnormals
than flushed on a model with strong decays at init, and the same at the default init
(results/denormals.json). Flushing (FTZ/DAZ, ``torch.set_flush_denormal``) reads and writes
them as zero: a value below 1e-38 next to the order-1 terms it is summed with changes nothing
a float32 result can hold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["denormals_flushed", "flushed_denormals"]


def denormals_flushed() -> bool:
    """Whether the CPU flushes subnormal floats to zero now (for the calling thread)."""
    tiny = torch.finfo(torch.float32).tiny  # the smallest normal float32
    return (torch.tensor([tiny]) * 0.25).item() == 0.0  # a subnormal result, or 0 when flushed


@contextmanager
def flushed_denormals() -> Iterator[bool]:
    """Run the block with subnormal floats flushed to zero on the CPU, then restore the mode
    found. Yields whether the CPU supports flushing (x86 with SSE3; elsewhere nothing changes).
    """
    before = denormals_flushed()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(before)
