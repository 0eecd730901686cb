"""Memory Caching: segment caches read by Residual, GRM, Memory Soup, SSC, Log-Linear++
or a uniform mean."""

from growmem.ops.caching.api import (
    AGGREGATIONS,
    INITS,
    SUMMARIES,
    check_caching_choices,
    memory_caching,
)
from growmem.ops.caching.cache import CachingConfig, MemoryCache
from growmem.ops.caching.naive import memory_caching_reference
from growmem.ops.caching.segments import SegmentPlan, log_segments

__all__ = [
    "AGGREGATIONS",
    "INITS",
    "SUMMARIES",
    "CachingConfig",
    "MemoryCache",
    "SegmentPlan",
    "check_caching_choices",
    "log_segments",
    "memory_caching",
    "memory_caching_reference",
]
