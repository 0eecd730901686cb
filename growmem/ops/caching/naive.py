"""Per-token reference of Memory Caching, for any memory backend: the tests' ground truth.

It follows docs/design.md §3 literally, one token at a time: every cached memory is read
explicitly (no prefix sums, no routing, no mixing inside a scan), each aggregation is
spelled out by name on purpose, since this is the spec, and so is every option of the gates
(§3.2: the summaries' source, stop-gradient, centring and normalisation, scale, temperature
and online bias). The memory itself is the backend's
per-token step and read (ops/caching/backend.py); soup mixes the memories' parameters tensor by
tensor and reads the mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from growmem.ops.aggregations import aggregation as lookup_aggregation
from growmem.ops.caching.backend import backend_for
from growmem.ops.caching.gates import EPS, GATE_INPUTS
from growmem.ops.caching.segments import SegmentPlan
from growmem.ops.caching.select import log_bucket_summaries, select_top_k
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
        gates: dict of the rule's [B, T, H] gates and of the optional gate inputs
            temperature, online_bias ([B, T, H]) and summary_keys ([B, T, H, Dk]);
            init_weights, initial_state: as in ``memory_caching``.

    Returns:
        o: [B, T, H, Dv] (float64 for float64 inputs, float32 otherwise). Non-finite inputs
        give the NaN outputs of the fast path (ops/nonfinite.py), so the two agree on them too.
    """
    backend = backend_for(memory)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = compute_dtype(q)
    aggregation, summary, init = caching.aggregation, caching.summary, caching.init
    gated = lookup_aggregation(aggregation).gated
    writes = {"k": k, "v": v, **(gates or {})}
    extra = {n: writes.pop(n) for n in GATE_INPUTS if n in writes}
    if not gated:  # other aggregations ignore u and the gate inputs
        u, extra = None, {}
    # τ and b weigh one token's read (as u); summary keys write the summaries (as k)
    by_token = {"q": q, "u": u, **{n: x for n, x in extra.items() if n != "summary_keys"}}
    if "summary_keys" in extra:
        writes["summary_keys"] = extra["summary_keys"]
    finite = check_values(tuple(x for x in (*by_token.values(), *writes.values()) if x is not None))
    guard = NonFiniteGuard(by_token, writes, finite)
    by_token = {n: x.to(dtype) for n, x in guard.reads.items()}
    q, u, tau, bias = (by_token.get(n) for n in ("q", "u", "temperature", "online_bias"))
    writes = {n: x.to(dtype) for n, x in guard.writes.items()}
    k, v = writes.pop("k"), writes.pop("v")
    s_keys = writes.pop("summary_keys", k)  # the vectors summarised
    gate_scale = caching.gate_scale_for(Dk)
    gate_norm = caching.gate_norm
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
        key_sum, count = key_sum + s_keys[:, t], count + 1
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
            c_online = key_sum / count if summary == "mean" else key_sum  # [B, H, Dk]
            candidates = list(cached_summaries)
            if caching.detach_summaries:  # the gates only: the memories keep their gradient
                c_online, candidates = c_online.detach(), [c.detach() for c in candidates]
            if gate_norm == "centered":  # on the mean of the summaries token t sees
                m = (sum(candidates) + c_online) / (len(candidates) + 1)
                c_online, candidates = c_online - m, [c - m for c in candidates]
            reads = torch.stack(reads, -2)  # [B, H, n, Dv]
            if aggregation == "loglinear":  # buckets of segments, each read at its end
                candidates, ends = log_bucket_summaries(candidates, summary)
                reads = reads[:, :, ends]
            u_t = u[:, t]  # [B, H, Dk]
            if gate_norm in ("l2", "centered"):
                u_t = F.normalize(u_t, dim=-1, eps=EPS)
                c_online = F.normalize(c_online, dim=-1, eps=EPS)
                candidates = [F.normalize(c, dim=-1, eps=EPS) for c in candidates]
            u_t = u_t * gate_scale * (1.0 if tau is None else tau[:, t, :, None])
            r_online = (u_t * c_online).sum(-1)  # [B, H]
            if bias is not None:
                r_online = r_online + bias[:, t]
            r_cached = torch.stack([(u_t * c).sum(-1) for c in candidates], -1)  # [B, H, m]
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
