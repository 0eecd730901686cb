"""Public entry point of Memory Caching: argument checks, then the parallel/streaming path."""

from __future__ import annotations

import torch

from growmem.ops.aggregations import AGGREGATIONS
from growmem.ops.caching import matrix, mlp  # noqa: F401  (register the two backends)
from growmem.ops.caching.backend import backend_for
from growmem.ops.caching.cache import CachingConfig, MemoryCache
from growmem.ops.caching.core import empty_cache, memory_caching_forward
from growmem.ops.caching.gates import GATE_INPUTS, GateInputs
from growmem.ops.caching.legacy import from_keywords
from growmem.ops.caching.naive import memory_caching_reference
from growmem.ops.caching.read_impl import IMPLS, resolve_reads
from growmem.ops.caching.segments import SegmentPlan
from growmem.ops.checks import check_choice, check_qkv, check_shape, check_tensor, check_values
from growmem.ops.precision import autocast_off, compute_dtype
from growmem.ops.spec import INITS, SUMMARIES, Caching

__all__ = ["AGGREGATIONS", "INITS", "SUMMARIES", "check_caching_choices", "memory_caching"]


def check_caching_choices(aggregation: str, init: str, summary: str) -> None:
    """Raise ValueError unless aggregation, init and summary are known and fit together."""
    Caching(aggregation, init=init, summary=summary)


