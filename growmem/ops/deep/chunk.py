"""Mini-batch-parallel form of the deep memories (the dual form of TTT / Titans).

Inside a mini-batch every inner gradient is taken at the entry weights W (read convention in
naive.py), and momentum and decay are linear scans, so the weights after token t are

    W_t = α_t W + (1 - α_t) W_0 + ρ_t Σ + Σ_{j<=t} C[t, j] w_j ∇ℓ_j,   w_j = -η_j (times the clamp)

with W_0 the weights the decay pulls toward (the learned initial weights; no such term when
it pulls toward zero), α_t = Π_{i<=t} a_i, ρ_t = Σ_{l<=t} (Π_{i=l+1..t} a_i)(Π_{i<=l} β_i) and
C = A @ Bm the composition of the decay and momentum scans (dla: α = 1, ρ = 0, C = 1 on
j <= t). The
gradients are rank one (∇_W1 ℓ_j = d1_j h_j^T, ∇_W2 ℓ_j = d2_j k_j^T), so reading M_{W_t}(q_t)
never forms per-token weights:

    z_t = α_t W2 q_t + (1 - α_t) W2_0 q_t + ρ_t Σ2 q_t + Σ_j C[t, j] w_j (k_j·q_t) d2_j
    y_t = α_t W1 σ(z_t) + (1 - α_t) W1_0 σ(z_t) + ρ_t Σ1 σ(z_t) + Σ_j C[t, j] w_j (h_j·σ(z_t)) d1_j
    o_t = q_t + N(y_t)

The work splits in two phases (``deep_scan``, then ``online_read``):
1. the scan, the only sequential part: per mini-batch, the inner-gradient factors
   (d1, h, d2, clamped w) at the entry weights and the state leaving it;
2. the read: given every mini-batch's entry weights, the formulas above involve no recurrence,
   so they run batched over many mini-batches at once (in groups that bound the temporaries).

Mini-batches may be shorter than the others (a mini-batch grid that restarts at segment
starts, a partial last one); they are padded at their end, which cannot affect earlier
tokens, and the state leaving a mini-batch is read at its last real row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from growmem.ops.deep.mixed import mixed_linear_read
from growmem.ops.deep.mlp import (
    DeepState,
    clamp_momentum,
    decay_target,
    gelu,
    head_matmul,
    layer_norm,
    start_state,
)
from growmem.ops.deep.scan import scan
from growmem.ops.precision import compute_dtype

# elements of the largest temporary of one read group ([G, B, H, b, Dh]): big enough to
# amortise per-op overhead, small enough to stay clear of fresh-page allocation costs
_READ_GROUP_ELEMENTS = 1 << 20


class MiniBatchLayout(NamedTuple):
    """Padded mini-batch layout of T tokens: slot [NB, b] token index of every slot (T for
    padding), real [NB, b] (slot holds a token), last [NB] row of each last real token."""

    slot: torch.Tensor
    real: torch.Tensor
    last: torch.Tensor
    T: int

    @classmethod
    def build(cls, batch_lengths, device) -> MiniBatchLayout:
        b = max(batch_lengths)
        lengths = torch.tensor(batch_lengths, device=device)
        starts = torch.cumsum(lengths, 0) - lengths
        rows = torch.arange(b, device=device)[None, :]
        real = rows < lengths[:, None]
        slot = torch.where(real, starts[:, None] + rows, int(lengths.sum()))
        return cls(slot, real, lengths - 1, int(lengths.sum()))

    def to_batches(self, x: torch.Tensor, dtype) -> torch.Tensor:
        """[B, T, H, ...] -> [NB, B, H, b, ...] in ``dtype`` (padding rows are zero)."""
        B = x.shape[0]
        x = torch.cat([x.to(dtype), x.new_zeros(B, 1, *x.shape[2:], dtype=dtype)], 1)
        x = x[:, self.slot]  # [B, NB, b, H, ...]
        return x.permute(1, 0, 3, 2, *range(4, x.dim())).contiguous()

    def to_tokens(self, X: torch.Tensor) -> torch.Tensor:
        """[NB, B, H, b, ...] -> [B, T, H, ...] (the real slots in token order)."""
        return X.permute(1, 0, 3, 2, *range(4, X.dim()))[:, self.real]


class DeepScan(NamedTuple):
    """What the read needs from the scan, per mini-batch ([NB, B, H, ...] each).

    Q, K: [.., b, D]; entries: DeepState of the weights each mini-batch starts from; d1
    [.., b, Dv], h [.., b, Dh], d2 [.., b, Dh]: inner-gradient factors at them; w [.., b]:
    the clamped steps; C [.., b, b] (dla: [b, b]), alpha, rho [.., b] (titans; else None);
    kept: DeepState of [len(end_batches), B, H, ...], the states leaving the requested
    mini-batches (None without any); final: the state leaving the
    last mini-batch; last_entry: the state entering it; target: (W1_0, W2_0) [H, ...] that
    titans' decay pulls toward, or None.
    """

    Q: torch.Tensor
    K: torch.Tensor
    entries: DeepState
    d1: torch.Tensor
    h: torch.Tensor
    d2: torch.Tensor
    w: torch.Tensor
    C: torch.Tensor
    alpha: torch.Tensor | None
    rho: torch.Tensor | None
    kept: DeepState | None
    final: DeepState
    last_entry: DeepState
    target: tuple[torch.Tensor, torch.Tensor] | None


def _decay_matrix(logs: torch.Tensor) -> torch.Tensor:
    """exp(L_t - L_j) on j <= t, 0 above, for cumulative logs L [..., b] -> [..., b, b]."""
    b = logs.shape[-1]
    causal = torch.ones(b, b, dtype=torch.bool, device=logs.device).tril()
    return (logs.unsqueeze(-1) - logs.unsqueeze(-2)).masked_fill(~causal, -math.inf).exp()


def _at_last(x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Row ``last[m]`` of every mini-batch m: x [NB, B, H, b, ...] -> [NB, B, H, ...]."""
    index = last.view(-1, *([1] * (x.dim() - 1))).expand(-1, *x.shape[1:3], 1, *x.shape[4:])
    return x.gather(3, index).squeeze(3)


