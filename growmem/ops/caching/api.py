"""Public entry point of Memory Caching: argument checks, then the parallel/streaming path."""

from __future__ import annotations

import math

import torch

from growmem.ops.aggregations import AGGREGATIONS
from growmem.ops.caching.cache import CachingConfig, MemoryCache
from growmem.ops.caching.core import empty_cache, memory_caching_forward
from growmem.ops.caching.deep_core import deep_memory_caching_forward, empty_deep_cache
from growmem.ops.caching.deep_naive import deep_memory_caching_reference
from growmem.ops.caching.naive import memory_caching_reference
from growmem.ops.caching.segments import SegmentPlan
from growmem.ops.caching.select import GATED_AGGREGATIONS
from growmem.ops.checks import (
    check_choice,
    check_gates,
    check_positive_float,
    check_positive_int,
    check_qkv,
    check_shape,
    check_state,
    check_tensor,
    check_values,
)
from growmem.ops.deep.api import DEEP_RULES, check_deep_args, check_deep_state
from growmem.ops.deep.mlp import DeepState
from growmem.ops.precision import autocast_off, compute_dtype
from growmem.ops.spec import INITS, SUMMARIES


def check_caching_choices(aggregation: str, init: str, summary: str) -> None:
    """Raise ValueError unless aggregation, init and summary are known and fit together."""
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("init", init, INITS)
    check_choice("summary", summary, SUMMARIES)
    if aggregation == "loglinear" and init != "continuous":
        raise ValueError(
            "aggregation 'loglinear' reads a bucket of segments through the memory at its "
            f"end, which holds the whole bucket only with init='continuous'; got init={init!r}"
        )


