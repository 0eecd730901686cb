"""nn.Modules: token mixers and their building blocks."""

from growmem.layers.attention import Attention, AttentionLayerCache
from growmem.layers.config import MemoryConfig
from growmem.layers.conv import ShortConvolution
from growmem.layers.mc_attention import (
    MemoryCachingAttention,
    MemoryCachingLayerCache,
    RowGroup,
)
from growmem.layers.mlp import SwiGLU
from growmem.layers.norm import GatedRMSNorm, RMSNorm

__all__ = [
    "Attention",
    "AttentionLayerCache",
    "GatedRMSNorm",
    "MemoryCachingAttention",
    "MemoryCachingLayerCache",
    "MemoryConfig",
    "RMSNorm",
    "RowGroup",
    "ShortConvolution",
    "SwiGLU",
]
