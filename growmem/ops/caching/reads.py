"""Reads of cached matrix memories, with backwards that keep memory bounded.

Both functions compute, per token t, a weighted sum of cached memories applied to the query:
    y_t = Σ_i w_{t,i} S_i q_t
``mixed_read`` over all visible caches (grm, soup), ``sparse_read`` over a few selected ones
(ssc). Neither materialises per-token reads of every cache for the whole sequence: the mixed
read runs query span by query span and recomputes what its backward needs, and the sparse
read dispatches tokens to the caches they selected, as mixture-of-experts routing does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable


def _mixed_forward(Q, St, W, spans):
    """Σ_{i<n} W[t, i] St_i^T q_t per span (a, b, n): Q [B, H, T, Dk], St [B, H, N, Dk, Dv],
    W [B, H, T, N] -> [B, H, T, Dv]."""
    B, H, T, Dk = Q.shape
    Dv = St.shape[-1]
    out = Q.new_zeros(B, H, T, Dv)
    for a, b, n in spans:
        if n == 0:
            continue
        Qw = (W[:, :, a:b, :n, None] * Q[:, :, a:b, None, :]).reshape(B, H, b - a, n * Dk)
        out[:, :, a:b] = Qw @ St[:, :, :n].reshape(B, H, n * Dk, Dv)
    return out


def _mixed_backward(Q, St, W, spans, dout):
    """(dQ, dSt, dW) of _mixed_forward, rebuilding w ⊗ q span by span."""
    B, H, _, Dk = Q.shape
    Dv = St.shape[-1]
    dQ, dSt, dW = torch.zeros_like(Q), torch.zeros_like(St), torch.zeros_like(W)
    for a, b, n in spans:
        if n == 0:
            continue
        L = b - a
        St_n = St[:, :, :n].reshape(B, H, n * Dk, Dv)
        dQw = (dout[:, :, a:b] @ St_n.transpose(-1, -2)).view(B, H, L, n, Dk)
        q_span, w_span = Q[:, :, a:b], W[:, :, a:b, :n]
        dQ[:, :, a:b] = (dQw * w_span[..., None]).sum(-2)
        dW[:, :, a:b, :n] = (dQw * q_span[:, :, :, None, :]).sum(-1)
        Qw = (w_span[..., None] * q_span[:, :, :, None, :]).reshape(B, H, L, n * Dk)
        dSt[:, :, :n] += (Qw.transpose(-1, -2) @ dout[:, :, a:b]).view(B, H, n, Dk, Dv)
    return dQ, dSt, dW


class MixedRead(torch.autograd.Function):
    """y_t = Σ_{i < n(t)} w_{t,i} S_i q_t, one query span at a time.

    Inputs: Q [B, H, T, Dk]; St [B, H, N, Dk, Dv] (the cached states, transposed);
    W [B, H, T, N]; spans: list of (a, b, n): tokens a..b-1 read the first n caches.
    Output: [B, H, T, Dv].

    Writing Σ_i w_i S_i q as one matmul, (w ⊗ q) [L, n·Dk] @ St [n·Dk, Dv], lets BLAS do
    the reduction; the backward rebuilds w ⊗ q span by span instead of keeping it.
    """

    @staticmethod
    def forward(ctx, Q, St, W, spans):
        ctx.save_for_backward(Q, St, W)
        ctx.spans = spans
        return _mixed_forward(Q, St, W, spans)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        Q, St, W = ctx.saved_tensors
        return (*_mixed_backward(Q, St, W, ctx.spans, dout), None)


def mixed_read(Q, St, W, spans):
    """See MixedRead. Q [B, H, T, Dk], St [B, H, N, Dk, Dv], W [B, H, T, N] -> [B, H, T, Dv]."""
    return MixedRead.apply(Q, St, W, spans)


class SparseRead(torch.autograd.Function):
    """Routed reads: out[rows_m] += w_m (Q2[rows_m] @ St2[group_m]) for every routed pair m.

    Inputs: Q2 [R, Dk] query rows; St2 [G, Dk, Dv] caches (transposed states); w [M] weights
    and rows [M] query rows of the pairs, sorted by cache; group_ids, counts: Python lists
    giving each read cache and how many consecutive pairs read it. Output: [R, Dv].
    One matmul per read cache, so the cost follows the routed pairs only.
    """

    @staticmethod
    def forward(ctx, Q2, St2, w, rows, group_ids, counts):
        q_sel = Q2.index_select(0, rows)  # [M, Dk]
        reads = torch.cat(
            [q_g @ St2[gid] for q_g, gid in zip(q_sel.split(counts), group_ids, strict=True)]
        )  # [M, Dv]
        out = Q2.new_zeros(Q2.shape[0], St2.shape[-1]).index_add_(0, rows, reads * w[:, None])
        ctx.save_for_backward(q_sel, St2, w, rows, reads)
        ctx.group_ids, ctx.counts, ctx.n_rows = group_ids, counts, Q2.shape[0]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q_sel, St2, w, rows, reads = ctx.saved_tensors
        d_sel = dout.index_select(0, rows)  # [M, Dv]
        dw = (d_sel * reads).sum(-1)
        d_reads = d_sel * w[:, None]
        dSt2 = torch.zeros_like(St2)
        dq_parts = []
        for q_g, dr_g, gid in zip(
            q_sel.split(ctx.counts), d_reads.split(ctx.counts), ctx.group_ids, strict=True
        ):
            dq_parts.append(dr_g @ St2[gid].T)
            dSt2[gid] = q_g.T @ dr_g
        dQ2 = q_sel.new_zeros(ctx.n_rows, q_sel.shape[-1]).index_add_(0, rows, torch.cat(dq_parts))
        return dQ2, dSt2, dw, None, None, None


class Route(NamedTuple):
    """Routed (token, cache) pairs, grouped by cache as mixture-of-experts dispatch does.

    rows [M]: the query row of every pair in the flattened [B * H * T] tokens, sorted by
    cache; weights [M]: their weights; ids [G]: the read caches (flat index into
    [B * H * N]); counts: a list, how many consecutive pairs read each one.
    """

    rows: torch.Tensor
    weights: torch.Tensor
    ids: torch.Tensor
    counts: list[int]


def flat_cache_ids(idx: torch.Tensor, N: int) -> torch.Tensor:
    """idx [B, H, T, k] (cache per slot) -> the same caches as flat indices into [B * H * N]."""
    B, H = idx.shape[:2]
    return torch.arange(B * H, device=idx.device).view(B, H, 1, 1) * N + idx


def route(idx: torch.Tensor, w: torch.Tensor, valid: torch.Tensor | None, N: int) -> Route:
    """The pairs (token, selected cache) of the valid slots, sorted by cache (stable: ties
    keep token order). idx, w, valid: [B, H, T, k]; N: caches per batch row and head."""
    B, H, T, k = idx.shape
    bh = torch.arange(B * H, device=idx.device).view(B, H, 1, 1)
    token_rows = (bh * T + torch.arange(T, device=idx.device).view(1, 1, T, 1)).expand(B, H, T, k)
    groups = flat_cache_ids(idx, N).reshape(-1)
    if valid is not None:
        live = valid.reshape(-1)
        groups, token_rows, w = groups[live], token_rows.reshape(-1)[live], w.reshape(-1)[live]
    groups, order = groups.sort(stable=True)
    ids, counts = torch.unique_consecutive(groups, return_counts=True)
    return Route(token_rows.reshape(-1)[order], w.reshape(-1)[order], ids, counts.tolist())


def sparse_read(Q, St, idx, w, valid):
    """y[b, h, t] = Σ_j w[b, h, t, j] S_{idx[b, h, t, j]} q[b, h, t] over the valid slots j.

    Args:
        Q: [B, H, T, Dk]; St: [B, H, N, Dk, Dv] cached states (transposed);
        idx: [B, H, T, k] selected cache per slot; w: [B, H, T, k] weights;
        valid: [B, H, T, k] bool, False for empty slots (a token that sees fewer than k
            caches), which are not read; None when every slot is valid.

    Returns: [B, H, T, Dv]. Cost O(B·H·T·k·Dk·Dv): only the selected caches are read.
    """
    B, H, T, Dk = Q.shape
    N, Dv = St.shape[2], St.shape[-1]
    k = idx.shape[-1]
    St2 = St.reshape(B * H * N, Dk, Dv)
    if T * k <= N:
        # Few reads (decoding): gathering the selected caches costs less than routing.
        picked = St2[flat_cache_ids(idx, N).reshape(-1)].view(B, H, T, k, Dk, Dv)
        w = w if valid is None else w * valid
        mixed = (w[..., None, None] * picked).sum(3)  # [B, H, T, Dk, Dv]: Σ_j w_j S_j^T
        return (Q.unsqueeze(-2) @ mixed).squeeze(-2)
    r = route(idx, w, valid, N)
    if not r.counts:  # nothing routed: an empty batch
        return Q.new_zeros(B, H, T, Dv)
    out = SparseRead.apply(
        Q.reshape(B * H * T, Dk), St2, r.weights, r.rows, r.ids.tolist(), r.counts
    )
    return out.view(B, H, T, Dv)
