"""Memory Caching over deep memories (dla, titans): training and streaming in one algorithm.

As core.py, a call consumes T tokens after ``seen`` earlier ones, cut into pieces at segment
starts; the mini-batch grid restarts at every segment start, so segment ends are mini-batch
ends and the cached memories are the MLP weights there. One scan runs over all pieces (the
state transitions never read a cache), then every read is batched: the online memory's over
mini-batches, the cached memories' per piece (soup mixes both inside the MLP). Tokens after
the last mini-batch boundary are kept in the cache (``pending``) and recomputed by the next
call, since their gradients are all taken at that boundary.

Non-finite inputs stay causal (ops/nonfinite.py): the call runs on finite numbers, then
the outputs, the cached memories and the stream's state recorded after a non-finite write are
NaN; the pending tokens are kept as given, so the next call finds a non-finite one again.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from growmem.ops.caching.cache import DeepMemoryCache
from growmem.ops.caching.core import _key_summaries, _summarize, cache_gates
from growmem.ops.caching.deep_reads import cached_mlp_read
from growmem.ops.caching.reads import mixed_read
from growmem.ops.caching.select import GATED_AGGREGATIONS, SPARSE_AGGREGATIONS
from growmem.ops.deep.api import block_lengths, scan_block
from growmem.ops.deep.chunk import MiniBatchLayout, deep_scan, online_read
from growmem.ops.deep.mlp import DeepState, gelu, layer_norm, start_state
from growmem.ops.nonfinite import NonFiniteGuard, poison
from growmem.ops.precision import compute_dtype

GATE_NAMES = ("eta", "g", "beta")


def empty_deep_cache(config, init_weights, initial_state, dtype, device) -> DeepMemoryCache:
    B, H, Dk, Dv = config.batch_size, config.num_heads, config.key_dim, config.value_dim
    Dh = config.deep[-1]
    start = start_state(init_weights, initial_state, config.rule, B, dtype)
    return DeepMemoryCache(
        config=config,
        states=DeepState(
            torch.zeros(B, H, 0, Dv, Dh, dtype=dtype, device=device),
            torch.zeros(B, H, 0, Dh, Dk, dtype=dtype, device=device),
        ),
        summaries=torch.zeros(B, H, 0, Dk, dtype=dtype, device=device),
        state_sum=None,
        online_state=start,
        key_sum=torch.zeros(B, H, Dk, dtype=dtype, device=device),
        segment_tokens=0,
        seen_tokens=0,
        initial_state=initial_state,
        pending=None,
        last_state=start,
    )


def _close_open_segment(cache: DeepMemoryCache, init_weights) -> DeepMemoryCache:
    """Push the online segment's final weights when the next token starts a new segment."""
    cfg = cache.config
    if cache.segment_tokens == 0 or not cfg.plan.is_start(cache.seen_tokens):
        return cache
    states, summaries = cache.states, cache.summaries
    if cfg.aggregation != "none":
        last = cache.last_state
        states = DeepState(
            torch.cat([states.W1, last.W1.unsqueeze(2)], 2),
            torch.cat([states.W2, last.W2.unsqueeze(2)], 2),
        )
        summary = _summarize(cache.key_sum, cache.segment_tokens, cfg.summary)
        summaries = torch.cat([summaries, summary.unsqueeze(2)], 2)
    online = cache.last_state
    if cfg.init == "independent":
        online = start_state(
            init_weights, cache.initial_state, cfg.rule, cfg.batch_size, cache.key_sum.dtype
        )
    return replace(
        cache,
        states=states,
        summaries=summaries,
        online_state=online,
        last_state=online,
        pending=None,
        key_sum=torch.zeros_like(cache.key_sum),
        segment_tokens=0,
    )


