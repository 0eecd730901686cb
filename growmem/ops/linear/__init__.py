"""Linear-family memory rules: linear, decay, delta, gated_delta, swla."""

from growmem.ops.linear.api import linear_memory, segment_ends
from growmem.ops.linear.chunk import chunk_linear_memory
from growmem.ops.linear.naive import linear_memory_reference

__all__ = [
    "chunk_linear_memory",
    "linear_memory",
    "linear_memory_reference",
    "segment_ends",
]
