"""The channel mixer of Transformer++ blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from growmem.ops.checks import check_positive_int


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) ⊙ up(x)), without biases.

    Args:
        hidden_size: model width.
        intermediate_size: width of the gated hidden layer.
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("intermediate_size", intermediate_size)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, hidden] -> [B, T, hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