def _routed_mlp_read(Qh, states, idx, w, valid, norm, eps):
    """ssc and loglinear on MLP memories: y[b,h,t] = Σ_j w_j M_{W^(idx_j)}(q_t) over the
    valid slots, each cache evaluated once on the tokens that selected it (or gathered when
    there are few)."""
    B, H, T, D = Qh.shape
    N, k = states.W1.shape[2], idx.shape[-1]
    w = w if valid is None else torch.where(valid, w, 0.0)
    bh = torch.arange(B * H, device=Qh.device).view(B, H, 1, 1)
    W1f = states.W1.reshape(B * H * N, *states.W1.shape[3:])
    W2f = states.W2.reshape(B * H * N, *states.W2.shape[3:])
    groups = (bh * N + idx).reshape(-1)
    if T * k <= N:  # decoding: gather the few selected memories
        w1, w2 = (
            W1f[groups].view(B, H, T, k, *W1f.shape[1:]),
            W2f[groups].view(B, H, T, k, *W2f.shape[1:]),
        )
        z = Qh[:, :, :, None, None, :] @ w2.transpose(-1, -2)  # [B, H, T, k, 1, Dh]
        y = gelu(z) @ w1.transpose(-1, -2)  # [B, H, T, k, 1, Dv]
        y = (layer_norm(y, eps)[0] if norm else y).squeeze(-2)
        return w.sum(-1, keepdim=True) * Qh + (w.unsqueeze(-1) * y).sum(-2)
    rows = (bh * T + torch.arange(T, device=Qh.device).view(1, 1, T, 1)).expand(B, H, T, k)
    live = torch.ones_like(groups, dtype=torch.bool) if valid is None else valid.reshape(-1)
    groups, order = groups[live].sort(stable=True)
    rows = rows.reshape(-1)[live][order]
    weights = w.reshape(-1)[live][order]
    if not len(groups):  # no token reads a cache (or an empty batch)
        return Qh.new_zeros(B, H, T, D)
    gids, counts = torch.unique_consecutive(groups, return_counts=True)
    q_sel = Qh.reshape(B * H * T, D).index_select(0, rows)
    # one gather and unbind: indexing W1f[gid] per group would make autograd zero-fill and add
    # a gradient as large as all the caches for every group
    W1g, W2g = W1f.index_select(0, gids).unbind(0), W2f.index_select(0, gids).unbind(0)
    parts = []
    for q_g, w1, w2 in zip(q_sel.split(counts.tolist()), W1g, W2g, strict=True):
        y = gelu(q_g @ w2.T) @ w1.T
        parts.append(layer_norm(y, eps)[0] if norm else y)
    reads = (torch.cat(parts) + q_sel) * weights[:, None]
    out = Qh.new_zeros(B * H * T, D).index_add(0, rows, reads)
    return out.view(B, H, T, D)