def deep_scan(
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
    layout: MiniBatchLayout,
    end_batches=(),
    resets=(),
    reset_state: DeepState | None = None,
    norm=True,
    max_grad_norm=None,
    eps=1e-5,
    fused=True,
    mini_batch=None,
    decay_to="init",
) -> DeepScan:
    """The sequential part: every mini-batch's entry weights and inner-gradient factors.

    Args:
        q, k, v: [B, T, H, D]; eta, g, beta: [B, T, H] (g, beta for titans only).
        init_weights: (W1 [H, Dv, Dh], W2 [H, Dh, Dk]).
        initial_state: DeepState of [B, H, ...] tensors, or None.
        layout: the mini-batch layout of the T tokens.
        end_batches: mini-batches whose leaving state to keep (increasing).
        resets: mini-batches that start from ``reset_state`` instead of the running state.
        norm, max_grad_norm, eps, decay_to: see ``deep_memory``.
        fused: the scan as one autograd Function with a hand-written backward (scan.py), or
            (False) the same loop under plain autograd.
        mini_batch: tokens per gradient mini-batch when a block of the layout holds several
            (the blocks then start on mini-batch starts); None: one mini-batch per block.
    """
    B = q.shape[0]
    dtype = compute_dtype(q)
    titans = rule == "titans"
    Q, K, V = (layout.to_batches(x, dtype) for x in (q, k, v))  # [NB, B, H, b, D]
    step = -layout.to_batches(eta, dtype)  # [NB, B, H, b]
    b = Q.shape[3]
    alpha = rho = None
    if titans:
        log_a = layout.to_batches(g, dtype).cumsum(-1)
        log_b = clamp_momentum(layout.to_batches(beta, dtype)).log().cumsum(-1)  # pads too
        A, Bm = _decay_matrix(log_a), _decay_matrix(log_b)  # [NB, B, H, b, b]
        alpha, beta_cum = log_a.exp(), log_b.exp()  # [NB, B, H, b]
        C = A @ Bm
        rho = (A @ beta_cum.unsqueeze(-1)).squeeze(-1)
        # the state leaving a mini-batch is row ``last`` of the formulas: its coefficients
        leave = [
            _at_last(x, layout.last)
            for x in (C, Bm, alpha.unsqueeze(-1), rho.unsqueeze(-1), beta_cum.unsqueeze(-1))
        ]
    else:
        C = torch.ones(b, b, dtype=dtype, device=q.device).tril()
        leave = []

    init = [x for x in start_state(init_weights, initial_state, rule, B, dtype) if x is not None]
    reset = None if reset_state is None else [x for x in reset_state if x is not None]
    if list(end_batches) != sorted(set(end_batches)):
        raise ValueError(f"end_batches must be increasing, got {end_batches}")
    inner = mini_batch if mini_batch is not None and mini_batch < b else None
    duals = (C, alpha, rho) if inner and titans else ()
    target = decay_target(rule, decay_to, init_weights, dtype)
    entries, (d1, h, d2, w), kept, final = scan(
        rule, K, V, step, leave, init, reset, resets, end_batches, norm, eps, max_grad_norm,
        fused, inner, duals, target,
    )  # fmt: skip
    kept = _state(kept) if kept else None
    last_entry = _state([x[-1] for x in entries])
    entries, final = _state(entries), _state(final)
    return DeepScan(Q, K, entries, d1, h, d2, w, C, alpha, rho, kept, final, last_entry, target)