def memory_caching(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    rule: str,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    segment_size: int | None = None,
    segments: list[int] | str | None = None,
    aggregation: str = "grm",
    top_k: int = 2,
    init: str = "continuous",
    summary: str = "mean",
    gate_scale: float | None = None,
    initial_state: torch.Tensor | DeepState | None = None,
    output_cache: bool = False,
    cache: MemoryCache | None = None,
    chunk_size: int = 64,
    impl: str = "chunk",
    eta: torch.Tensor | None = None,
    init_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    mini_batch: int | None = None,
    norm: bool = True,
    max_grad_norm: float | None = None,
    eps: float = 1e-5,
    decay_to: str = "init",
) -> torch.Tensor | tuple[torch.Tensor, MemoryCache]:
    """A recurrent memory whose checkpoints at segment ends are cached and read later.

    docs/design.md §3: the sequence is cut into segments; the memory runs inside each
    (``init``), each finished segment's final memory M^(i) and key summary c_i are cached, and
    token t of segment s outputs an ``aggregation`` of its online memory M^(s)_t(q_t) and of
    the cached M^(i)(q_t), i < s, gated by r_{t,i} = gate_scale <u_t, c_i>.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] gate queries (required for
            grm, soup, ssc and loglinear; ignored otherwise).
        rule, g, beta, lam: the memory rule and its gates, as in ``linear_memory``; or a
            deep rule (dla, titans) with eta, g, beta, as in ``deep_memory``.
        segment_size: constant segment length (the last segment may be shorter), or
        segments: explicit lengths summing to T (to at least the stream's length when
            streaming), or "log" for the binary decomposition of T (37 -> [32, 4, 1]).
        aggregation: none | residual | grm | soup | ssc | loglinear | mean (docs/design.md §3.3).
            soup equals grm on these matrix memories and shares its kernel. loglinear
            (Log-Linear++) is grm over logarithmic buckets: a token that sees n finished
            segments reads them as the binary decomposition of n, oldest and largest first
            (11 -> buckets of 8, 2, 1 segments), each through the memory at its end and
            scored by the mean (sum) of its segments' summaries; O(log n) reads per token.
            It needs init="continuous".
        top_k: caches ssc selects per token (all when fewer are visible).
        init: "continuous" (segment s starts from segment s-1's final memory) or
            "independent" (each segment starts from ``initial_state``, or zeros).
        summary: "mean" or "sum" of a segment's keys; the online one is causal.
        gate_scale: defaults to 1/sqrt(Dk).
        initial_state: [B, H, Dv, Dk] memory before the first token (new streams only).
        output_cache: also return the cache to continue from.
        cache: a MemoryCache from an earlier call: these tokens continue that stream.
        chunk_size: chunk length of the scans (a compute detail).
        impl: "chunk" (default) or "reference" (per-token loop; parallel calls only).
        eta, init_weights, mini_batch (default 64), norm, max_grad_norm, eps, decay_to: deep
            rules only, as in ``deep_memory``. The mini-batch grid restarts at every segment
            start, so the cached memories are the MLP weights at segment ends (any segment
            length works; with lengths that are multiples of mini_batch the grid is
            deep_memory's).

    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, cache) when output_cache is True. On the matrix
        memories a NaN or inf in q, k, v or u never reaches an earlier output: from a
        non-finite k, v or gate on, outputs and the returned cache are NaN; a non-finite q or
        u spoils its own output only (ops/nonfinite.py).
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    deep = rule in DEEP_RULES
    if deep:
        if lam is not None:
            raise ValueError(f"lam is not used by rule {rule!r}; pass lam=None")
        Dh = check_deep_args(
            rule, B, T, H, Dk, Dv, eta, g, beta, init_weights, max_grad_norm, eps=eps,
            decay_to=decay_to,
        )  # fmt: skip
        mini_batch = 64 if mini_batch is None else mini_batch
        check_positive_int("mini_batch", mini_batch)
        check_deep_state("initial_state", initial_state, rule, B, H, Dk, Dv, Dh)
    else:
        check_gates(rule, B, T, H, g=g, beta=beta, lam=lam)
        deep_only = (
            ("eta", eta),
            ("init_weights", init_weights),
            ("mini_batch", mini_batch),
            ("max_grad_norm", max_grad_norm),
        )
        for name, x in deep_only:
            if x is not None:
                raise ValueError(f"{name} is only used by the deep rules {list(DEEP_RULES)}")
        check_state("initial_state", initial_state, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
    check_caching_choices(aggregation, init, summary)
    check_choice("impl", impl, ("chunk", "reference"))
    check_positive_int("top_k", top_k)
    check_positive_int("chunk_size", chunk_size)
    if aggregation in GATED_AGGREGATIONS:
        if u is None:
            raise ValueError(
                f"u is required by aggregation {aggregation!r}: a [B, T, H, Dk] "
                "tensor of gate queries"
            )
        check_tensor("u", u, 4, "[B, T, H, Dk]")
        check_shape("u", u, (B, T, H, Dk), "[B, T, H, Dk] like q")
    if gate_scale is None:
        gate_scale = 1.0 / math.sqrt(Dk)
    check_positive_float("gate_scale", gate_scale)

    if cache is not None and not isinstance(cache, MemoryCache):
        raise ValueError(f"cache must be a MemoryCache, got {type(cache).__name__}")
    streaming = output_cache or cache is not None
    seen = 0 if cache is None else cache.seen_tokens
    plan = cache.config.plan if cache is not None and segments == "log" else None
    plan = plan or SegmentPlan.build(T, segment_size, segments)
    if plan.covered is not None:
        if not streaming and plan.covered != T:
            raise ValueError(f"segments must sum to T = {T}, got {plan.covered}")
        if plan.covered < seen + T:
            raise ValueError(
                f"segments cover {plan.covered} tokens but the stream reaches "
                f"{seen + T}; when streaming, pass the whole stream's segment "
                "lengths (e.g. log_segments(total))"
            )
    dtype = compute_dtype(q)
    config = CachingConfig(
        rule=rule,
        aggregation=aggregation,
        init=init,
        summary=summary,
        top_k=top_k if aggregation == "ssc" else None,  # only ssc reads it
        gate_scale=float(gate_scale),
        plan=plan,
        batch_size=B,
        num_heads=H,
        key_dim=Dk,
        value_dim=Dv,
        dtype=dtype,
        deep=(mini_batch, bool(norm), max_grad_norm, float(eps), decay_to, Dh) if deep else None,
    )
    gates = {
        n: x for n, x in (("eta", eta), ("g", g), ("beta", beta), ("lam", lam)) if x is not None
    }
    # The scans and reads mix a call's tokens in matmuls: non-finite inputs take the guarded
    # path that keeps them causal (ops/nonfinite.py). A deep stream recomputes its open
    # mini-batch's tokens with this call's, so they count too.
    pending = cache.pending if deep and cache is not None and cache.pending else {}
    inputs = (q, k, v, *pending.values()) + ((u,) if aggregation in GATED_AGGREGATIONS else ())
    mixes = impl == "chunk" and T + (cache.pending_tokens if pending else 0) > 1
    finite = check_values(inputs if mixes else (), gates, rule)

    if impl == "reference":
        if streaming:
            raise ValueError(
                "impl='reference' computes whole sequences only: it takes no cache and returns none"
            )
        lengths = list(plan.lengths) if plan.lengths else _constant_lengths(T, plan.size)
        common = dict(
            rule=rule,
            lengths=lengths,
            aggregation=aggregation,
            top_k=top_k,
            init=init,
            summary=summary,
            gate_scale=gate_scale,
            initial_state=initial_state,
        )
        if deep:
            o = deep_memory_caching_reference(
                q,
                k,
                v,
                u,
                eta=eta,
                g=g,
                beta=beta,
                init_weights=init_weights,
                mini_batch=mini_batch,
                norm=norm,
                max_grad_norm=max_grad_norm,
                eps=eps,
                decay_to=decay_to,
                **common,
            )
        else:
            o = memory_caching_reference(q, k, v, u, gates=gates, **common)
        return o.to(q.dtype)

    if cache is None:
        cache = (
            empty_deep_cache(config, init_weights, initial_state, dtype, q.device)
            if deep
            else empty_cache(config, initial_state, dtype, q.device)
        )
    else:
        if initial_state is not None:
            raise ValueError(
                "initial_state starts a new stream; a continued stream takes its "
                "state from cache (pass one or the other)"
            )
        cache.config.check_matches(config)
    # States accumulate in fp32 (fp64 for fp64 inputs): autocast must not lower the scan.
    with autocast_off(q.device.type):
        cast = {n: x.to(dtype) for n, x in gates.items()}
        args = (
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            None if u is None else u.to(dtype),
            cast,
            cache,
        )
        if deep:
            o, new_cache = deep_memory_caching_forward(*args, init_weights, finite=finite)
        else:
            o, new_cache = memory_caching_forward(*args, chunk_size=chunk_size, finite=finite)
    o = o.to(q.dtype)
    return (o, new_cache) if output_cache else o


def _constant_lengths(T: int, size: int) -> list[int]:
    return [size] * (T // size) + ([T % size] if T % size else [])
