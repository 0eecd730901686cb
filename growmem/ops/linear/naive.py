"""Per-token reference of the linear-family memory rules: the tests' ground truth.

A plain loop over tokens that spells out docs/design.md §2.1 one equation per line. The state
S [B, H, Dv, Dk] is written with token t, then token t reads it: o_t = S_t q_t.
"""

from __future__ import annotations

import torch

from growmem.ops.precision import compute_dtype


def linear_step(
    rule: str,
    S: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    k_prev: torch.Tensor | None,
    v_prev: torch.Tensor | None,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token's update of the state S [B, H, Dv, Dk] (docs/design.md §2.1).

    Args:
        k_t: [B, H, Dk], v_t: [B, H, Dv]: this token's key and value.
        k_prev, v_prev: the previous token's key and value (read by swla only; may be None
            for the other rules).
        g, beta, lam: [B, H] this token's gates, as the rule needs.
    """

    def outer(x, y):  # [B, H, Dv], [B, H, Dk] -> [B, H, Dv, Dk]
        return x.unsqueeze(-1) * y.unsqueeze(-2)

    def apply(M, x):  # [B, H, Dv, Dk] @ [B, H, Dk] -> [B, H, Dv]
        return (M @ x.unsqueeze(-1)).squeeze(-1)

    write = outer(v_t, k_t)
    a_t = None if g is None else torch.exp(g)[..., None, None]
    b_t = None if beta is None else beta[..., None, None]
    if rule == "linear":
        return S + write
    if rule == "decay":
        return a_t * S + write
    if rule == "delta":
        return S + b_t * outer(v_t - apply(S, k_t), k_t)
    if rule == "gated_delta":
        return a_t * S + b_t * outer(v_t - apply(a_t * S, k_t), k_t)
    if rule == "swla":
        return a_t * S + b_t * outer(v_prev, k_prev) + lam[..., None, None] * write
    raise ValueError(f"rule must be one of linear, decay, delta, gated_delta, swla, got {rule!r}")


def linear_memory_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rule: str,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    ends: list[int] | None = None,
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one memory rule token by token.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta, lam: [B, T, H] as the rule needs.
        rule: one of linear, decay, delta, gated_delta, swla.
        initial_state: [B, H, Dv, Dk] or None (zeros).
        ends: token counts after which to record the state (e.g. [C, 2C, T]); None records
            only the final state.
        prev_kv: swla only: (k [B, H, Dk], v [B, H, Dv]) of the token before q[:, 0].

    Returns:
        o: [B, T, H, Dv]; states: [B, H, Dv, Dk] (final) when ends is None,
        else [B, len(ends), H, Dv, Dk]; both float32 (float64 for float64 inputs).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = compute_dtype(q)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    S = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state.to(dtype)
    if prev_kv is None:
        k_prev, v_prev = q.new_zeros(B, H, Dk), q.new_zeros(B, H, Dv)
    else:
        k_prev, v_prev = prev_kv[0].to(dtype), prev_kv[1].to(dtype)
    end_set = set(ends) if ends is not None else set()
    outputs, recorded = [], []
    for t in range(T):
        gates_t = {
            n: x[:, t].to(dtype)
            for n, x in (("g", g), ("beta", beta), ("lam", lam))
            if x is not None
        }
        S = linear_step(rule, S, k[:, t], v[:, t], k_prev, v_prev, **gates_t)
        k_prev, v_prev = k[:, t], v[:, t]
        outputs.append(torch.einsum("bhvk,bhk->bhv", S, q[:, t]))
        if t + 1 in end_set:
            recorded.append(S)
    o = torch.stack(outputs, dim=1)
    states = S if ends is None else torch.stack(recorded, dim=1)
    return o, states
