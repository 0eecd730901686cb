"""Chunkwise-parallel form of the linear-family memory rules.

Tokens are grouped in chunks of C. Inside a chunk, with G_i the cumulative log-decay up to
token i (G = 0 for rules without decay), Γ_i = exp(G_i) and S_0 the state entering the chunk,
every rule has the form

    S_i = Γ_i S_0 + Σ_{j<=i} exp(G_i - G_j) u_j k_j^T,       o_i = S_i q_i,

with "pseudo-values" u_j. For linear and decay u_j = v_j. swla writes two outer products
per token (λ_j v_j k_j^T and β_j v_{j-1} k_{j-1}^T, both decayed from position j), so its
chunk simply lists 2C (u, k) pairs. For the delta rules the pseudo-values depend on the state
(UT transform, as in DeltaNet / Gated DeltaNet):

    u_i = β_i (v_i - Γ_i S_0 k_i - Σ_{j<i} exp(G_i - G_j) (k_j·k_i) u_j)
    => (I + L) U = β V - (β Γ K) S_0^T,   L_ij = β_i exp(G_i - G_j) k_i·k_j  (j < i)
    => U = U0 - W S_0^T with U0 = (I + L)^{-1} β V, W = (I + L)^{-1} β Γ K.

Everything but the chunk-to-chunk state recurrence is batched over all chunks; only the
recurrence is a Python loop over chunks (T / C steps). For rules without the delta term that
loop is a pure elementwise scan; with it, each step is three small matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """[B, H, T, ...] -> [B, H, NC, C, ...], zero-padding T up to NC * C."""
    pad = n_chunks * chunk - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], n_chunks, chunk, *x.shape[3:])


def _shift_one(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> x shifted right by one token along T, ``first`` [B, H, D] in front."""
    return torch.cat([first.unsqueeze(2), x[:, :, :-1]], dim=2)


