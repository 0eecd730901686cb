"""nn.Modules: token mixers and their building blocks."""

from growmem.layers.conv import ShortConvolution
from growmem.layers.mc_attention import (
    MemoryCachingAttention,
    MemoryCachingLayerCache,
    RowGroup,
)
from growmem.layers.norm import GatedRMSNorm, RMSNorm

__all__ = [
    "GatedRMSNorm",
    "MemoryCachingAttention",
    "MemoryCachingLayerCache",
    "RMSNorm",
    "RowGroup",
    "ShortConvolution",
]
