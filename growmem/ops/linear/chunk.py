"""Chunkwise-parallel form of the linear-family memory rules.

Tokens are grouped in chunks of C. Inside a chunk, with G_i the cumulative log-decay up to
token i (G = 0 for rules without decay), Γ_i = exp(G_i) and S_0 the state entering the chunk,
every rule has the form

    S_i = Γ_i S_0 + Σ_j coeff[i, j] u_j k_j^T,       o_i = S_i q_i,

over the (u, k) pairs the chunk writes. For linear and decay u_j = v_j and
coeff[i, j] = exp(G_i - G_j) for j <= i. swla writes each token twice (λ_j v_j k_j^T at
position j, β_{j+1} v_j k_j^T at position j + 1), which folds into one coefficient per pair,
plus one extra pair for the token before the chunk. For the delta rules the pseudo-values
depend on the state (UT transform, as in DeltaNet / Gated DeltaNet):

    u_i = β_i (v_i - Γ_i S_0 k_i - Σ_{j<i} exp(G_i - G_j) (k_j·k_i) u_j)
    => (I + L) U = β V - (β Γ K) S_0^T,   L_ij = β_i exp(G_i - G_j) k_i·k_j  (j < i)
    => U = U0 - W S_0^T with U0 = (I + L)^{-1} β V, W = (I + L)^{-1} β Γ K.

Everything but the chunk-to-chunk state recurrence is batched over all chunks; only the
recurrence is a Python loop over chunks (T / C steps). For rules without the delta term that
loop is a pure elementwise scan; with it, each step is two small matmuls, in a custom
autograd function (recurrence.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from growmem.ops.linear.fla_scan import fla_linear_memory, fla_op
from growmem.ops.linear.recurrence import DeltaRecurrence
from growmem.ops.precision import compute_dtype


def _to_chunks(x: torch.Tensor, n_chunks: int, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [NC, B, H, C, ...] in ``dtype``, zero-padding T up to NC * C.

    Chunks come first so that the recurrence over chunks reads contiguous slices.
    """
    B, T, H = x.shape[:3]
    x = x.to(dtype)
    pad = n_chunks * chunk - T
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
    x = x.reshape(B, n_chunks, chunk, H, *x.shape[3:])
    return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()


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
    scan_impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel memory scan; same contract as ``linear_memory_reference``.

    Args:
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta, lam: [B, T, H] as the rule needs.
        rule: linear, decay, delta, gated_delta or swla.
        initial_state: [B, H, Dv, Dk] or None (zeros).
        ends: token counts (1..T) after which to return the state; None returns the final one.
        prev_kv: swla only: (k [B, H, Dk], v [B, H, Dv]) of the token before q[:, 0].
        chunk_size: tokens per chunk (a compute detail: results do not depend on it).
        scan_impl: auto | torch | fla: whether the scan may run in flash-linear-attention's
            kernels (CUDA only; fla_scan.py).

    Returns:
        o: [B, T, H, Dv]; states: [B, H, Dv, Dk] or [B, len(ends), H, Dv, Dk]; both in the
        compute dtype (float64 for float64 inputs, float32 otherwise).
    """
    op = fla_op(scan_impl, rule, q)
    if op is not None:
        return fla_linear_memory(
            op, q, k, v, rule=rule, g=g, beta=beta, initial_state=initial_state, ends=ends
        )
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    dtype = compute_dtype(q)
    C = min(chunk_size, T)
    NC = math.ceil(T / C)

    def chunks(x):  # [B, T, H, ...] -> [NC, B, H, C, ...]
        return _to_chunks(x, NC, C, dtype)

    Q, K, V = chunks(q), chunks(k), chunks(v)  # [NC, B, H, C, D]
    if g is not None:
        G = chunks(g).cumsum(-1)  # [NC, B, H, C] cumulative log-decay inside the chunk
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        # exp(G_i - G_j) on the causal part (j <= i), 0 above it: [NC, B, H, C, C]
        decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, -math.inf).exp()
        gamma = G.exp()  # [NC, B, H, C]: decay from the chunk start to token i
    else:  # no decay: every exp(...) is 1; masks replace the products (linear, delta)
        decay = gamma = None

    def causal_part(x, diagonal=0):  # x ⊙ exp(G_i - G_j) on j <= i (- diagonal), zero above
        return x.tril(diagonal) if decay is None else (x * decay).tril(diagonal)

    # The (u, k) pairs a chunk writes and coeff[i, j], the weight of pair j in the state read
    # by token i (so also the write weights of the chunk's end state, row C - 1).
    if rule == "swla":
        # Pair j = token j, written twice: λ_j at position j and β_{j+1} at position j + 1,
        # so coeff[i, j] = λ_j exp(G_i - G_j) + β_{j+1} exp(G_i - G_{j+1}) [j + 1 <= i]. The
        # extra first pair is the token before the chunk, written at position 0 with β_0.
        if prev_kv is None:
            k_first, v_first = (
                q.new_zeros(1, B, H, Dk, dtype=dtype),
                q.new_zeros(1, B, H, Dv, dtype=dtype),
            )
        else:
            k_first, v_first = (x.to(dtype).unsqueeze(0) for x in prev_kv)
        K_last = torch.cat([k_first, K[:-1, :, :, -1]])  # [NC, B, H, Dk]
        V_last = torch.cat([v_first, V[:-1, :, :, -1]])
        Kw = torch.cat([K_last.unsqueeze(-2), K], dim=-2)  # [NC, B, H, C + 1, Dk]
        Vw = torch.cat([V_last.unsqueeze(-2), V], dim=-2)  # [NC, B, H, C + 1, Dv]
        beta_decay = chunks(beta).unsqueeze(-2) * decay  # β_j exp(G_i - G_j)
        later = F.pad(beta_decay[..., 1:], (0, 1))  # β_{j+1} exp(G_i - G_{j+1})
        coeff = torch.cat([beta_decay[..., :1], chunks(lam).unsqueeze(-2) * decay + later], -1)
        A = (Q @ Kw.transpose(-1, -2)) * coeff  # [NC, B, H, C, C + 1] intra-chunk reads
        K_dec = Kw * coeff[..., -1, :].unsqueeze(-1)  # write weights of the chunk's end state
    else:
        Kw, Vw, coeff = K, V, decay
        A = causal_part(Q @ K.transpose(-1, -2))  # [NC, B, H, C, C]
        K_dec = K if decay is None else K * decay[..., -1, :].unsqueeze(-1)
    Q_dec = Q if gamma is None else Q * gamma.unsqueeze(-1)  # queries reading the entry state
    chunk_decay = q.new_ones(NC, B, H, dtype=dtype) if gamma is None else gamma[..., -1]

    S = q.new_zeros(B, H, Dv, Dk, dtype=dtype) if initial_state is None else initial_state.to(dtype)
    if rule in ("delta", "gated_delta"):
        beta_c = chunks(beta).unsqueeze(-1)  # [NC, B, H, C, 1]
        # I + L of the UT transform. (unitriangular=True is ~10x slower on CPU: add I instead.)
        eye = torch.eye(C, dtype=dtype, device=q.device)
        unit_lower = causal_part((beta_c * K) @ K.transpose(-1, -2), diagonal=-1) + eye
        beta_K = beta_c * (K if gamma is None else gamma.unsqueeze(-1) * K)
        X = torch.linalg.solve_triangular(
            unit_lower, torch.cat([beta_c * V, beta_K], -1), upper=False
        )
        U0, W = X.split([Dv, Dk], dim=-1)  # [NC, B, H, C, Dv], [NC, B, H, C, Dk]
        U, S_starts, S = DeltaRecurrence.apply(
            U0.reshape(NC, B * H, C, Dv),
            W.reshape(NC, B * H, C, Dk),
            K_dec.reshape(NC, B * H, C, Dk),
            chunk_decay.reshape(NC, B * H),
            S.reshape(B * H, Dv, Dk),
        )
        Uw = U.view(NC, B, H, C, Dv)
        S_starts = S_starts.view(NC, B, H, Dv, Dk)
        S = S.view(B, H, Dv, Dk)
    else:
        Uw = Vw
        delta_S = Vw.transpose(-1, -2) @ K_dec  # [NC, B, H, Dv, Dk]: each chunk's own write
        starts = []
        for dS_c, decay_c in zip(delta_S, chunk_decay, strict=True):
            starts.append(S)
            S = S + dS_c if gamma is None else decay_c[..., None, None] * S + dS_c
        S_starts = torch.stack(starts)  # [NC, B, H, Dv, Dk]
    O = Q_dec @ S_starts.transpose(-1, -2) + A @ Uw  # [NC, B, H, C, Dv]

    o = O.permute(1, 0, 3, 2, 4).reshape(B, NC * C, H, Dv)[:, :T]  # [B, T, H, Dv]
    if ends is None:
        return o, S

    # State after token p (1-based) = the state entering its chunk, decayed to position r,
    # plus the chunk's writes up to r: S_p = Γ_r S_start + Σ_j coeff[r, j] u_j k_j^T.
    p = torch.as_tensor(ends, device=q.device) - 1
    c, r = p // C, p % C  # [nb]: chunk and position in it
    if coeff is None:  # no decay: the writes of positions j <= r, unweighted
        w = (torch.arange(C, device=q.device) <= r[:, None]).to(dtype)[:, None, None]
    else:
        w = coeff[c, :, :, r]  # [nb, B, H, Cw]
    writes = (Uw[c] * w.unsqueeze(-1)).transpose(-1, -2) @ Kw[c]  # [nb, B, H, Dv, Dk]
    entry = S_starts[c] if gamma is None else gamma[c, :, :, r][..., None, None] * S_starts[c]
    return o, (entry + writes).transpose(0, 1)  # [B, nb, H, Dv, Dk]
