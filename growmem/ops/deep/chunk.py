"""Mini-batch-parallel form of the deep memories (the dual form of TTT / Titans).

Inside a mini-batch every inner gradient is taken at the entry weights W (read convention in
naive.py), and momentum and decay are linear scans, so the weights after token t are

    W_t = α_t W + ρ_t Σ + Σ_{j<=t} C[t, j] w_j ∇ℓ_j,     w_j = -η_j (times the norm clamp)

with α_t = Π_{i<=t} a_i, ρ_t = Σ_{l<=t} (Π_{i=l+1..t} a_i)(Π_{i<=l} β_i) and C = A @ Bm the
composition of the decay and momentum scans (dla: α = 1, ρ = 0, C = 1 on j <= t). The
gradients are rank one (∇_W1 ℓ_j = d1_j h_j^T, ∇_W2 ℓ_j = d2_j k_j^T), so reading M_{W_t}(q_t)
never forms per-token weights:

    z_t = α_t W2 q_t + ρ_t Σ2 q_t + Σ_j C[t, j] w_j (k_j·q_t) d2_j
    y_t = α_t W1 σ(z_t) + ρ_t Σ1 σ(z_t) + Σ_j C[t, j] w_j (h_j·σ(z_t)) d1_j
    o_t = q_t + N(y_t)

Mini-batches may be shorter than the others (a mini-batch grid that restarts at segment
starts, a partial last one); they are padded at their end, which cannot affect earlier
tokens, and the state leaving a mini-batch is read at its last real row.
"""

from __future__ import annotations

import math

import torch

from growmem.ops.caching.reads import mixed_read_list
from growmem.ops.deep.mlp import (
    DeepState,
    clamp_momentum,
    gelu,
    gradient_norm,
    inner_gradients,
    layer_norm,
    mlp_forward,
    start_state,
)
from growmem.ops.precision import compute_dtype