def deep_memory_caching_forward(
    q, k, v, u, gates, cache: DeepMemoryCache, init_weights, finite: bool = True
):
    """Consume T tokens after ``cache``; returns (o [B, T, H, D], the updated cache).

    Args:
        q, k, v: [B, T, H, D]; u: [B, T, H, D] or None; gates: eta (and g, beta for titans),
        [B, T, H] each; cache: the state after the earlier tokens; init_weights: (W1, W2).
        finite: these inputs and the cache's pending tokens are known to be finite; False
            runs the guarded path (ops/nonfinite.py).
    """
    cfg = cache.config
    mini_batch, norm, max_grad_norm, eps, decay_to, _ = cfg.deep
    B, T, H, _ = q.shape
    cache = _close_open_segment(cache, init_weights)
    t0, n0 = cache.seen_tokens, cache.num_cached
    pieces = cfg.plan.pieces(t0, T)
    P = len(pieces)
    keep = cfg.aggregation != "none"

    # The scan runs over the open mini-batch's earlier tokens (``extra``, recomputed) and this
    # call's; every tensor below is in that token order, the call's tokens from ``extra`` on.
    extra = cache.pending_tokens
    raw = {"q": q, "k": k, "v": v, **gates}
    if extra:
        raw = {
            n: torch.cat(
                [cache.pending[n] if n != "q" else torch.zeros_like(cache.pending["k"]), x], 1
            )
            for n, x in raw.items()
        }
    reads = {"q": raw["q"]}
    if u is not None:
        reads["u"] = torch.cat([u.new_zeros(B, extra, *u.shape[2:]), u], 1) if extra else u
    guard = NonFiniteGuard(reads, {n: x for n, x in raw.items() if n != "q"}, finite)
    inputs = {**guard.reads, **guard.writes}
    q, k = inputs["q"][:, extra:], inputs["k"][:, extra:]
    u = inputs.get("u")
    u = None if u is None else u[:, extra:]

    key_sums, counts = _key_summaries(k, pieces, cache)
    summaries = _summarize(key_sums, counts[None, :, None, None], cfg.summary)  # [B, T, H, D]
    cached_summaries = cache.summaries
    if keep and P > 1:
        ends = summaries[:, [b - 1 for _, b in pieces[:-1]]].transpose(1, 2)
        cached_summaries = torch.cat([cached_summaries, ends], 2)
    N = n0 + (P - 1 if keep else 0)  # caches after this call
    n_tok = None if P == 1 else torch.tensor([n0 + p for p in range(P)], device=q.device)
    if n_tok is not None:  # [T]: caches each token sees
        n_tok = n_tok.repeat_interleave(torch.tensor([b - a for a, b in pieces], device=q.device))
    gamma = idx = valid = None
    if cfg.aggregation in GATED_AGGREGATIONS and N:
        gamma, idx, valid = cache_gates(u, summaries, cached_summaries, n_tok, cfg)

    # One scan over the whole call: the mini-batch grid restarts at every piece start, and
    # with init="independent" every piece after the first starts from the initial state.
    # scan blocks of whole mini-batches (scan.py); their grid restarts at every piece start
    block = scan_block(mini_batch, T + extra)
    grid, resets, ends, visible = [], [], [], []  # visible: caches each block reads
    for p, (a, b) in enumerate(pieces):
        if p and cfg.init == "independent":
            resets.append(len(grid))
        batches = block_lengths(b - a + (extra if p == 0 else 0), mini_batch, block)
        grid += batches
        ends.append(len(grid) - 1)
        visible += [n0 + p] * len(batches)
    layout = MiniBatchLayout.build(grid, q.device)
    dtype = compute_dtype(q)
    scan = deep_scan(
        inputs["q"],
        inputs["k"],
        inputs["v"],
        **{n: inputs.get(n) for n in GATE_NAMES},
        rule=cfg.rule,
        init_weights=init_weights,
        initial_state=cache.online_state,
        layout=layout,
        end_batches=ends[:-1] if keep else (),
        resets=resets,
        reset_state=(
            start_state(init_weights, cache.initial_state, cfg.rule, B, dtype) if resets else None
        ),
        norm=norm,
        max_grad_norm=max_grad_norm,
        eps=eps,
        mini_batch=mini_batch,
        decay_to=decay_to,
    )
    # the final weights of every finished segment join the caches: the reads use them as
    # computed, the stream keeps them NaN after a non-finite write (the reads must stay finite:
    # their backward would carry 0 · NaN to the earlier tokens)
    W1c, W2c = cache.states.W1, cache.states.W2  # [B, H, N, Dv, Dh], [B, H, N, Dh, Dk]
    kept_states, kept_summaries = cache.states, cached_summaries
    if scan.kept is not None:  # [P - 1, B, H, ...] -> [B, H, P - 1, ...]
        new = [x.permute(1, 2, 0, 3, 4) for x in scan.kept[:2]]
        W1c, W2c = (torch.cat([c, x], 2) for c, x in zip(cache.states[:2], new, strict=True))
        kept_states = DeepState(W1c, W2c)
        bad = guard.after([extra + b for _, b in pieces[:-1]])  # [B, P - 1, H] or None
        if bad is not None:  # the stream's copies, NaN after a non-finite write
            bad = bad.transpose(1, 2)  # [B, H, P - 1]
            kept_states = DeepState(
                *(
                    torch.cat([c, poison(x, bad)], 2)
                    for c, x in zip(cache.states[:2], new, strict=True)
                )
            )
            new_summaries = poison(cached_summaries[:, :, n0:], bad)
            kept_summaries = torch.cat([cache.summaries, new_summaries], 2)
    soup = None
    if cfg.aggregation == "soup" and N:
        soup = _soup_inputs(q, gamma, W1c, W2c, pieces, n0, extra, layout, visible, dtype)
    o_online = layout.to_tokens(online_read(scan, norm, eps, soup))[:, extra:]  # [B, T, H, D]
    o = o_online
    if N and cfg.aggregation in ("residual", "mean", "grm"):
        if cfg.aggregation == "grm":
            w = gamma[..., :-1]  # [B, H, T, N] (caches a token does not see: weight 0)
        else:  # residual: 1, mean: 1 / (caches seen + 1), on the caches a token sees
            n_seen = torch.full((T,), N, device=q.device) if n_tok is None else n_tok  # [T]
            w = (torch.arange(N, device=q.device) < n_seen[:, None]).to(q.dtype)  # [T, N]
            if cfg.aggregation == "mean":
                w = w / (n_seen + 1).to(q.dtype)[:, None]
            w = w.expand(B, H, T, N)
        spans = [(a, b, n0 + p) for p, (a, b) in enumerate(pieces) if n0 + p]
        read = cached_mlp_read(q.transpose(1, 2), W1c, W2c, w, spans, norm, eps)
        read = read.transpose(1, 2)
        if cfg.aggregation == "grm":
            o = gamma[..., -1:].transpose(1, 2) * o_online + read
        elif cfg.aggregation == "residual":
            o = o_online + read
        else:
            o = (
                o_online / (N + 1 if n_tok is None else (n_tok + 1).to(o.dtype)[:, None, None])
                + read
            )
    elif N and cfg.aggregation in SPARSE_AGGREGATIONS:
        read = _routed_mlp_read(
            q.transpose(1, 2), DeepState(W1c, W2c), idx, gamma[..., :-1], valid, norm, eps
        )
        o = gamma[..., -1:].transpose(1, 2) * o_online + read.transpose(1, 2)
    # soup's output is the scan's own (it read the mixed weights)
    if guard.outputs is not None:
        o = poison(o, guard.outputs[:, extra:])

    last_len = grid[-1]
    partial = last_len < mini_batch
    new_pending = None
    if partial:  # as given: the next call's guard sees a non-finite one again
        new_pending = {n: x[:, x.shape[1] - last_len :].clone() for n, x in raw.items() if n != "q"}
    total = extra + T
    bad = guard.after([total, total - last_len])  # [B, 2, H] or None
    bad_final, bad_entry = (None, None) if bad is None else bad.unbind(1)  # [B, H] each
    final = scan.final.map(lambda x: poison(x, bad_final))
    return o, replace(
        cache,
        states=kept_states,
        summaries=kept_summaries,
        online_state=scan.last_entry.map(lambda x: poison(x, bad_entry)) if partial else final,
        last_state=final,
        pending=new_pending,
        key_sum=poison(key_sums[:, -1], bad_final),
        segment_tokens=pieces[-1][1] - pieces[-1][0] + (cache.segment_tokens if P == 1 else 0),
        seen_tokens=t0 + T,
    )