def memory_caching(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    memory=None,
    caching: Caching | None = None,
    gates: dict[str, torch.Tensor] | None = None,
    init_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
    initial_state=None,
    cache: MemoryCache | None = None,
    output_cache: bool = False,
    impl: str = "auto",
    **keywords,
) -> torch.Tensor | tuple[torch.Tensor, MemoryCache]:
    """A recurrent memory whose checkpoints at segment ends are cached and read later.

    docs/design.md §3: the sequence is cut into segments; the memory runs inside each
    (``caching.init``), each finished segment's final memory M^(i) and key summary c_i are
    cached, and token t of segment s outputs an aggregation of its online memory M^(s)_t(q_t)
    and of the cached M^(i)(q_t), i < s, gated by r_{t,i} = gate_scale · τ_t · <û_t, ĉ_i>
    (+ b_t for the online memory; ``ops/caching/gates.py``).

    The default gates (``Caching()``) are cosine gates (``DEFAULT_GATE_NORM``) at scale 1, and
    τ is an input: without ``gates["temperature"]`` τ = 1, so the logits lie in [-1, 1] and
    the gates are soft. The layer passes its learnable per-head τ (initially
    ``MemoryConfig.gate_temperature``, 5 by default); an op-level call can do the same, e.g.
    ``gates={..., "temperature": torch.full((H,), 5.0)}``, or choose the scaled dot product
    (``Caching(gate_norm="none")``, scale 1/sqrt(Dk)).

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] gate queries (required by the
            gated aggregations grm, soup, ssc and loglinear; ignored otherwise).
        memory: the memory and its knobs: ``MatrixMemory(rule, chunk_size)`` (linear, decay,
            delta, gated_delta, swla; as ``linear_memory``) or ``DeepMemory(rule, mini_batch,
            norm, max_grad_norm, eps, decay_to)`` (dla, titans; as ``deep_memory``). For the
            deep rules the mini-batch grid restarts at every segment start, so the cached
            memories are the MLP weights at segment ends.
        caching: the Memory Caching choices (``Caching``: aggregation, segment_size or
            segments, top_k, init, summary, gate_scale, gate_norm, detach_summaries; default
            ``Caching()``: grm over segments of 256). Explicit segment lengths must sum to T
            (to at least the stream's length when streaming). loglinear (Log-Linear++) is grm
            over logarithmic buckets: a token that sees n finished segments reads them as the
            binary decomposition of n, oldest and largest first (11 -> buckets of 8, 2, 1
            segments), each through the memory at its end.
        gates: the rule's [B, T, H] gates by name (``memory.gates``): g (log-decay), beta
            (write strength; titans' momentum), lam (swla's current-token weight), eta (the
            deep rules' inner learning rate); and, optionally, Memory Caching's own gate
            inputs (read by the gated aggregations, ignored by the others, as u is):
            temperature τ ([H] or [B, T, H], multiplies the gate logits; default 1),
            online_bias b ([H]
            or [B, T, H], added to the online memory's logit) and summary_keys ([B, T, H,
            Dk], summarised instead of k).
        init_weights: the deep rules' learned initial weights (W1 [H, Dv, Dh], W2 [H, Dh, Dk]).
        initial_state: the memory before the first token (new streams only): [B, H, Dv, Dk]
            for a matrix memory, a DeepState of [B, H, ...] tensors for a deep one.
        cache: a MemoryCache from an earlier call: these tokens continue that stream.
        output_cache: also return the cache to continue from.
        impl: how to compute: "auto" (default: "triton" for CUDA tensors when triton
            imports, unless the inputs are float64; else "chunk"), "chunk" (the
            chunkwise-parallel PyTorch path), "triton" (the chunk path with the reads of
            cached matrix memories, grm, soup, ssc and loglinear, in Triton kernels,
            ops/caching/triton_reads.py; needs ``pip install 'growmem[triton]'`` and CUDA
            tensors, or CPU ones under ``TRITON_INTERPRET=1``) or "reference" (per-token
            loop; parallel calls only). Deep memories (titans, dla) read in PyTorch whatever
            impl is; residual and mean read prefix sums of the states, plain matmuls that
            stay in PyTorch.
        keywords: the deprecated keyword form (rule=, g=, segment_size=, aggregation=, ...),
            accepted for one release with a FutureWarning (ops/caching/legacy.py).

    Returns:
        o [B, T, H, Dv] in q's dtype, or (o, cache) when output_cache is True. A NaN or inf in
        q, k, v, u or a gate never reaches an earlier output: from a non-finite k, v or gate
        on, outputs and the returned cache are NaN; a non-finite q or u spoils its own output
        only (ops/nonfinite.py). Among the gate inputs, temperature and online_bias act as u,
        summary_keys as k.
    """
    if keywords:
        memory, caching, gates = from_keywords(memory, caching, gates, keywords)
    caching = Caching() if caching is None else caching
    if not isinstance(caching, Caching):
        raise TypeError(f"caching must be a Caching, got {type(caching).__name__}")
    backend = backend_for(memory)
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    gates, extra_gates = _check_gate_names(memory, gates)
    sizes = backend.check((B, T, H, Dk, Dv), gates, init_weights, initial_state)
    check_choice("impl", impl, IMPLS)
    dtype = compute_dtype(q)
    # the same backend, reading cached memories as impl asks (ops/caching/read_impl.py)
    backend = backend_for(memory, resolve_reads(impl, dtype, q.device))
    agg = caching.spec
    if agg.gated:
        if u is None:
            raise ValueError(
                f"u is required by aggregation {caching.aggregation!r}: a [B, T, H, Dk] "
                "tensor of gate queries"
            )
        check_tensor("u", u, 4, "[B, T, H, Dk]")
        check_shape("u", u, (B, T, H, Dk), "[B, T, H, Dk] like q")
        extra_gates = _check_gate_inputs(extra_gates, B, T, H, Dk)
    else:  # only the gated aggregations read them (as u)
        extra_gates = GateInputs()
    if cache is not None and not isinstance(cache, MemoryCache):
        raise ValueError(f"cache must be a MemoryCache, got {type(cache).__name__}")
    streaming = output_cache or cache is not None
    if impl == "reference" and streaming:
        raise ValueError(
            "impl='reference' computes whole sequences only: it takes no cache and returns none"
        )
    plan = _plan(caching, T, cache, streaming)
    config = CachingConfig(
        memory=memory,
        aggregation=caching.aggregation,
        init=caching.init,
        summary=caching.summary,
        top_k=caching.top_k if agg.select == "top_k" else None,  # nothing else reads it
        gate_scale=caching.gate_scale_for(Dk),
        gate_norm=caching.gate_norm,
        detach_summaries=caching.detach_summaries,
        summary_keys=extra_gates.summary_keys is not None,
        plan=plan,
        batch_size=B,
        num_heads=H,
        key_dim=Dk,
        value_dim=Dv,
        memory_sizes=sizes,
        dtype=dtype,
    )
    # The scans and reads mix a call's tokens in matmuls: non-finite inputs take the guarded
    # path that keeps them causal (ops/nonfinite.py). A stream's pending tokens are recomputed
    # with this call's, so they count too.
    pending = {} if cache is None else backend.pending(cache.online)
    inputs = (q, k, v, *pending.values()) + ((u,) if agg.gated else ())
    inputs += tuple(x for x in extra_gates if x is not None)
    tokens = T + (next(iter(pending.values())).shape[1] if pending else 0)
    finite = check_values(inputs if impl != "reference" and tokens > 1 else (), gates, memory.rule)

    if impl == "reference":
        named = {n: x for n, x in extra_gates._asdict().items() if x is not None}
        o = memory_caching_reference(
            q, k, v, u, memory=memory, caching=caching, gates={**gates, **named},
            init_weights=init_weights, initial_state=initial_state,
        )  # fmt: skip
        return o.to(q.dtype)
    if cache is None:
        cache = empty_cache(config, backend, init_weights, initial_state, q.device)
    else:
        if initial_state is not None:
            raise ValueError(
                "initial_state starts a new stream; a continued stream takes its "
                "state from cache (pass one or the other)"
            )
        cache.config.check_matches(config)
    # States accumulate in fp32 (fp64 for fp64 inputs): autocast must not lower the scan.
    with autocast_off(q.device.type):
        o, new_cache = memory_caching_forward(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            None if u is None else u.to(dtype),
            {n: x.to(dtype) for n, x in gates.items()},
            cache,
            backend,
            init_weights,
            finite=finite,
            extra_gates=GateInputs(*(None if x is None else x.to(dtype) for x in extra_gates)),
        )
    o = o.to(q.dtype)
    return (o, new_cache) if output_cache else o


