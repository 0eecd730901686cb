"""Pure tensor functions: the memory rules (reference and chunkwise) and Memory Caching."""

from growmem.ops.caching import MemoryCache, log_segments, memory_caching
from growmem.ops.deep import DeepState, deep_memory
from growmem.ops.linear import linear_memory, linear_memory_reference
from growmem.ops.spec import Caching, DeepMemory, MatrixMemory, memory_spec

__all__ = [
    "Caching",
    "DeepMemory",
    "DeepState",
    "MatrixMemory",
    "MemoryCache",
    "deep_memory",
    "linear_memory",
    "linear_memory_reference",
    "log_segments",
    "memory_caching",
    "memory_spec",
]
