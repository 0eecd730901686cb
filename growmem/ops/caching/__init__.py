"""Memory Caching: segment caches read by Residual, GRM, Memory Soup, SSC, Log-Linear++
or a uniform mean, over any memory backend (matrix and MLP memories)."""

from growmem.ops.caching.api import (
    AGGREGATIONS,
    INITS,
    SUMMARIES,
    check_caching_choices,
    memory_caching,
)
from growmem.ops.caching.backend import MemoryBackend, backend_for, register_backend
from growmem.ops.caching.cache import CachingConfig, MemoryCache
from growmem.ops.caching.naive import memory_caching_reference
from growmem.ops.caching.segments import SegmentPlan, log_segments
from growmem.ops.spec import Caching, DeepMemory, MatrixMemory, memory_spec

__all__ = [
    "AGGREGATIONS",
    "INITS",
    "SUMMARIES",
    "Caching",
    "CachingConfig",
    "DeepMemory",
    "MatrixMemory",
    "MemoryBackend",
    "MemoryCache",
    "SegmentPlan",
    "backend_for",
    "check_caching_choices",
    "log_segments",
    "memory_caching",
    "memory_caching_reference",
    "memory_spec",
    "register_backend",
]
