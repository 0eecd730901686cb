"""Per-token reference of Memory Caching over deep memories (dla, titans).

Literal docs/design.md §3.3 with the read convention of ops/deep/naive.py: the mini-batch
grid restarts at every segment start (segment ends are mini-batch ends); each cached memory is
an MLP evaluated on its own; soup mixes the *parameters* (the cached weights and the online
weights of token t) and reads the mix.
"""

from __future__ import annotations

import itertools

import torch

from growmem.ops.caching.select import log_bucket_scores, select_top_k
from growmem.ops.checks import check_values
from growmem.ops.deep.mlp import DeepState, decay_target, mlp_forward, start_state
from growmem.ops.deep.naive import token_step
from growmem.ops.nonfinite import NonFiniteGuard
from growmem.ops.precision import compute_dtype


def deep_memory_caching_reference(
    q,
    k,
    v,
    u,
    *,
    rule,
    eta,
    g,
    beta,
    init_weights,
    lengths,
    aggregation,
    top_k,
    init,
    summary,
    gate_scale,
    mini_batch,
    norm,
    max_grad_norm,
    eps,
    decay_to="init",
    initial_state=None,
):
    """Memory Caching over a deep memory, token by token; returns o [B, T, H, D].

    Non-finite inputs are handled as by the fast path (ops/nonfinite.py), so the two agree
    on them too."""
    B, T, H, _ = q.shape
    dtype = compute_dtype(q)
    writes = {"k": k, "v": v, "eta": eta, "g": g, "beta": beta}
    finite = check_values(tuple(x for x in (q, u, *writes.values()) if x is not None))
    guard = NonFiniteGuard({"q": q, "u": u}, writes, finite)
    q, k, v = (guard.reads["q"], guard.writes["k"], guard.writes["v"])
    eta, g, beta = (guard.writes.get(n) for n in ("eta", "g", "beta"))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    u = guard.reads.get("u")
    u = None if u is None else u.to(dtype)
    W1_0, W2_0, S1_0, S2_0 = start_state(init_weights, initial_state, rule, B, dtype)
    target = decay_target(rule, decay_to, init_weights, dtype)
    seg_starts = set(itertools.accumulate(lengths[:-1]))

    W1, W2, S1, S2 = W1_0, W2_0, S1_0, S2_0
    key_sum, count = q.new_zeros(B, H, q.shape[-1]), 0
    cached, cached_summaries, outputs = [], [], []
    for t in range(T):
        if t in seg_starts:
            cached.append((W1, W2))
            cached_summaries.append(key_sum / count if summary == "mean" else key_sum)
            key_sum, count = torch.zeros_like(key_sum), 0
            if init == "independent":
                W1, W2, S1, S2 = W1_0, W2_0, S1_0, S2_0
        if count % mini_batch == 0:  # the grid restarts at every segment start
            W1m, W2m = W1, W2
        W1, W2, S1, S2 = token_step(
            rule,
            DeepState(W1, W2, S1, S2),
            (W1m, W2m),
            t,
            k,
            v,
            eta,
            g,
            beta,
            norm,
            eps,
            max_grad_norm,
            target,
        )
        key_sum, count = key_sum + k[:, t], count + 1

        q_t = q[:, t, :, None, :]  # [B, H, 1, D]

        def read(w1, w2, q_t=q_t):
            return mlp_forward(q_t, w1, w2, norm, eps)[0][:, :, 0]  # [B, H, D]

        online = read(W1, W2)
        if aggregation == "none" or not cached:
            y = online
        elif aggregation in ("residual", "mean"):
            y = online + sum(read(*c) for c in cached)
            if aggregation == "mean":
                y = y / (len(cached) + 1)
        else:
            u_t = u[:, t] * gate_scale
            c_online = key_sum / count if summary == "mean" else key_sum
            r_online = (u_t * c_online).sum(-1)
            r_cached = torch.stack([(u_t * c).sum(-1) for c in cached_summaries], -1)
            read_from = cached  # the memories the weights go to
            if aggregation == "loglinear":  # buckets of segments, each read at its end
                r_cached, ends = log_bucket_scores(u_t, cached_summaries, summary)
                read_from = [cached[e] for e in ends]
            if aggregation == "ssc":
                r_cached, idx = select_top_k(r_cached, min(top_k, len(cached)))
            gamma = torch.softmax(torch.cat([r_cached, r_online[..., None]], -1), -1)
            weights = gamma[..., :-1]  # [B, H, k or n]
            if aggregation == "ssc":
                # one selected cache per (b, h) and slot: evaluate per slot with gathered weights
                w1_all = torch.stack([c[0] for c in cached], 2)  # [B, H, n, Dv, Dh]
                w2_all = torch.stack([c[1] for c in cached], 2)
                terms = []
                for j in range(weights.shape[-1]):
                    sel = idx[..., j][:, :, None, None, None]  # [B, H, 1, 1, 1]
                    w1, w2 = w1_all, w2_all
                    w1 = w1.gather(2, sel.expand(-1, -1, 1, *w1.shape[3:])).squeeze(2)
                    w2 = w2.gather(2, sel.expand(-1, -1, 1, *w2.shape[3:])).squeeze(2)
                    terms.append(weights[..., j, None] * read(w1, w2))
                y = sum(terms) + gamma[..., -1:] * online
            elif aggregation in ("grm", "loglinear"):
                y = sum(weights[..., i, None] * read(*c) for i, c in enumerate(read_from))
                y = y + gamma[..., -1:] * online
            else:  # soup: mix the parameters, then read the mix
                mix1 = sum(weights[..., i, None, None] * c[0] for i, c in enumerate(cached))
                mix2 = sum(weights[..., i, None, None] * c[1] for i, c in enumerate(cached))
                g_on = gamma[..., -1, None, None]
                y = read(mix1 + g_on * W1, mix2 + g_on * W2)
        outputs.append(y)
    return guard.output(torch.stack(outputs, dim=1))
