"""Memory Caching: one algorithm for training and streaming, over any memory backend.

A call consumes T new tokens that follow ``seen`` earlier ones. The tokens are cut into
*pieces* at segment starts: the first piece may continue the segment the previous call left
open, every later piece begins a segment. Then

1. the backend's scan runs the online memory over the pieces (init="continuous": each piece
   continues the previous one; "independent": each later piece restarts), giving the online
   outputs M^(s)_t(q_t) and the memory at the end of every piece;
2. every piece but the last is a finished segment: its final memory and key summary join the
   cached ones, and a token of piece p sees the n0 + p caches before it;
3. the aggregation (ops/aggregations.py says what it needs) mixes the online output with the
   backend's reads of the visible caches.

A parallel forward is the call with seen = 0; a decode step is a call with T = 1. Python
loops run over pieces (segments), never over tokens.

Non-finite inputs stay causal (ops/nonfinite.py): the call runs on finite numbers, then the
outputs, the cached memories and the stream's state recorded after a non-finite write are NaN.
"""

from __future__ import annotations

import torch

from growmem.ops.caching.backend import MemoryBackend, Mix, ScanInputs, map_tensors
from growmem.ops.caching.cache import CachingConfig, MemoryCache
from growmem.ops.caching.gates import GateInputs, cache_gates
from growmem.ops.nonfinite import NonFiniteGuard, poison


def empty_cache(
    config: CachingConfig, backend: MemoryBackend, init_weights, initial_state, device
) -> MemoryCache:
    """The cache before the first token: no cached segment, the online state at its start."""
    B, H, Dk, Dv, dtype = (
        config.batch_size,
        config.num_heads,
        config.key_dim,
        config.value_dim,
        config.dtype,
    )
    initial_state = map_tensors(initial_state, lambda x: x.to(dtype))
    return MemoryCache(
        config=config,
        cached=backend.no_cached(B, H, Dk, Dv, config.memory_sizes, dtype, device),
        summaries=torch.zeros(B, H, 0, Dk, dtype=dtype, device=device),
        online=backend.start(B, H, Dk, Dv, init_weights, initial_state, dtype, device),
        key_sum=torch.zeros(B, H, Dk, dtype=dtype, device=device),
        segment_tokens=0,
        seen_tokens=0,
        initial_state=initial_state,
    )


def summarize(key_sum: torch.Tensor, count, summary: str) -> torch.Tensor:
    """A segment's summary c from the sum of its keys and their count ("mean" or "sum")."""
    return key_sum / count if summary == "mean" else key_sum


def _restart(cache: MemoryCache, backend: MemoryBackend, init_weights):
    """The stream state a segment starts from with init="independent"."""
    cfg = cache.config
    B, H, Dk, Dv = cfg.batch_size, cfg.num_heads, cfg.key_dim, cfg.value_dim
    device = cache.key_sum.device
    return backend.start(B, H, Dk, Dv, init_weights, cache.initial_state, cfg.dtype, device)


def _close_open_segment(cache: MemoryCache, backend: MemoryBackend, init_weights) -> MemoryCache:
    """Push the online segment to the cached ones when the next token starts a new segment."""
    cfg = cache.config
    if cache.segment_tokens == 0 or not cfg.plan.is_start(cache.seen_tokens):
        return cache
    memory, online = backend.segment_end(cache.online)
    cached, summaries = cache.cached, cache.summaries
    if cfg.spec.keeps_segments:
        cached = backend.append(cached, memory)
        summary = summarize(cache.key_sum, cache.segment_tokens, cfg.summary)
        summaries = torch.cat([summaries, summary.unsqueeze(2)], 2)
    if cfg.init == "independent":
        online = _restart(cache, backend, init_weights)
    return MemoryCache(
        config=cfg,
        cached=cached,
        summaries=summaries,
        online=online,
        key_sum=torch.zeros_like(cache.key_sum),
        segment_tokens=0,
        seen_tokens=cache.seen_tokens,
        initial_state=cache.initial_state,
    )


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


