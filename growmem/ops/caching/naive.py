"""Per-token reference of Memory Caching over linear-family memories: the tests' ground truth.

It follows docs/design.md §3.3 literally, one token at a time: every cached memory is read
explicitly (no prefix sums, no routing), so it checks the fast path's shortcuts too.
"""

from __future__ import annotations

import itertools

import torch

from growmem.ops.caching.select import log_bucket_scores, select_top_k
from growmem.ops.linear.naive import linear_step
from growmem.ops.precision import compute_dtype


def memory_caching_reference(
    q,
    k,
    v,
    u,
    *,
    rule,
    gates,
    lengths,
    aggregation,
    top_k,
    init,
    summary,
    gate_scale,
    initial_state=None,
):
    """Memory Caching token by token.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] or None.
        rule: linear-family rule; gates: dict of its [B, T, H] gates.
        lengths: segment lengths, summing to T.
        aggregation: none, residual, grm, soup, ssc, loglinear or mean.
        top_k: caches ssc selects; init: continuous or independent; summary: mean or sum.
        gate_scale: factor of the gate scores r = gate_scale <u_t, c_i>.
        initial_state: [B, H, Dv, Dk] or None.

    Returns:
        o: [B, T, H, Dv] (float64 for float64 inputs, float32 otherwise).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = compute_dtype(q)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    u = None if u is None else u.to(dtype)
    gates = {n: x.to(dtype) for n, x in gates.items()}
    init_state = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state.to(dtype)
    starts = set(itertools.accumulate(lengths[:-1]))

    S, k_prev, v_prev = init_state, q.new_zeros(B, H, Dk), q.new_zeros(B, H, Dv)
    key_sum, count = q.new_zeros(B, H, Dk), 0
    cached, cached_summaries = [], []  # lists of [B, H, Dv, Dk] and [B, H, Dk]
    outputs = []
    for t in range(T):
        if t in starts:  # the previous segment is finished: cache it
            cached.append(S)
            cached_summaries.append(key_sum / count if summary == "mean" else key_sum)
            key_sum, count = torch.zeros_like(key_sum), 0
            if init == "independent":
                S, k_prev, v_prev = init_state, torch.zeros_like(k_prev), torch.zeros_like(v_prev)
        S = linear_step(
            rule, S, k[:, t], v[:, t], k_prev, v_prev, **{n: x[:, t] for n, x in gates.items()}
        )
        k_prev, v_prev = k[:, t], v[:, t]
        key_sum, count = key_sum + k[:, t], count + 1
        q_t = q[:, t]  # [B, H, Dk]
        online = torch.einsum("bhvk,bhk->bhv", S, q_t)
        reads = [torch.einsum("bhvk,bhk->bhv", S_i, q_t) for S_i in cached]  # M^(i)(q_t)
        if aggregation == "none" or not cached:
            y = online
        elif aggregation == "residual":
            y = online + sum(reads)
        elif aggregation == "mean":
            y = (online + sum(reads)) / (len(reads) + 1)
        else:
            u_t = u[:, t] * gate_scale
            c_online = key_sum / count if summary == "mean" else key_sum
            r_online = (u_t * c_online).sum(-1)  # [B, H]
            r_cached = torch.stack([(u_t * c).sum(-1) for c in cached_summaries], -1)  # [B, H, n]
            reads = torch.stack(reads, -2)  # [B, H, n, Dv]
            if aggregation == "loglinear":  # buckets of segments, each read at its end
                r_cached, ends = log_bucket_scores(u_t, cached_summaries, summary)
                reads = reads[:, :, ends]
            if aggregation == "ssc":
                top, idx = select_top_k(r_cached, min(top_k, len(cached)))
                reads = reads.gather(2, idx[..., None].expand(-1, -1, -1, Dv))
                r_cached = top
            gamma = torch.softmax(torch.cat([r_cached, r_online[..., None]], -1), -1)
            if aggregation == "soup":  # mix the memories' parameters, then read the mix
                mixed = sum(gamma[..., i, None, None] * S_i for i, S_i in enumerate(cached))
                mixed = mixed + gamma[..., -1, None, None] * S
                y = torch.einsum("bhvk,bhk->bhv", mixed, q_t)
            else:
                y = (gamma[..., :-1, None] * reads).sum(-2) + gamma[..., -1:] * online
        outputs.append(y)
    return torch.stack(outputs, dim=1)