def _soup_inputs(q, gamma, W1c, W2c, pieces, n0, extra, layout, visible, dtype) -> dict:
    """``online_read``'s soup argument: the cached parts of the mixed weights, in the
    mini-batch layout of the scan (whose first ``extra`` tokens are pending ones: they read
    nothing cached, and their outputs are dropped).

    q [B, T, H, D]; gamma [B, H, T, N + 1]; W1c [B, H, N, Dv, Dh], W2c [B, H, N, Dh, Dk].
    """
    spans = [(a, b, n0 + p) for p, (a, b) in enumerate(pieces)]
    g_cached = gamma[..., :-1]  # [B, H, T, N]
    W2t = W2c.transpose(-1, -2).contiguous()  # [B, H, N, Dk, Dh]
    z_cached = mixed_read(q.transpose(1, 2).to(dtype), W2t, g_cached, spans)  # [B, H, T, Dh]

    def batched(x, value):  # [B, T, H, ...] (pending tokens in front) -> mini-batch layout
        if extra:
            x = torch.cat([x.new_full((x.shape[0], extra, *x.shape[2:]), value), x], 1)
        return layout.to_batches(x, dtype)

    return {
        "gamma_online": batched(gamma[..., -1].transpose(1, 2), 1.0).unsqueeze(-1),
        "z_cached": batched(z_cached.transpose(1, 2), 0.0),
        "gamma_cached": batched(g_cached.transpose(1, 2), 0.0),
        "W1_cached": W1c,
        "visible": visible,
    }
