"""growmem: recurrent sequence models whose memory grows with the context (Memory Caching)."""

from growmem.ops import linear_memory

__version__ = "0.1.0"
__all__ = ["linear_memory"]
