"""Pure tensor functions: the memory rules (reference and chunkwise) and Memory Caching."""

from growmem.ops.linear import linear_memory, linear_memory_reference

__all__ = ["linear_memory", "linear_memory_reference"]