def _decay_matrix(logs: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_j) on j <= t, 0 above, for cumulative logs L [..., b] -> [..., b, b]."""
    b = logs.shape[-1]
    causal = torch.ones(b, b, dtype=torch.bool, device=logs.device).tril()
    return (logs.unsqueeze(-1) - logs.unsqueeze(-2)).masked_fill(~causal, -math.inf).exp()


def chunk_deep_memory(
    q,
    k,
    v,
    *,
    rule,
    eta,
    g=None,
    beta=None,
    init_weights,
    initial_state=None,
    batch_lengths,
    end_batches=(),
    norm=True,
    max_grad_norm=None,
    eps=1e-5,
    soup=None,
):
    """Deep memory over mini-batches of the given lengths.

    Args:
        q, k, v: [B, T, H, D]; eta, g, beta: [B, T, H] (g, beta for titans only).
        init_weights: (W1 [H, Dv, Dh], W2 [H, Dh, Dk]).
        initial_state: DeepState of [B, H, ...] tensors, or None.
        batch_lengths: mini-batch lengths summing to T (each <= the longest).
        end_batches: indices of mini-batches whose leaving state to return.
        norm, max_grad_norm, eps: see ``deep_memory``.
        soup: Memory Soup with cached memories, or None. A dict with gamma_online [B, T, H],
            z_cached [B, T, H, Dh] (Σ_i γ_i W2^(i) q_t), W1_cached_t (a list of the cached
            W1^(i) transposed, [B, H, Dh, Dv] each), gamma_cached [B, H, T, N] and visible
            (caches each mini-batch reads). Token t then reads the memory whose weights are
            the γ-mix of the cached ones and of its own online weights W_t:
            o_t = q_t + N(W1*_t σ(W2*_t q_t)).

    Returns:
        o [B, T, H, D]; states: DeepState of [B, len(end_batches), H, ...]; the final state
        (leaving the last mini-batch); the state entering the last mini-batch.
    """
    B, T = q.shape[:2]
    dtype = compute_dtype(q)
    titans = rule == "titans"
    b = max(batch_lengths)
    lengths = torch.tensor(batch_lengths, device=q.device)
    starts = torch.cumsum(lengths, 0) - lengths
    # token index of every padded slot (T: a zero row appended for the padding)
    slot = starts[:, None] + torch.arange(b, device=q.device)[None, :]  # [NB, b]
    real = torch.arange(b, device=q.device)[None, :] < lengths[:, None]
    slot = torch.where(real, slot, torch.full_like(slot, T))

    def batched(x):  # [B, T, H, ...] -> [NB, B, H, b, ...] (zero-padded)
        x = torch.cat([x.to(dtype), x.new_zeros(B, 1, *x.shape[2:], dtype=dtype)], 1)
        x = x[:, slot]  # [B, NB, b, H, ...]
        return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()

    Q, K, V = batched(q), batched(k), batched(v)  # [NB, B, H, b, D]
    step = -batched(eta)  # [NB, B, H, b]
    last = (lengths - 1).tolist()  # row of each mini-batch's last real token
    if titans:
        log_a = batched(g).cumsum(-1)
        log_b = clamp_momentum(batched(beta)).log().cumsum(-1)  # pads too
        A, Bm = _decay_matrix(log_a), _decay_matrix(log_b)  # [NB, B, H, b, b]
        alpha, beta_cum = log_a.exp(), log_b.exp()  # [NB, B, H, b]
        C = A @ Bm
        rho = (A @ beta_cum.unsqueeze(-1)).squeeze(-1)
    else:
        C = torch.ones(b, b, dtype=dtype, device=q.device).tril()
    QK = Q @ K.transpose(-1, -2)  # [NB, B, H, b, b]

    W1, W2, S1, S2 = start_state(init_weights, initial_state, rule, B, dtype)

    if soup is not None:
        gamma_on = batched(soup["gamma_online"]).unsqueeze(-1)  # [NB, B, H, b, 1]
        z_cached = batched(soup["z_cached"])  # [NB, B, H, b, Dh]
        gamma_cached = batched(soup["gamma_cached"].permute(0, 2, 1, 3))  # [NB, B, H, b, N]
        soup_batch = list(
            zip(
                gamma_on.unbind(0),
                z_cached.unbind(0),
                gamma_cached.unbind(0),
                soup["visible"],
                strict=True,
            )
        )

    outs, kept, entry = [], {}, None
    wanted = set(end_batches)
    # Per-mini-batch slices come from one unbind each: indexing [m] inside the loop would
    # make the backward zero-fill a full-size gradient per mini-batch (O(NB^2) work).
    per_batch = [x.unbind(0) for x in (Q, K, V, step, QK)]
    if titans:
        per_batch += [x.unbind(0) for x in (C, alpha, rho, Bm, beta_cum)]
    for m, sliced in enumerate(zip(*per_batch, strict=True)):
        entry = DeepState(W1, W2, S1, S2)
        Qm, Km, Vm, w, QKm = sliced[:5]
        if titans:
            Cm, alpha_m, rho_m, Bm_m, beta_cum_m = sliced[5:]
        out_k, cache = mlp_forward(Km, W1, W2, norm, eps)
        d1, h, d2 = inner_gradients(rule, Km, Vm, W1, cache, out_k)
        if max_grad_norm is not None:
            w = w / torch.clamp(gradient_norm(Km, d1, h, d2) / max_grad_norm, min=1.0)
        Cw = (Cm if titans else C) * w.unsqueeze(-2)  # [B, H, b, b]: C[t, j] w_j
        z = Qm @ W2.transpose(-1, -2)
        if titans:
            z = alpha_m.unsqueeze(-1) * z + rho_m.unsqueeze(-1) * (Qm @ S2.transpose(-1, -2))
        z = z + (Cw * QKm) @ d2
        if soup is None:
            hq = gelu(z)  # z = W2_t q_t: the online weights read q
        else:  # Memory Soup: the γ-mix of the cached and the online W2 reads q
            g_on, z_c, g_c, n = soup_batch[m]
            hq = gelu(g_on * z + z_c)
        y = hq @ W1.transpose(-1, -2)  # W1_t applied to hq, by the same dual form
        if titans:
            y = alpha_m.unsqueeze(-1) * y + rho_m.unsqueeze(-1) * (hq @ S1.transpose(-1, -2))
        y = y + (Cw * (hq @ h.transpose(-1, -2))) @ d1
        if soup is not None:
            y = g_on * y
            if n:  # + Σ_i γ_i W1^(i) hq over the visible caches
                y = y + mixed_read_list(hq, g_c, soup["W1_cached_t"][:n])
        outs.append(Qm + (layer_norm(y, eps)[0] if norm else y))

        # the state leaving the mini-batch: row r of the formulas above
        r = last[m]
        c_r = Cw[..., r, :].unsqueeze(-1)  # [B, H, b, 1]
        dW1 = (d1 * c_r).transpose(-1, -2) @ h  # [B, H, Dv, Dh]
        dW2 = (d2 * c_r).transpose(-1, -2) @ Km  # [B, H, Dh, Dk]
        if titans:
            m_r = (Bm_m[..., r, :] * w).unsqueeze(-1)  # momentum weights of the row
            a_r, p_r = alpha_m[..., r, None, None], rho_m[..., r, None, None]
            W1, W2 = a_r * W1 + p_r * S1 + dW1, a_r * W2 + p_r * S2 + dW2
            b_r = beta_cum_m[..., r, None, None]
            S1 = b_r * S1 + (d1 * m_r).transpose(-1, -2) @ h
            S2 = b_r * S2 + (d2 * m_r).transpose(-1, -2) @ Km
        else:
            W1, W2 = W1 + dW1, W2 + dW2
        if m in wanted:
            kept[m] = DeepState(W1, W2, S1, S2)

    O = torch.stack(outs)  # [NB, B, H, b, D]
    O = O.permute(1, 0, 3, 2, 4)[:, real]  # [B, T, H, D] (real slots in token order)
    states = [kept[m] for m in end_batches]
    stacked = (
        DeepState(
            *(
                None if parts[0] is None else torch.stack(parts, 1)
                for parts in zip(*states, strict=True)
            )
        )
        if states
        else None
    )
    return O, stacked, DeepState(W1, W2, S1, S2), entry
