"""Short causal depthwise convolution with an exact streaming state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConvolution(nn.Module):
    """Causal depthwise Conv1d over time followed by SiLU, as in fla's ShortConvolution.

    Args:
        dim: channels.
        kernel_size: taps; the state carried between calls is the last kernel_size - 1 inputs.
    """

    SHIFTED_SUM_MAX_TOKENS = 8  # below this many tokens, skip F.conv1d (see forward)

    def __init__(self, dim: int, kernel_size: int = 4):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim))
        with torch.no_grad():
            for name, value in self.initial_parameters().items():
                getattr(self, name).copy_(value)

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Fresh initial values of the parameters: Conv1d's default weight init, zero bias."""
        weight = torch.empty_like(self.weight, device="cpu")
        nn.init.kaiming_uniform_(weight, a=5**0.5)
        return {"weight": weight, "bias": torch.zeros_like(self.bias, device="cpu")}

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D]; state: [B, K - 1, D] inputs before x (None: zeros).

        Returns (y [B, T, D], the new state [B, K - 1, D]).
        """
        B, _, D = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, D)
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K - 1 + T, D]
        T = x.shape[1]
        weight, bias = self.weight.to(x.dtype), self.bias.to(x.dtype)
        if T <= self.SHIFTED_SUM_MAX_TOKENS:
            # y_t = bias + Σ_j w_j x_{t + j}: for a few tokens (decoding) K multiply-adds cost
            # less than a oneDNN convolution call
            y = bias + xs[:, K - 1 :] * weight[:, 0, K - 1]
            for j in range(K - 1):
                y = y + xs[:, j : j + T] * weight[:, 0, j]
        else:
            y = F.conv1d(xs.transpose(1, 2), weight, bias, groups=D).transpose(1, 2)
        return F.silu(y), xs[:, xs.shape[1] - (K - 1) :]
