"""Deep memories: an MLP whose weights are the recurrent state (dla, titans)."""

from growmem.ops.deep.api import DEEP_RULES, deep_memory, mini_batch_lengths
from growmem.ops.deep.mlp import DeepState

__all__ = ["DEEP_RULES", "DeepState", "deep_memory", "mini_batch_lengths"]
