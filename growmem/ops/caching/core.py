"""Memory Caching over linear-family memories: one algorithm for training and streaming.

A call consumes T new tokens that follow ``seen`` earlier ones. The tokens are cut into
*pieces* at segment starts: the first piece may continue the segment the previous call left
open, every later piece begins a segment. Then

1. the online memory runs over the pieces (one chunkwise scan for init="continuous"; for
   "independent" each piece restarts from the initial state, pieces of equal length batched),
   giving the online outputs M^(s)_t(q_t) and the memory at the end of every piece;
2. every piece but the last is a finished segment: its final memory and key summary join the
   cached ones, and a token of piece p sees the n0 + p caches before it;
3. the aggregation mixes the online output with reads of the visible caches.

A parallel forward is the call with seen = 0; a decode step is a call with T = 1. Python
loops run over pieces (segments), never over tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import fields, replace

import torch

from growmem.ops.caching.cache import CachingConfig, MemoryCache, map_tensors
from growmem.ops.caching.reads import mixed_read, sparse_read
from growmem.ops.caching.select import (
    GATED_AGGREGATIONS,
    SPARSE_AGGREGATIONS,
    log_buckets,
    select_top_k,
)
from growmem.ops.linear.chunk import chunk_linear_memory
from growmem.ops.linear.naive import linear_step
from growmem.ops.nonfinite import NonFiniteGuard, poison


def empty_cache(config: CachingConfig, initial_state, dtype, device) -> MemoryCache:
    """The cache before the first token: no cached segment, the online state at its start."""
    B, H, Dk, Dv = config.batch_size, config.num_heads, config.key_dim, config.value_dim
    online = (
        torch.zeros(B, H, Dv, Dk, dtype=dtype, device=device)
        if initial_state is None
        else initial_state.to(dtype)
    )
    return MemoryCache(
        config=config,
        states=torch.zeros(B, H, 0, Dk, Dv, dtype=dtype, device=device),
        summaries=torch.zeros(B, H, 0, Dk, dtype=dtype, device=device),
        state_sum=torch.zeros(B, H, Dk, Dv, dtype=dtype, device=device),
        online_state=online,
        key_sum=torch.zeros(B, H, Dk, dtype=dtype, device=device),
        segment_tokens=0,
        seen_tokens=0,
        initial_state=None if initial_state is None else initial_state.to(dtype),
    )


def _summarize(key_sum: torch.Tensor, count, summary: str) -> torch.Tensor:
    return key_sum / count if summary == "mean" else key_sum


def _with_cached(cache: MemoryCache, states_t, summaries) -> dict:
    """Cache fields after appending finished segments: states_t [B, H, n, Dk, Dv],
    summaries [B, H, n, Dk]. The plain RNN (aggregation none) never reads a cache: it keeps
    none, so its cache stays constant-size."""
    if cache.config.aggregation == "none" or states_t.shape[2] == 0:
        return dict(states=cache.states, summaries=cache.summaries, state_sum=cache.state_sum)
    return dict(
        states=torch.cat([cache.states, states_t], 2),
        summaries=torch.cat([cache.summaries, summaries], 2),
        state_sum=cache.state_sum + states_t.sum(2),
    )


def _close_open_segment(cache: MemoryCache) -> MemoryCache:
    """Push the online segment to the cached ones when the next token starts a new segment."""
    cfg = cache.config
    if cache.segment_tokens == 0 or not cfg.plan.is_start(cache.seen_tokens):
        return cache
    summary = _summarize(cache.key_sum, cache.segment_tokens, cfg.summary)
    independent = cfg.init == "independent"
    online = cache.online_state
    if independent:
        online = torch.zeros_like(online) if cache.initial_state is None else cache.initial_state
    return MemoryCache(
        config=cfg,
        **_with_cached(
            cache, cache.online_state.transpose(-1, -2).unsqueeze(2), summary.unsqueeze(2)
        ),
        online_state=online,
        key_sum=torch.zeros_like(cache.key_sum),
        segment_tokens=0,
        seen_tokens=cache.seen_tokens,
        prev_kv=None if independent else cache.prev_kv,
        initial_state=cache.initial_state,
    )


def _online_scan(q, k, v, gates, pieces, cache: MemoryCache, chunk_size: int):
    """Online outputs [B, T, H, Dv] and the memory after each piece [B, P, H, Dv, Dk]."""
    rule = cache.config.rule
    if q.shape[1] == 1:  # a decode step: one token, one recurrence step
        k_prev, v_prev = cache.prev_kv or (None, None)  # only swla reads them (zeros at first)
        if rule == "swla" and k_prev is None:
            k_prev, v_prev = torch.zeros_like(k[:, 0]), torch.zeros_like(v[:, 0])
        S = linear_step(
            rule,
            cache.online_state,
            k[:, 0],
            v[:, 0],
            k_prev,
            v_prev,
            **{n: x[:, 0] for n, x in gates.items()},
        )
        return (S @ q[:, 0, :, :, None]).squeeze(-1).unsqueeze(1), S.unsqueeze(1)
    if cache.config.init == "continuous" or len(pieces) == 1:
        return chunk_linear_memory(
            q,
            k,
            v,
            rule=rule,
            **gates,
            initial_state=cache.online_state,
            ends=[b for _, b in pieces],
            prev_kv=cache.prev_kv,
            chunk_size=chunk_size,
        )
    # independent: the first piece continues the open segment, every later one starts afresh
    # from the initial state; later pieces of one length run as one batch.
    B, H, Dv, Dk = cache.online_state.shape
    outs, finals = [None] * len(pieces), [None] * len(pieces)
    a0, b0 = pieces[0]
    first = {n: x[:, a0:b0] for n, x in gates.items()}
    outs[0], finals[0] = chunk_linear_memory(
        q[:, a0:b0],
        k[:, a0:b0],
        v[:, a0:b0],
        rule=rule,
        **first,
        initial_state=cache.online_state,
        prev_kv=cache.prev_kv,
        chunk_size=chunk_size,
    )
    by_length = defaultdict(list)
    for p, (a, b) in enumerate(pieces[1:], start=1):
        by_length[b - a].append(p)
    for L, ps in by_length.items():
        n = len(ps)

        def batch(x, ps=ps, L=L, n=n):  # [B, T, ...] -> [B * n, L, ...]
            parts = torch.stack([x[:, pieces[p][0] : pieces[p][0] + L] for p in ps], dim=1)
            return parts.reshape(B * n, L, *x.shape[2:])

        init = cache.initial_state
        init = None if init is None else init.unsqueeze(1).expand(B, n, H, Dv, Dk)
        o, s = chunk_linear_memory(
            batch(q),
            batch(k),
            batch(v),
            rule=rule,
            **{m: batch(x) for m, x in gates.items()},
            initial_state=None if init is None else init.reshape(B * n, H, Dv, Dk),
            chunk_size=chunk_size,
        )
        o, s = o.view(B, n, L, H, Dv), s.view(B, n, H, Dv, Dk)
        for j, p in enumerate(ps):
            outs[p], finals[p] = o[:, j], s[:, j]
    return torch.cat(outs, dim=1), torch.stack(finals, dim=1)


def _key_summaries(k, pieces, cache: MemoryCache):
    """Causal key sums and counts inside each piece (the first continuing the open segment).

    Returns key_sums [B, T, H, Dk] and counts [T] (tokens of the segment up to t).
    """
    if len(pieces) == 1:  # one piece, e.g. a decode step: no split, no concatenation
        sums = k.cumsum(1) if k.shape[1] > 1 else k
        counts = torch.arange(1, k.shape[1] + 1, device=k.device, dtype=k.dtype)
        return sums + cache.key_sum.unsqueeze(1), counts + cache.segment_tokens
    sums, counts = [], []
    for p, k_p in enumerate(k.split([b - a for a, b in pieces], dim=1)):
        s = k_p.cumsum(1)
        c = torch.arange(1, k_p.shape[1] + 1, device=k.device, dtype=k.dtype)
        if p == 0 and cache.segment_tokens:
            s = s + cache.key_sum.unsqueeze(1)
            c = c + cache.segment_tokens
        sums.append(s)
        counts.append(c)
    return torch.cat(sums, 1), torch.cat(counts)


def cache_gates(u, summaries, cached_summaries, n_tok, cfg):
    """Gates of the cached and online memories from r = gate_scale <u_t, c_i>.

    Args:
        u: [B, T, H, Dk] gate queries; summaries: [B, T, H, Dk] online (causal) summaries;
        cached_summaries: [B, H, N, Dk]; n_tok: [T] caches each token sees (None: all N).

    Returns:
        gamma [B, H, T, K + 1] (softmax over K cached candidates, then the online memory;
        K = N, the top_k selected for ssc, or the bucket slots of loglinear), and for ssc
        and loglinear the caches read, idx [B, H, T, K] and valid [B, H, T, K] (None when
        every slot is filled).
    """
    N = cached_summaries.shape[2]
    us = (u * cfg.gate_scale).transpose(1, 2)  # [B, H, T, Dk]
    score_online = (us * summaries.transpose(1, 2)).sum(-1, keepdim=True)  # [B, H, T, 1]
    if cfg.aggregation == "loglinear":
        return _log_bucket_gates(us, score_online, cached_summaries, n_tok, cfg.summary)
    scores = us @ cached_summaries.transpose(-1, -2)  # [B, H, T, N]
    if n_tok is not None:
        hidden = torch.arange(N, device=u.device)[None, :] >= n_tok[:, None]  # [T, N]
        scores = scores.masked_fill(hidden, -math.inf)
    if cfg.aggregation != "ssc":
        return torch.softmax(torch.cat([scores, score_online], -1), -1), None, None
    top, idx = select_top_k(scores, min(cfg.top_k, N))  # [B, H, T, k]
    gamma = torch.softmax(torch.cat([top, score_online], -1), -1)
    # a token that sees fewer than k caches has empty slots (score -inf, weight 0)
    valid = None if n_tok is None else torch.isfinite(top)
    return gamma, idx, valid


def _log_bucket_gates(us, score_online, cached_summaries, n_tok, summary: str):
    """cache_gates for loglinear: one slot per bucket size (see ``log_buckets``).

    A bucket is read through the memory at its end (with continuous init, the memory of all
    tokens up to there) and scored by the mean (or, for summary "sum", the sum) of its
    segments' summaries. Bucket scores come from prefix sums over the cached summaries.
    """
    B, H, T, Dk = us.shape
    N = cached_summaries.shape[2]
    n_seen = torch.full((T,), N, device=us.device) if n_tok is None else n_tok
    start, end, valid = log_buckets(n_seen, N.bit_length())  # [T, L] each
    L = start.shape[1]
    prefix = torch.cat([cached_summaries.new_zeros(B, H, 1, Dk), cached_summaries.cumsum(2)], 2)
    at = us @ prefix.transpose(-1, -2)  # [B, H, T, N + 1]: <u_t, Σ_{i<j} c_i>
    scores = at.gather(-1, end.expand(B, H, T, L)) - at.gather(-1, start.expand(B, H, T, L))
    if summary == "mean":
        scores = scores / (end - start).clamp(min=1).to(scores.dtype)
    scores = scores.masked_fill(~valid, -math.inf)  # [B, H, T, L]
    gamma = torch.softmax(torch.cat([scores, score_online], -1), -1)
    idx = (end - 1).clamp(min=0).expand(B, H, T, L)
    return gamma, idx, valid.expand(B, H, T, L)


def memory_caching_forward(
    q, k, v, u, gates: dict, cache: MemoryCache, chunk_size: int = 64, finite: bool = True
):
    """Consume T tokens after ``cache``; returns (o [B, T, H, Dv], the updated cache).

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] or None (gate projections);
        gates: the rule's per-token gates ([B, T, H] each), in the compute dtype.
        cache: the state after the earlier tokens (``empty_cache`` for a fresh sequence).
        finite: whether q, k, v, u and the gates are known to be finite; False runs the
            guarded path, where a non-finite input never reaches an earlier output.
    """
    cfg = cache.config
    T = q.shape[1]
    # keep non-finite inputs causal (ops/nonfinite.py); nothing to do when all are finite
    reads = dict(q=q, u=u) if cfg.aggregation in GATED_AGGREGATIONS else dict(q=q)
    guard = NonFiniteGuard(reads, dict(k=k, v=v, **gates), finite)
    q, u = guard.reads["q"], guard.reads.get("u", u)
    gates = dict(guard.writes)
    k, v = gates.pop("k"), gates.pop("v")
    cache = _close_open_segment(cache)
    t0 = cache.seen_tokens
    pieces = cfg.plan.pieces(t0, T)
    lengths = [b - a for a, b in pieces]
    P, n0 = len(pieces), cache.num_cached

    o_online, piece_states = _online_scan(q, k, v, gates, pieces, cache, chunk_size)
    key_sums, counts = _key_summaries(k, pieces, cache)
    summaries = _summarize(key_sums, counts[None, :, None, None], cfg.summary)  # [B, T, H, Dk]
    # Pieces but the last are finished segments: they join the caches, in the read layout.
    finished = piece_states[:, :-1].permute(0, 2, 1, 4, 3)  # [B, H, P - 1, Dk, Dv]
    if P > 1:
        cached = _with_cached(
            cache, finished, summaries[:, [b - 1 for _, b in pieces[:-1]]].transpose(1, 2)
        )
    else:
        cached = dict(states=cache.states, summaries=cache.summaries, state_sum=cache.state_sum)
    N = cached["states"].shape[2]
    visible = [n0 + p for p in range(P)]  # caches a token of piece p reads
    # [T]: caches token t reads (with one piece, all N of them: no mask needed)
    n_tok = (
        None
        if P == 1
        else torch.tensor(visible, device=q.device).repeat_interleave(
            torch.tensor(lengths, device=q.device)
        )
    )

    o = o_online
    if cfg.aggregation in ("residual", "mean") and N:
        # Σ_{i<n} S_i q = (Σ_{i<n} S_i) q: prefix sums of the states make this O(T·Dk·Dv).
        prefix = [cache.state_sum, *(cache.state_sum.unsqueeze(2) + finished.cumsum(2)).unbind(2)]
        reads = [
            torch.einsum("blhk,bhkv->blhv", q_p, prefix_p)
            for q_p, prefix_p in zip(q.split(lengths, 1), prefix, strict=True)
        ]
        o = o_online + torch.cat(reads, 1)
        if cfg.aggregation == "mean":
            o = o / (N + 1 if n_tok is None else (n_tok + 1).to(o.dtype)[None, :, None, None])
    elif cfg.aggregation in GATED_AGGREGATIONS and N:
        gamma, idx, valid = cache_gates(u, summaries, cached["summaries"], n_tok, cfg)
        Qh = q.transpose(1, 2)  # [B, H, T, Dk]
        if cfg.aggregation in SPARSE_AGGREGATIONS:
            read = sparse_read(Qh, cached["states"], idx, gamma[..., :-1], valid)
        else:  # grm; soup equals grm on matrix memories (the mix of S_i q is the mix's read)
            spans = [(a, b, n) for (a, b), n in zip(pieces, visible, strict=True)]
            read = mixed_read(Qh, cached["states"], gamma[..., :-1], spans)
        o = gamma[..., -1:].transpose(1, 2) * o_online + read.transpose(1, 2)

    new_cache = MemoryCache(
        config=cfg,
        **cached,
        # clones: views would keep whole-call buffers alive in the cache
        online_state=piece_states[:, -1].clone(),
        key_sum=key_sums[:, -1].clone(),
        segment_tokens=lengths[-1] + (cache.segment_tokens if P == 1 else 0),
        seen_tokens=t0 + T,
        prev_kv=(k[:, -1].clone(), v[:, -1].clone()) if cfg.rule == "swla" else None,
        initial_state=cache.initial_state,
    )
    return guard.output(o), _poison_cache(new_cache, guard.stream)


def _poison_cache(cache: MemoryCache, corrupt: torch.Tensor | None) -> MemoryCache:
    """The cache with NaN in every state of the rows and heads whose memory is ``corrupt``
    [B, H] (a non-finite write): a stream that continues it stays NaN, as its memory is.
    None: the cache itself."""
    if corrupt is None:
        return cache
    changes = {
        f.name: map_tensors(getattr(cache, f.name), lambda x: poison(x, corrupt))
        for f in fields(cache)
        if f.name not in ("config", "initial_state")
    }
    return replace(cache, **changes)
