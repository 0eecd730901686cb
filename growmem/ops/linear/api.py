"""Public entry point of the linear-family scans: argument checks, then the chosen kernel."""

from __future__ import annotations

import torch

from growmem.ops.checks import (
    check_gates,
    check_positive_int,
    check_qkv,
    check_state,
    check_values,
)
from growmem.ops.linear.chunk import chunk_linear_memory
from growmem.ops.linear.naive import linear_memory_reference
from growmem.ops.nonfinite import NonFiniteGuard, poison
from growmem.ops.precision import autocast_off


def segment_ends(T: int, boundary: int) -> list[int]:
    """Token counts after which a state is recorded: C, 2C, ... and T if C does not divide T."""
    ends = list(range(boundary, T + 1, boundary))
    if not ends or ends[-1] != T:
        ends.append(T)
    return ends


def linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rule: str,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    boundary: int | None = None,
    chunk_size: int = 64,
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    impl: str = "chunk",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a linear-family memory over a sequence: o_t = S_t q_t (docs/design.md §2.1).

    Args:
        q, k: [B, T, H, Dk] queries and keys; v: [B, T, H, Dv] values.
        rule: ``linear`` S_t = S_{t-1} + v_t k_t^T; ``decay`` S_t = a_t S_{t-1} + v_t k_t^T;
            ``delta`` S_t = S_{t-1} + β_t (v_t - S_{t-1} k_t) k_t^T;
            ``gated_delta`` S_t = a_t S_{t-1} + β_t (v_t - a_t S_{t-1} k_t) k_t^T;
            ``swla`` S_t = a_t S_{t-1} + β_t v_{t-1} k_{t-1}^T + λ_t v_t k_t^T.
        g: [B, T, H] log-decay, a_t = exp(g_t) (decay, gated_delta, swla).
        beta: [B, T, H] write strength β (delta, gated_delta, swla).
        lam: [B, T, H] current-token weight λ (swla).
        initial_state: [B, H, Dv, Dk] state before the first token; None means zeros.
        boundary: if given, also return the states after tokens C, 2C, ... (and after the last
            token when C does not divide T) for C = boundary.
        chunk_size: chunk length of the parallel form; does not change results.
        prev_kv: swla only: (k [B, H, Dk], v [B, H, Dv]) of the token before q[:, 0], so that
            a sequence can be continued exactly; None means zeros (v_0 = k_0 = 0).
        impl: ``chunk`` (chunkwise-parallel, default) or ``reference`` (per-token loop).

    Returns:
        o: [B, T, H, Dv] in q's dtype. states: the final state [B, H, Dv, Dk] when boundary is
        None, else [B, ceil(T / boundary), H, Dv, Dk]; states are float32 (float64 for float64
        inputs), also under autocast. A NaN or inf in q, k, v or a gate never reaches an
        earlier output or state (ops/nonfinite.py): from a non-finite k, v or gate on,
        outputs and states are NaN; a non-finite q spoils its own output only.

    Raises:
        ValueError naming the argument, for bad shapes or options.
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    check_gates(rule, B, T, H, g=g, beta=beta, lam=lam)
    check_state("initial_state", initial_state, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
    check_positive_int("boundary", boundary, allow_none=True)
    check_positive_int("chunk_size", chunk_size)
    if prev_kv is not None:
        if rule != "swla":
            raise ValueError(f"prev_kv is only used by rule 'swla', got rule {rule!r}")
        if not isinstance(prev_kv, (tuple, list)) or len(prev_kv) != 2:
            raise ValueError("prev_kv must be a pair (k [B, H, Dk], v [B, H, Dv])")
        check_state("prev_kv[0]", prev_kv[0], (B, H, Dk), "[B, H, Dk]")
        check_state("prev_kv[1]", prev_kv[1], (B, H, Dv), "[B, H, Dv]")
    if impl not in ("chunk", "reference"):
        raise ValueError(f"impl must be 'chunk' or 'reference', got {impl!r}")

    gates = {n: x for n, x in (("g", g), ("beta", beta), ("lam", lam)) if x is not None}
    # The chunk form mixes a chunk's tokens in matmuls: non-finite inputs take the guarded
    # path that keeps them causal (one token has no future: no need).
    finite = check_values((q, k, v) if impl == "chunk" and T > 1 else (), gates, rule)

    ends = None if boundary is None else segment_ends(T, boundary)
    kwargs = dict(initial_state=initial_state, ends=ends, prev_kv=prev_kv)
    # States accumulate in fp32 (fp64 for fp64 inputs): autocast must not lower the scan.
    with autocast_off(q.device.type):
        if impl == "reference":  # the literal recurrence, NaN included
            o, states = linear_memory_reference(q, k, v, rule=rule, **gates, **kwargs)
            return o.to(q.dtype), states
        guard = NonFiniteGuard(dict(q=q), dict(k=k, v=v, **gates), finite)
        gates = dict(guard.writes)
        q, k, v = guard.reads["q"], gates.pop("k"), gates.pop("v")
        o, states = chunk_linear_memory(
            q, k, v, rule=rule, chunk_size=chunk_size, **gates, **kwargs
        )
    states = poison(states, guard.stream) if ends is None else guard.states_after(states, ends)
    return guard.output(o).to(q.dtype), states
