"""Per-token reference of Memory Caching, for any memory backend: the tests' ground truth.

It follows docs/design.md §3 literally, one token at a time: every cached memory is read
explicitly (no prefix sums, no routing, no mixing inside a scan), and each aggregation is
spelled out by name on purpose, since this is the spec. The memory itself is the backend's
per-token step and read (ops/caching/backend.py); soup mixes the memories' parameters tensor by
tensor and reads the mix.
"""

from __future__ import annotations

import math

import torch

from growmem.ops.aggregations import aggregation as lookup_aggregation
from growmem.ops.caching.backend import backend_for
from growmem.ops.caching.segments import SegmentPlan
from growmem.ops.caching.select import log_bucket_scores, select_top_k
from growmem.ops.checks import check_values
from growmem.ops.nonfinite import NonFiniteGuard
from growmem.ops.precision import compute_dtype


def memory_caching_reference(
    q, k, v, u=None, *, memory, caching, gates=None, init_weights=None, initial_state=None
):
    """Memory Caching token by token (unchecked arguments: ``memory_caching`` checks them).

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] or None.
        memory: MatrixMemory or DeepMemory (any memory with a backend); caching: Caching.
        gates: dict of the rule's [B, T, H] gates; init_weights, initial_state: as in
            ``memory_caching``.

    Returns:
        o: [B, T, H, Dv] (float64 for float64 inputs, float32 otherwise). Non-finite inputs
        give the NaN outputs of the fast path (ops/nonfinite.py), so the two agree on them too.
    """
    backend = backend_for(memory)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = compute_dtype(q)
    aggregation, summary, init = caching.aggregation, caching.summary, caching.init
    u = u if lookup_aggregation(aggregation).gated else None  # other aggregations ignore it
    writes = {"k": k, "v": v, **(gates or {})}
    finite = check_values(tuple(x for x in (q, u, *writes.values()) if x is not None))
    guard = NonFiniteGuard({"q": q, "u": u}, writes, finite)
    q, u = (None if x is None else x.to(dtype) for x in (guard.reads["q"], guard.reads.get("u")))
    writes = {n: x.to(dtype) for n, x in guard.writes.items()}
    k, v = writes.pop("k"), writes.pop("v")
    gate_scale = 1.0 / math.sqrt(Dk) if caching.gate_scale is None else caching.gate_scale
    plan = SegmentPlan.build(T, caching.segment_size, caching.segments)
    starts = {a for a, _ in plan.pieces(0, T)[1:]}

    start = backend.ref_start(B, H, Dk, Dv, init_weights, initial_state, dtype, q.device)
    state, count = start, 0
    key_sum = q.new_zeros(B, H, Dk)
    cached, cached_summaries = [], []  # memories and [B, H, Dk] summaries
    outputs = []
    for t in range(T):
        if t in starts:  # the previous segment is finished: cache it
            cached.append(backend.ref_memory(state))
            cached_summaries.append(key_sum / count if summary == "mean" else key_sum)
            key_sum, count = torch.zeros_like(key_sum), 0
            if init == "independent":
                state = start
        state = backend.ref_step(state, t, k, v, writes, count)
        key_sum, count = key_sum + k[:, t], count + 1
        q_t = q[:, t]  # [B, H, Dk]
        online = backend.ref_read(backend.ref_memory(state), q_t)
        reads = [backend.ref_read(m, q_t) for m in cached]  # M^(i)(q_t), [B, H, Dv] each
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
                top, idx = select_top_k(r_cached, min(caching.top_k, len(cached)))
                reads = reads.gather(2, idx[..., None].expand(-1, -1, -1, Dv))
                r_cached = top
            gamma = torch.softmax(torch.cat([r_cached, r_online[..., None]], -1), -1)
            if aggregation == "soup":  # mix the memories' parameters, then read the mix
                memories = [*cached, backend.ref_memory(state)]
                y = backend.ref_read(_mix(memories, gamma), q_t)
            else:
                y = (gamma[..., :-1, None] * reads).sum(-2) + gamma[..., -1:] * online
        outputs.append(y)
    return guard.output(torch.stack(outputs, dim=1))


def _mix(memories: list, gamma: torch.Tensor):
    """Σ_i γ_i m_i, parameter by parameter: memories are [B, H, ...] tensors or tuples of them;
    gamma [B, H, len(memories)]."""

    def weighted(i, x):
        return gamma[:, :, i].view(*gamma.shape[:2], *([1] * (x.dim() - 2))) * x

    if isinstance(memories[0], torch.Tensor):
        return sum(weighted(i, m) for i, m in enumerate(memories))
    return tuple(
        sum(weighted(i, m[j]) for i, m in enumerate(memories)) for j in range(len(memories[0]))
    )
