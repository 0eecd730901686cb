"""Weighted reads of many linear maps per token, with a backward that keeps memory bounded.

Memory Soup's second layer over deep memories, Σ_i γ_{t,i} W1^(i) h_t, is such a read. Work is
cut into blocks of maps so that temporaries stay near _BLOCK_ELEMENTS.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# elements of the largest [B, H, n_block, L, D] temporary of a block of maps (caches)
_BLOCK_ELEMENTS = 1 << 21


def blocks(n: int, per_cache: int) -> list[tuple[int, int]]:
    """Cache ranges [a, b) of at most _BLOCK_ELEMENTS // per_cache caches each."""
    size = max(1, _BLOCK_ELEMENTS // max(1, per_cache))  # per_cache = 0: an empty batch
    return [(a, min(a + size, n)) for a in range(0, n, size)]


class MixedLinearRead(torch.autograd.Function):
    """y_t = Σ_{i < n} w_{t,i} W_i x_t for the tokens a <= t < b of every span (a, b, n):
    x [B, H, T, Din], W [B, H, N, Dout, Din], w [B, H, T, N] -> [B, H, T, Dout].

    The maps of a block act as one: x [L, Din] @ [W_c; ...; W_d]^T [Din, nb·Dout] gives every
    product in token-major order, which is then weighted and summed; the backward runs the
    same two matmuls the other way round. Temporaries hold nb·Dout numbers per token: the
    cheaper order when Dout < Din (Memory Soup's second layer; reads.MixedRead weights the
    inputs instead). The backward recomputes the products for the weights' gradient.
    """

    @staticmethod
    def forward(ctx, x, W, w, spans):
        ctx.save_for_backward(x, W, w)
        ctx.spans = spans
        B, H, _, Din = x.shape
        Dout = W.shape[-2]
        out = x.new_zeros(B, H, x.shape[2], Dout)
        for a, b, n in spans:
            x_s = x[:, :, a:b]  # [B, H, L, Din]
            for c, d in blocks(n, B * H * (b - a) * Dout):
                Wb = W[:, :, c:d].reshape(B, H, (d - c) * Dout, Din)
                P = (x_s @ Wb.transpose(-1, -2)).view(B, H, b - a, d - c, Dout)
                out[:, :, a:b] += (P * w[:, :, a:b, c:d, None]).sum(-2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, W, w = ctx.saved_tensors
        B, H, _, Din = x.shape
        Dout = W.shape[-2]
        dx, dW, dw = torch.zeros_like(x), torch.zeros_like(W), torch.zeros_like(w)
        for a, b, n in ctx.spans:
            x_s, do = x[:, :, a:b], dout[:, :, a:b, None, :]  # [B, H, L, Din], [B, H, L, 1, Dout]
            for c, d in blocks(n, B * H * (b - a) * Dout):
                Wb = W[:, :, c:d].reshape(B, H, (d - c) * Dout, Din)
                P = (x_s @ Wb.transpose(-1, -2)).view(B, H, b - a, d - c, Dout)
                dw[:, :, a:b, c:d] = (P * do).sum(-1)
                dP = (w[:, :, a:b, c:d, None] * do).view(B, H, b - a, (d - c) * Dout)
                dx[:, :, a:b] += dP @ Wb
                dW[:, :, c:d] += (dP.transpose(-1, -2) @ x_s).view(B, H, d - c, Dout, Din)
        return dx, dW, dw, None


def mixed_linear_read(x, W, w, spans) -> torch.Tensor:
    """See MixedLinearRead: Σ_{i<n} w_i W_i x per span (a, b, n); x [B, H, T, Din],
    W [B, H, N, Dout, Din], w [B, H, T, N] -> [B, H, T, Dout]."""
    return MixedLinearRead.apply(x, W, w, spans)