def chunk_linear_memory(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel memory scan; same contract as ``linear_memory_reference``.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta, lam: [B, T, H] as the rule needs.
        rule: linear, decay, delta, gated_delta or swla.
        initial_state: [B, H, Dv, Dk] or None (zeros).
        ends: token counts (1..T) after which to return the state; None returns the final one.
        prev_kv: swla only: (k [B, H, Dk], v [B, H, Dv]) of the token before q[:, 0].
        chunk_size: tokens per chunk (a compute detail: results do not depend on it).

    Returns:
        o: [B, T, H, Dv]; states: [B, H, Dv, Dk] or [B, len(ends), H, Dv, Dk]; both in the
        compute dtype (float64 for float64 inputs, float32 otherwise).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = min(chunk_size, T)
    NC = math.ceil(T / C)
    delta = rule in ("delta", "gated_delta")

    def heads_first(x):  # [B, T, H, ...] -> [B, H, T, ...] in the compute dtype
        return x.to(dtype).transpose(1, 2)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)  # [B, H, T, D]
    g = heads_first(g) if g is not None else q.new_zeros(B, H, T)  # [B, H, T]

    Q, K, V = (_to_chunks(x, NC, C) for x in (q, k, v))  # [B, H, NC, C, D]
    G = _to_chunks(g, NC, C).cumsum(-1)  # [B, H, NC, C] cumulative log-decay in the chunk
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    pos = torch.arange(C, device=q.device)

    # The (u, k) pairs each chunk writes, with their positions in the chunk.
    if rule == "swla":
        if prev_kv is None:
            k_first, v_first = q.new_zeros(B, H, Dk), q.new_zeros(B, H, Dv)
        else:
            k_first, v_first = prev_kv[0].to(dtype), prev_kv[1].to(dtype)
        lam_c = _to_chunks(heads_first(lam), NC, C).unsqueeze(-1)  # [B, H, NC, C, 1]
        beta_c = _to_chunks(heads_first(beta), NC, C).unsqueeze(-1)
        K_prev = _to_chunks(_shift_one(k, k_first), NC, C)
        V_prev = _to_chunks(_shift_one(v, v_first), NC, C)
        Kw = torch.cat([lam_c * K, beta_c * K_prev], dim=-2)  # [B, H, NC, 2C, Dk]
        Vw = torch.cat([V, V_prev], dim=-2)  # [B, H, NC, 2C, Dv]
        Gw = torch.cat([G, G], dim=-1)  # [B, H, NC, 2C]
        causal_w = torch.cat([causal, causal], dim=-1)  # [C, 2C]
        pos_w = torch.cat([pos, pos])
    else:
        Kw, Vw, Gw, causal_w, pos_w = K, V, G, causal, pos

    # exp(G_i - G_j) on the causal part, 0 above it: [B, H, NC, C, Cw]
    decay = (G.unsqueeze(-1) - Gw.unsqueeze(-2)).masked_fill(~causal_w, -math.inf).exp()
    A = (Q @ Kw.transpose(-1, -2)) * decay  # intra-chunk read weights
    gamma = G.exp()  # [B, H, NC, C]: decay from the chunk start to token i
    gamma_end = gamma[..., -1]  # [B, H, NC]
    Q_dec = Q * gamma.unsqueeze(-1)  # queries reading the entering state
    K_dec = Kw * (G[..., -1:] - Gw).exp().unsqueeze(-1)  # keys decayed to the chunk end

    S = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state.to(dtype)
    if delta:
        beta_c = _to_chunks(heads_first(beta), NC, C).unsqueeze(-1)  # [B, H, NC, C, 1]
        strict = ((beta_c * K) @ K.transpose(-1, -2) * decay).tril(-1)  # L of the UT transform
        rhs = torch.cat([beta_c * V, beta_c * gamma.unsqueeze(-1) * K], dim=-1)
        X = torch.linalg.solve_triangular(strict, rhs, upper=False, unitriangular=True)
        U0, W = X.split([Dv, Dk], dim=-1)  # [B, H, NC, C, Dv], [B, H, NC, C, Dk]
        starts, pseudo, outs = [], [], []
        for Qd_c, A_c, U0_c, W_c, Kd_c, ge_c in zip(
            Q_dec.unbind(2), A.unbind(2), U0.unbind(2), W.unbind(2), K_dec.unbind(2),
            gamma_end.unbind(2), strict=True,
        ):
            starts.append(S)
            St = S.transpose(-1, -2)  # [B, H, Dk, Dv]
            U_c = U0_c - W_c @ St  # [B, H, C, Dv]
            outs.append(Qd_c @ St + A_c @ U_c)
            pseudo.append(U_c)
            S = ge_c[..., None, None] * S + U_c.transpose(-1, -2) @ Kd_c
        O = torch.stack(outs, dim=2)  # [B, H, NC, C, Dv]
        Uw = torch.stack(pseudo, dim=2)
        S_starts = torch.stack(starts, dim=2)  # [B, H, NC, Dv, Dk]
    else:
        Uw = Vw
        delta_S = Vw.transpose(-1, -2) @ K_dec  # [B, H, NC, Dv, Dk]: each chunk's own write
        starts = []
        for dS_c, ge_c in zip(delta_S.unbind(2), gamma_end.unbind(2), strict=True):
            starts.append(S)
            S = ge_c[..., None, None] * S + dS_c
        S_starts = torch.stack(starts, dim=2)
        O = Q_dec @ S_starts.transpose(-1, -2) + A @ Vw

    o = O.reshape(B, H, NC * C, Dv)[:, :, :T].transpose(1, 2)  # [B, T, H, Dv]
    if ends is None:
        return o, S

    # State after token p (1-based) = the state entering its chunk, decayed to position r,
    # plus the chunk's writes up to r: S_p = Γ_r S_start + Σ_{j<=r} exp(G_r - G_j) u_j k_j^T.
    p = torch.as_tensor(ends, device=q.device) - 1
    c, r = p // C, p % C  # [nb]
    G_r = G[:, :, c].gather(-1, r.expand(B, H, -1).unsqueeze(-1)).squeeze(-1)  # [B, H, nb]
    w = (G_r.unsqueeze(-1) - Gw[:, :, c]).masked_fill(pos_w > r.unsqueeze(-1), -math.inf).exp()
    writes = (Uw[:, :, c] * w.unsqueeze(-1)).transpose(-1, -2) @ Kw[:, :, c]  # [B, H, nb, Dv, Dk]
    states = G_r.exp()[..., None, None] * S_starts[:, :, c] + writes
    return o, states.transpose(1, 2)  # [B, nb, H, Dv, Dk]