def _state(tensors) -> DeepState:
    """DeepState of (W1, W2) or (W1, W2, S1, S2)."""
    return DeepState(*tensors, *([None] * (4 - len(tensors))))


def _group_sizes(scan: DeepScan) -> list[int]:
    """Sizes of consecutive mini-batch groups whose read temporaries stay near
    _READ_GROUP_ELEMENTS."""
    NB, B, H, b = scan.h.shape[:4]
    # (an empty batch, B = 0, reads in one group)
    size = max(1, _READ_GROUP_ELEMENTS // max(1, B * H * b * max(scan.h.shape[-1], b)))
    return [min(size, NB - a) for a in range(0, NB, size)]


def online_read(scan: DeepScan, norm=True, eps=1e-5, soup=None) -> torch.Tensor:
    """Every token reads its online memory, all mini-batches batched: -> [NB, B, H, b, D].

    soup: Memory Soup with cached memories, or None. A dict with (in the mini-batch layout)
    gamma_online [NB, B, H, b, 1], z_cached [NB, B, H, b, Dh] (Σ_i γ_i W2^(i) q_t),
    gamma_cached [NB, B, H, b, N], W1_cached [B, H, N, Dv, Dh] (the cached W1^(i)) and
    visible (a list: the caches each mini-batch reads). Token t then reads
    the memory whose weights are the γ-mix of the cached ones and of its online weights W_t:
    o_t = q_t + N(W1*_t σ(W2*_t q_t)).
    """
    titans = scan.alpha is not None
    sizes = _group_sizes(scan)
    # every per-mini-batch tensor split into the groups once (slicing inside the loop would
    # make the backward zero-fill a full-size gradient per group)
    names = ["Q", "K", "d1", "h", "d2", "w"] + (["C", "alpha", "rho"] if titans else [])
    groups = {n: getattr(scan, n).split(sizes) for n in names}
    groups["W"] = [None if x is None else x.split(sizes) for x in scan.entries]
    if soup is not None:
        groups.update({n: soup[n].split(sizes) for n in ("gamma_online", "z_cached")})
        groups["gamma_cached"] = soup["gamma_cached"].split(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
    outs = []
    for i in range(len(sizes)):
        Q, K, d1, h, d2, w = (groups[n][i] for n in names[:6])
        W1, W2, S1, S2 = (None if x is None else x[i] for x in groups["W"])
        Cw = (groups["C"][i] if titans else scan.C) * w.unsqueeze(-2)  # C[t, j] w_j
        z = (Cw * (Q @ K.transpose(-1, -2))) @ d2  # [G, B, H, b, Dh]
        if titans:
            alpha, rho = groups["alpha"][i].unsqueeze(-1), groups["rho"][i].unsqueeze(-1)
            z = z + alpha * (Q @ W2.transpose(-1, -2)) + rho * (Q @ S2.transpose(-1, -2))
            if scan.target is not None:  # what the decay moved toward W_0
                z = z + (1.0 - alpha) * head_matmul(Q, scan.target[1].transpose(-1, -2))
        else:
            z = z + Q @ W2.transpose(-1, -2)
        if soup is None:
            hq = gelu(z)  # z = W2_t q_t: the online weights read q
        else:  # Memory Soup: the γ-mix of the cached and the online W2 reads q
            g_on = groups["gamma_online"][i]
            hq = gelu(g_on * z + groups["z_cached"][i])
        y = (Cw * (hq @ h.transpose(-1, -2))) @ d1  # W1_t applied to hq, same dual form
        if titans:
            y = y + alpha * (hq @ W1.transpose(-1, -2)) + rho * (hq @ S1.transpose(-1, -2))
            if scan.target is not None:
                y = y + (1.0 - alpha) * head_matmul(hq, scan.target[0].transpose(-1, -2))
        else:
            y = y + hq @ W1.transpose(-1, -2)
        if soup is not None:
            visible = soup["visible"][starts[i] : starts[i] + sizes[i]]
            y = g_on * y + _cached_first_layer(hq, groups["gamma_cached"][i], soup, visible)
        outs.append(Q + (layer_norm(y, eps)[0] if norm else y))
    return torch.cat(outs)


def _cached_first_layer(hq, gamma, soup, visible) -> torch.Tensor:
    """Σ_i γ_i W1^(i) hq over the caches each mini-batch sees (``visible``, a list): hq
    [G, B, H, b, Dh], gamma [G, B, H, b, N] -> [G, B, H, b, Dv]."""
    G, B, H, b, Dh = hq.shape
    if not any(visible):
        return hq.new_zeros(G, B, H, b, soup["W1_cached"].shape[-2])
    spans = []  # mini-batches with the same visible caches read as one span
    for j, n in enumerate(visible):
        if spans and spans[-1][2] == n:
            spans[-1][1] = (j + 1) * b
        else:
            spans.append([j * b, (j + 1) * b, n])
    flat = hq.permute(1, 2, 0, 3, 4).reshape(B, H, G * b, Dh)
    gam = gamma.permute(1, 2, 0, 3, 4).reshape(B, H, G * b, gamma.shape[-1])
    y = mixed_linear_read(flat, soup["W1_cached"], gam, [tuple(s) for s in spans])
    return y.view(B, H, G, b, y.shape[-1]).permute(2, 0, 1, 3, 4)


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
    mini_batch=None,
    decay_to="init",
):
    """Deep memory over blocks of the given lengths (scan, then batched read).

    Args:
        q, k, v: [B, T, H, D]; eta, g, beta: [B, T, H] (g, beta for titans only).
        init_weights: (W1 [H, Dv, Dh], W2 [H, Dh, Dk]).
        initial_state: DeepState of [B, H, ...] tensors, or None.
        batch_lengths: block lengths summing to T (each <= the longest).
        end_batches: indices of blocks whose leaving state to return (increasing).
        norm, max_grad_norm, eps, decay_to: see ``deep_memory``.
        mini_batch: tokens per gradient mini-batch inside a block (None: the whole block).

    Returns:
        o [B, T, H, D]; states: DeepState of [B, len(end_batches), H, ...] (None without
        end_batches); the final state (leaving the last block); the state entering the last
        block.
    """
    layout = MiniBatchLayout.build(batch_lengths, q.device)
    scan = deep_scan(
        q,
        k,
        v,
        rule=rule,
        eta=eta,
        g=g,
        beta=beta,
        init_weights=init_weights,
        initial_state=initial_state,
        layout=layout,
        end_batches=end_batches,
        norm=norm,
        max_grad_norm=max_grad_norm,
        eps=eps,
        mini_batch=mini_batch,
        decay_to=decay_to,
    )
    O = layout.to_tokens(online_read(scan, norm, eps))  # [B, T, H, D]
    stacked = None if scan.kept is None else scan.kept.map(lambda x: x.transpose(0, 1))
    return O, stacked, scan.final, scan.last_entry
