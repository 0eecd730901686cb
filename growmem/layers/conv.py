"""Short causal depthwise convolution with an exact streaming state."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from growmem.ops.checks import check_values


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

    def initial_parameters(
        self, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh initial values of the parameters: Conv1d's default weight init, zero bias.

        Args:
            generator: a CPU generator to draw from (None: the global RNG).
        """
        weight = torch.empty_like(self.weight, device="cpu")
        nn.init.kaiming_uniform_(weight, a=5**0.5, generator=generator)
        return {"weight": weight, "bias": torch.zeros_like(self.bias, device="cpu")}

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D]; state: [B, K - 1, D] inputs before x (None: zeros).

        Returns (y [B, T, D], the new state [B, K - 1, D]).
        """
        B, T, D = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, D)
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # [B, K - 1 + T, D]
        # a copy (clone: with B = 1 the slice is already contiguous), not a view, which would
        # keep the whole [B, K - 1 + T, D] buffer alive in a cache
        new_state = xs[:, xs.shape[1] - (K - 1) :].clone()
        if T > 1 and not check_values((x,)):
            return self._forward_nonfinite(x, state), new_state
        return self._conv(xs, T), new_state

    def _conv(self, xs: torch.Tensor, T: int) -> torch.Tensor:
        """SiLU(causal conv) of the last T positions of xs [B, K - 1 + T, D]: [B, T, D]."""
        K, D = self.kernel_size, xs.shape[-1]
        weight, bias = self.weight.to(xs.dtype), self.bias.to(xs.dtype)
        if T <= self.SHIFTED_SUM_MAX_TOKENS:
            # y_t = bias + Σ_j w_j x_{t + j}: for a few tokens (decoding) K multiply-adds cost
            # less than a oneDNN convolution call
            y = bias + xs[:, K - 1 :] * weight[:, 0, K - 1]
            for j in range(K - 1):
                y = y + xs[:, j : j + T] * weight[:, 0, j]
        else:
            y = F.conv1d(xs.transpose(1, 2), weight, bias, groups=D).transpose(1, 2)
        return F.silu(y)

    def _forward_nonfinite(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The output when x holds NaN or inf: it is NaN exactly where its window reads one.

        The forward alone would be causal, but the backward of SiLU at a NaN output is NaN
        even for a zero gradient, and the transposed convolution would carry it to the
        gradients of earlier inputs. So the convolution runs on x with its non-finite entries
        zeroed, and the outputs whose window reads one are set to NaN afterwards (their
        gradient is 0).
        """
        K = self.kernel_size
        finite = torch.isfinite(x)  # [B, T, D]
        y = self._conv(
            torch.cat([state.to(x.dtype), torch.where(finite, x, 0.0)], dim=1), x.shape[1]
        )
        bad = F.pad((~finite).transpose(1, 2).to(x.dtype), (K - 1, 0))  # [B, D, K - 1 + T]
        reads_bad = F.max_pool1d(bad, K, stride=1).transpose(1, 2) > 0  # [B, T, D]
        return y.masked_fill(reads_bad, math.nan)
