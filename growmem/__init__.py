"""growmem: recurrent sequence models whose memory grows with the context (Memory Caching).

Importing growmem registers its models with transformers' Auto classes.
"""

from growmem.models import GrowMemCache, GrowMemConfig, GrowMemForCausalLM, GrowMemModel
from growmem.ops import deep_memory, linear_memory, memory_caching
from growmem.ops.checks import debug_checks, set_debug_checks

__version__ = "0.1.0"
__all__ = [
    "GrowMemCache",
    "GrowMemConfig",
    "GrowMemForCausalLM",
    "GrowMemModel",
    "debug_checks",
    "deep_memory",
    "linear_memory",
    "memory_caching",
    "set_debug_checks",
]
