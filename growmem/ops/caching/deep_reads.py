"""Reads of cached MLP memories: every visible one (grm, residual, mean), with a backward that
keeps memory bounded, and a few routed ones (ssc, loglinear).

For one piece of L query tokens and the n caches it sees:

    y_t = Σ_i w_{t,i} M_i(q_t),   M_i(x) = x + N(W1_i σ(W2_i x))

costs n·L·Dh activations per piece, as much as attention's scores over the same context, so
they are not kept: ``CachedMLPRead`` saves only its inputs and recomputes the activations in
its backward, cache block by cache block (temporaries bounded as in ops/deep/mixed.py). Compared
with activation checkpointing of the autograd graph, it runs no graph and fuses GELU's
backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from growmem.ops.caching.reads import flat_cache_ids, route
from growmem.ops.deep.mixed import blocks
from growmem.ops.deep.mlp import DeepState, gelu, layer_norm, layer_norm_backward


def _activations(q, W1, W2, norm, eps):
    """z [B, H, n, L, Dh], h = σ(z), out = N(h W1^T) [B, H, n, L, Dv] and LayerNorm's rstd."""
    z = q.unsqueeze(2) @ W2.transpose(-1, -2)  # [B, H, n, L, Dh]
    h = gelu(z)
    y = h @ W1.transpose(-1, -2)  # [B, H, n, L, Dv]
    out, rstd = layer_norm(y, eps) if norm else (y, None)
    return z, h, out, rstd


class CachedMLPRead(torch.autograd.Function):
    """y_t = Σ_{i < n} w_{t,i} M_i(q_t) for the tokens a <= t < b of every span (a, b, n):
    q [B, H, T, D], W1 [B, H, N, Dv, Dh], W2 [B, H, N, Dh, Dk], w [B, H, T, N] ->
    [B, H, T, Dv] (0 outside the spans). Saves only the inputs (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, W1, W2, w, spans, norm, eps):
        ctx.save_for_backward(q, W1, W2, w)
        ctx.spans, ctx.norm, ctx.eps = spans, norm, eps
        out = torch.zeros_like(q)
        for a, b, n in spans:
            q_s, w_s = q[:, :, a:b], w[:, :, a:b, :n]  # [B, H, L, D], [B, H, L, n]
            wT = w_s.transpose(-1, -2).unsqueeze(-1)  # [B, H, n, L, 1]
            acc = w_s.sum(-1, keepdim=True) * q_s
            for c, d in blocks(n, q.shape[0] * q.shape[1] * (b - a) * W2.shape[3]):
                _, _, o, _ = _activations(q_s, W1[:, :, c:d], W2[:, :, c:d], norm, eps)
                acc += (o * wT[:, :, c:d]).sum(2)
            out[:, :, a:b] = acc
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, W1, W2, w = ctx.saved_tensors
        dq, dW1, dW2, dw = (torch.zeros_like(x) for x in (q, W1, W2, w))
        for a, b, n in ctx.spans:
            q_s, w_s, do_s = q[:, :, a:b], w[:, :, a:b, :n], dout[:, :, a:b]
            wT = w_s.transpose(-1, -2).unsqueeze(-1)  # [B, H, n, L, 1]
            dq_s = w_s.sum(-1, keepdim=True) * do_s
            dwT = torch.empty_like(wT)
            do_n = do_s.unsqueeze(2)  # [B, H, 1, L, Dv]
            for c, d in blocks(n, q.shape[0] * q.shape[1] * (b - a) * W2.shape[3]):
                W1b, W2b = W1[:, :, c:d], W2[:, :, c:d]
                z, h, o, rstd = _activations(q_s, W1b, W2b, ctx.norm, ctx.eps)
                dwT[:, :, c:d] = (o * do_n).sum(-1, keepdim=True)
                dn = wT[:, :, c:d] * do_n  # [B, H, nb, L, Dv]
                dy = layer_norm_backward(dn, o, rstd) if ctx.norm else dn
                dW1[:, :, c:d] += dy.transpose(-1, -2) @ h
                dz = torch.ops.aten.gelu_backward(dy @ W1b, z)  # [B, H, nb, L, Dh]
                dW2[:, :, c:d] += dz.transpose(-1, -2) @ q_s.unsqueeze(2)
                dq_s += (dz @ W2b).sum(2)
            dq[:, :, a:b] = dq_s
            dw[:, :, a:b, :n] = dwT.squeeze(-1).transpose(-1, -2) + (do_s * q_s).sum(
                -1, keepdim=True
            )
        return dq, dW1, dW2, dw, None, None, None


def cached_mlp_read(q, W1, W2, w, spans, norm: bool, eps: float) -> torch.Tensor:
    """See CachedMLPRead: Σ_{i<n} w_i M_{W^(i)}(q) per span (a, b, n); q [B, H, T, D];
    W1 [B, H, N, Dv, Dh]; W2 [B, H, N, Dh, Dk]; w [B, H, T, N] -> [B, H, T, Dv]."""
    return CachedMLPRead.apply(q, W1, W2, w, spans, norm, eps)


def routed_mlp_read(Q, cached: DeepState, idx, w, valid, norm: bool, eps: float) -> torch.Tensor:
    """y[b, h, t] = Σ_j w_j M_{W^(idx_j)}(q_t) over the valid slots j (ssc, loglinear): each
    selected cache evaluated once on the tokens that selected it (or gathered when there are
    few). Q [B, H, T, D]; cached W1 [B, H, N, Dv, Dh], W2 [B, H, N, Dh, Dk]; idx, w, valid
    [B, H, T, k] (valid None: every slot) -> [B, H, T, D]."""
    B, H, T, D = Q.shape
    N, k = cached.W1.shape[2], idx.shape[-1]
    W1f = cached.W1.reshape(B * H * N, *cached.W1.shape[3:])
    W2f = cached.W2.reshape(B * H * N, *cached.W2.shape[3:])
    if T * k <= N:  # decoding: gather the few selected memories
        w = w if valid is None else torch.where(valid, w, 0.0)
        ids = flat_cache_ids(idx, N).reshape(-1)
        w1 = W1f[ids].view(B, H, T, k, *W1f.shape[1:])
        w2 = W2f[ids].view(B, H, T, k, *W2f.shape[1:])
        z = Q[:, :, :, None, None, :] @ w2.transpose(-1, -2)  # [B, H, T, k, 1, Dh]
        y = gelu(z) @ w1.transpose(-1, -2)  # [B, H, T, k, 1, Dv]
        y = (layer_norm(y, eps)[0] if norm else y).squeeze(-2)
        return w.sum(-1, keepdim=True) * Q + (w.unsqueeze(-1) * y).sum(-2)
    r = route(idx, w, valid, N)
    if not r.counts:  # no token reads a cache (or an empty batch)
        return Q.new_zeros(B, H, T, D)
    q_sel = Q.reshape(B * H * T, D).index_select(0, r.rows)
    # one gather and unbind: indexing W1f[gid] per group would make autograd zero-fill and add
    # a gradient as large as all the caches for every group
    W1g, W2g = W1f.index_select(0, r.ids).unbind(0), W2f.index_select(0, r.ids).unbind(0)
    parts = []
    for q_g, w1, w2 in zip(q_sel.split(r.counts), W1g, W2g, strict=True):
        y = gelu(q_g @ w2.T) @ w1.T
        parts.append(layer_norm(y, eps)[0] if norm else y)
    reads = (torch.cat(parts) + q_sel) * r.weights[:, None]
    return Q.new_zeros(B * H * T, D).index_add(0, r.rows, reads).view(B, H, T, D)
