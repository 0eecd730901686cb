"""Normalisation layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned scale.

    Computed in fp32 for fp32 and lower precisions, in float64 for float64 inputs; the output
    has the input's dtype.

    Args:
        dim: size of the last dim.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or float64 for float64
        y = x.to(dtype)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dtype)).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm(x) ⊙ SiLU(gate): the output norm with an output gate of gated linear RNNs."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x) * F.silu(gate)
