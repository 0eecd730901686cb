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
    size = max(1, _BLOCK_ELEMENTS // per_cache)
    return [(a, min(a + size, n)) for a in range(0, n, size)]


class MixedLinearRead(torch.autograd.Function):
    """y_t = Σ_{i < n} w_{t,i} W_i x_t for the tokens a <= t < b of every span (a, b, n):
    x [B, H, T, Din], W [B, H, N, Dout, Din], w [B, H, T, N] -> [B, H, T, Dout].

    Each cache's product W_i x is formed ([.., n, L, Dout]) and then weighted, so the
    temporaries hold n·Dout numbers per token: the cheaper order when Dout < Din (Memory
    Soup's second layer; reads.MixedRead weights the inputs instead). The backward recomputes
    the products for the weights' gradient.
    """

    @staticmethod
    def forward(ctx, x, W, w, spans):
        ctx.save_for_backward(x, W, w)
        ctx.spans = spans
        out = x.new_zeros(*x.shape[:-1], W.shape[-2])
        for a, b, n in spans:
            x_s = x[:, :, a:b].unsqueeze(2)  # [B, H, 1, L, Din]
            wT = w[:, :, a:b, :n].transpose(-1, -2).unsqueeze(-1)  # [B, H, n, L, 1]
            for c, d in blocks(n, x.shape[0] * x.shape[1] * (b - a) * W.shape[-2]):
                out[:, :, a:b] += ((x_s @ W[:, :, c:d].transpose(-1, -2)) * wT[:, :, c:d]).sum(2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, W, w = ctx.saved_tensors
        dx, dW, dw = torch.zeros_like(x), torch.zeros_like(W), torch.zeros_like(w)
        for a, b, n in ctx.spans:
            x_s, do_n = x[:, :, a:b].unsqueeze(2), dout[:, :, a:b].unsqueeze(2)
            wT = w[:, :, a:b, :n].transpose(-1, -2).unsqueeze(-1)  # [B, H, n, L, 1]
            dwT = torch.empty_like(wT)
            for c, d in blocks(n, x.shape[0] * x.shape[1] * (b - a) * W.shape[-2]):
                Wb = W[:, :, c:d]
                dwT[:, :, c:d] = ((x_s @ Wb.transpose(-1, -2)) * do_n).sum(-1, keepdim=True)
                dP = wT[:, :, c:d] * do_n  # [B, H, nb, L, Dout]
                dx[:, :, a:b] += (dP @ Wb).sum(2)
                dW[:, :, c:d] += dP.transpose(-1, -2) @ x_s
            dw[:, :, a:b, :n] = dwT.squeeze(-1).transpose(-1, -2)
        return dx, dW, dw, None


def mixed_linear_read(x, W, w, spans) -> torch.Tensor:
    """See MixedLinearRead: Σ_{i<n} w_i W_i x per span (a, b, n); x [B, H, T, Din],
    W [B, H, N, Dout, Din], w [B, H, T, N] -> [B, H, T, Dout]."""
    return MixedLinearRead.apply(x, W, w, spans)