def memory_caching_forward(
    q, k, v, u, gates: dict, cache: MemoryCache, backend: MemoryBackend, init_weights=None,
    finite: bool = True, extra_gates: GateInputs | None = None,
):  # fmt: skip
    """Consume T tokens after ``cache``; returns (o [B, T, H, Dv], the updated cache).

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] or None (gate queries);
        gates: the rule's per-token gates ([B, T, H] each), all in the compute dtype.
        extra_gates: Memory Caching's optional gate inputs (temperature, online_bias [B, T,
            H]; summary_keys [B, T, H, Dk]), for the gated aggregations only; None: none.
        cache: the state after the earlier tokens (``empty_cache`` for a new stream).
        backend: the memory's backend; init_weights: the memory's learned initial weights.
        finite: q, k, v, u, the gates (all of them) and the stream's pending tokens are
            known to be finite; False runs the guarded path, where a non-finite input never
            reaches an earlier output.
    """
    cfg = cache.config
    agg = cfg.spec
    T = q.shape[1]
    extra_gates = GateInputs() if extra_gates is None else extra_gates
    cache = _close_open_segment(cache, backend, init_weights)
    t0, n0 = cache.seen_tokens, cache.num_cached
    pieces = cfg.plan.pieces(t0, T)
    P = len(pieces)

    # The scan runs over the stream's pending tokens (``extra``, recomputed) and this call's;
    # q and u are zero on the pending ones, which read nothing.
    pending = backend.pending(cache.online)
    extra = next(iter(pending.values())).shape[1] if pending else 0
    raw = {"k": k, "v": v, **gates}
    # τ and b weigh one token's read (like u); the summary keys write the summaries every later
    # token is gated by (like k)
    reads = {"q": q, "u": u, "temperature": extra_gates.temperature,
             "online_bias": extra_gates.online_bias}  # fmt: skip
    summary_keys = {"summary_keys": extra_gates.summary_keys}
    if not agg.gated:  # only the gated aggregations read them
        reads, summary_keys = {"q": q}, {}
    if extra:
        raw = {n: torch.cat([pending[n], x], 1) for n, x in raw.items()}
        reads = {n: None if x is None else _pad_front(x, extra) for n, x in reads.items()}
        summary_keys = {
            n: None if x is None else _pad_front(x, extra) for n, x in summary_keys.items()
        }
    guard = NonFiniteGuard(reads, {**raw, **summary_keys}, finite)
    writes = dict(guard.writes)
    k_all, v_all = writes.pop("k"), writes.pop("v")
    s_all = writes.pop("summary_keys", k_all)  # the vectors summarised
    reset = None if cfg.init == "continuous" else _restart(cache, backend, init_weights)
    scanned = backend.scan(
        ScanInputs(
            guard.reads["q"], k_all, v_all, writes, raw, extra, pieces, cache.online, reset,
            keep=agg.keeps_segments, init_weights=init_weights,
        )
    )  # fmt: skip
    q = guard.reads["q"][:, extra:]
    u = guard.reads["u"][:, extra:] if agg.gated else None
    extra_gates = GateInputs(
        *(guard.reads[n][:, extra:] if n in guard.reads else None
          for n in ("temperature", "online_bias"))
    )  # fmt: skip

    key_sums, counts = _key_summaries(s_all[:, extra:], pieces, cache)
    summaries = summarize(key_sums, counts[None, :, None, None], cfg.summary)  # [B, T, H, Dk]
    cached, cached_summaries = cache.cached, cache.summaries  # what this call reads
    kept, kept_summaries = cached, cached_summaries  # what the stream keeps
    if scanned.ends is not None:
        ends_summaries = summaries[:, [b - 1 for _, b in pieces[:-1]]].transpose(1, 2)
        cached = backend.append(cached, scanned.ends)
        cached_summaries = torch.cat([cached_summaries, ends_summaries], 2)
        kept, kept_summaries = cached, cached_summaries
        # The reads use the memories as computed, the stream keeps them NaN after a non-finite
        # write (the reads must stay finite: their backward would carry 0 · NaN to earlier
        # tokens).
        bad = guard.after([extra + b for _, b in pieces[:-1]])  # [B, P - 1, H] or None
        if bad is not None:
            bad = bad.transpose(1, 2)  # [B, H, P - 1]
            kept = backend.append(cache.cached, map_tensors(scanned.ends, lambda x: poison(x, bad)))
            kept_summaries = torch.cat([cache.summaries, poison(ends_summaries, bad)], 2)
    N = cached_summaries.shape[2]
    spans = [(a, b, n0 + p) for p, (a, b) in enumerate(pieces)]  # caches each piece sees
    o = _aggregate(
        q, (u, extra_gates), summaries, cached, cached_summaries, spans, scanned, backend, cfg, N
    )

    total = extra + T
    new_cache = MemoryCache(
        config=cfg,
        cached=kept,
        summaries=kept_summaries,
        online=backend.poison_online(scanned.online, guard, total),
        key_sum=poison(key_sums[:, -1].clone(), guard.stream),  # (a view would pin k)
        segment_tokens=pieces[-1][1] - pieces[-1][0] + (cache.segment_tokens if P == 1 else 0),
        seen_tokens=t0 + T,
        initial_state=cache.initial_state,
    )
    if guard.outputs is not None:
        o = poison(o, guard.outputs[:, extra:])
    return o, new_cache


def _aggregate(q, gate_queries, summaries, cached, cached_summaries, spans, scanned, backend,
               cfg, N):  # fmt: skip
    """The outputs [B, T, H, Dv]: the online memory's, aggregated with the visible caches'
    reads as the aggregation's declared properties say (gate_queries: u and the GateInputs
    temperature and online_bias)."""
    agg = cfg.spec
    if not agg.keeps_segments or not N:
        return scanned.outputs(None)
    n_tok = None  # [T]: caches token t sees (with one piece, all N of them: no mask needed)
    if len(spans) > 1:
        # (output_size: the length is known, so no host read of the repeats is needed)
        n_tok = torch.tensor([n for _, _, n in spans], device=q.device).repeat_interleave(
            torch.tensor([b - a for a, b, _ in spans], device=q.device), output_size=q.shape[1]
        )
    Qh = q.transpose(1, 2)  # [B, H, T, Dk]
    if agg.uniform is not None:  # residual: the sum of the reads; mean: their mean
        o = scanned.outputs(None) + backend.read_sum(Qh, cached, spans).transpose(1, 2)
        if agg.uniform == "mean":
            o = o / (N + 1 if n_tok is None else (n_tok + 1).to(o.dtype)[None, :, None, None])
        return o
    u, extra_gates = gate_queries
    gamma, idx, valid = cache_gates(u, summaries, cached_summaries, n_tok, cfg, extra_gates)
    if agg.mixes_parameters and not backend.linear:  # soup: the scan reads the mixed memory
        return scanned.outputs(Mix(gamma, cached, spans))
    # (soup on a linear backend: the read of the mix is the mix of the reads, as grm)
    if agg.routed:
        read = backend.read_routed(Qh, cached, idx, gamma[..., :-1], valid)
    else:
        read = backend.read_dense(Qh, cached, gamma[..., :-1], spans)
    return gamma[..., -1:].transpose(1, 2) * scanned.outputs(None) + read.transpose(1, 2)


def _pad_front(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, ...] with n zero tokens in front."""
    return torch.cat([x.new_zeros(x.shape[0], n, *x.shape[2:]), x], 1)