def _check_gate_names(memory, gates) -> tuple[dict[str, torch.Tensor], GateInputs]:
    """The rule's gates as a dict without None entries, and Memory Caching's gate inputs; a
    name that is neither is a ValueError naming it (the backend checks the rule's gates,
    ``_check_gate_inputs`` the others)."""
    if gates is None:
        return {}, GateInputs()
    if not isinstance(gates, dict):
        raise ValueError(f"gates must be a dict of [B, T, H] tensors, got {type(gates).__name__}")
    gates = {n: x for n, x in gates.items() if x is not None}
    for name in gates:
        if name not in memory.gates and name not in GATE_INPUTS:
            raise ValueError(
                f"{name} is not used by rule {memory.rule!r} (it reads {list(memory.gates)}; "
                f"the gated aggregations also take {list(GATE_INPUTS)}); pass no {name}"
            )
    extra = GateInputs(**{n: gates.pop(n) for n in GATE_INPUTS if n in gates})
    return gates, extra


def _check_gate_inputs(extra: GateInputs, B: int, T: int, H: int, Dk: int) -> GateInputs:
    """The gate inputs checked, a per-head temperature or online_bias [H] expanded to
    [B, T, H]."""
    checked = {}
    for name in ("temperature", "online_bias"):
        x = getattr(extra, name)
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            check_tensor(name, x, 1, "[H]")
            check_shape(name, x, (H,), "[H] (one per head)")
            x = x.expand(B, T, H)
        elif x is not None:
            check_tensor(name, x, 3, "[H] or [B, T, H]")
            check_shape(name, x, (B, T, H), "[B, T, H]")
        checked[name] = x
    if extra.summary_keys is not None:
        check_tensor("summary_keys", extra.summary_keys, 4, "[B, T, H, Dk]")
        check_shape("summary_keys", extra.summary_keys, (B, T, H, Dk), "[B, T, H, Dk] like k")
    return GateInputs(**checked, summary_keys=extra.summary_keys)


def _plan(caching: Caching, T: int, cache: MemoryCache | None, streaming: bool) -> SegmentPlan:
    """The segmentation of the stream: a continued "log" stream keeps the one its first call
    made; explicit lengths must cover the call (the stream)."""
    if cache is not None and caching.segments == "log":
        plan = cache.config.plan
    else:
        plan = SegmentPlan.build(T, caching.segment_size, caching.segments)
    if plan.covered is not None:
        seen = 0 if cache is None else cache.seen_tokens
        if not streaming and plan.covered != T:
            raise ValueError(f"segments must sum to T = {T}, got {plan.covered}")
        if plan.covered < seen + T:
            raise ValueError(
                f"segments cover {plan.covered} tokens but the stream reaches "
                f"{seen + T}; when streaming, pass the whole stream's segment "
                "lengths (e.g. log_segments(total))"
            )
    return plan
