"""The sequential part of the deep memories' fast path: one autograd Function for the scan.

Per mini-batch m (all [B, H, ...], keys K and values V [b, D], steps w0 = -η [b]), at the
entry weights (W1, W2) and titans' momentum (S1, S2):

    zk = K W2^T,  hk = σ(zk),  yk = hk W1^T,  nk = N(yk)               (the MLP on the keys)
    dO = 2(K + nk - V) (titans) or -V (dla),  d1 = N'(dO),  e = d1 W1,  d2 = e ⊙ σ'(zk)
    w = w0 / max(1, ||∇ℓ|| / c)                                          (soft clamp, optional)
    titans: W' = a W + (1 - a) W_0 + p S + Σ_j c_j w_j ∇ℓ_j,  S' = β S + Σ_j m_j w_j ∇ℓ_j
    dla:    W' = W + Σ_j w_j ∇ℓ_j                                        (∇ℓ_j rank one)

with (c, m, a, p, β) the decay/momentum coefficients of the mini-batch's last row and W_0 the
target of the decay (the learned initial weights; the term is absent when the decay pulls toward
zero, see mlp.DECAY_TARGETS). The read
(chunk.py) needs every entry state and (d1, hk, d2, w). Under plain autograd this loop records
~50 small ops per mini-batch and replays about twice as many in the backward; ``ScanFunction``
runs the forward without recording, keeps (zk, e, nk, rstd, ||∇ℓ||) per mini-batch, and runs
one hand-written reverse loop (second-order terms through σ' and N' included). ``scan_loop``
is the same loop under autograd; the tests check the Function against it.

A block may also hold several gradient mini-batches (``inner`` rows each, for mini-batches
too small to pay one weight update each): mini-batch i's gradients are then taken at the
weights after the block's earlier rows, which the dual form gives without forming them,

    W^(i) = α_e W + (1 - α_e) W_0 + ρ_e S + Σ_{j<=e} C[e, j] w_j ∇ℓ_j,   e = the row before i,

so the block's rows run mini-batch by mini-batch against low-rank corrections
(``_inner_factors``) and only the state leaving the block is formed. That path runs under
plain autograd (``scan_loop``).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from growmem.ops.deep.mlp import gelu, gelu_grad, head_matmul, layer_norm, layer_norm_backward

_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _gelu_second(z: torch.Tensor) -> torch.Tensor:
    """d²σ/dz² of the exact GELU: φ(z) (2 - z²)."""
    return torch.exp(-0.5 * z * z) * _INV_SQRT2PI * (2.0 - z * z)


def _factors(rule, K, V, w0, W1, W2, norm, eps, max_grad_norm):
    """Inner-gradient factors of one mini-batch at (W1, W2): d1 [b, Dv], hk [b, Dh],
    d2 [b, Dh], w [b], and what the backward needs: (zk, e, nk, rstd, gn)."""
    zk = K @ W2.transpose(-1, -2)  # [.., b, Dh]
    hk = gelu(zk)
    yk = hk @ W1.transpose(-1, -2)  # [.., b, Dv]
    nk, rstd = layer_norm(yk, eps) if norm else (yk, None)
    dO = 2.0 * (K + nk - V) if rule == "titans" else -V  # dℓ/dM
    d1 = layer_norm_backward(dO, nk, rstd) if norm else dO  # dℓ/dy
    e = d1 @ W1  # [.., b, Dh]
    d2 = e * gelu_grad(zk)  # dℓ/dz
    gn = None
    w = w0
    if max_grad_norm is not None:
        sq = d1.pow(2).sum(-1) * hk.pow(2).sum(-1) + d2.pow(2).sum(-1) * K.pow(2).sum(-1)
        gn = torch.sqrt(sq + 1e-30)  # [.., b]
        w = w0 / torch.clamp(gn / max_grad_norm, min=1.0)
    return d1, hk, d2, w, (zk, e, nk, rstd, gn)


class _SharedWeight(torch.autograd.Function):
    """Identity on a weight that many ``_RowsTimesShared`` products read, with their weight
    gradients summed in one matmul: each product hands its (left, right) factors to ``acc``
    (gradient Σ leftᵀ right) instead of writing a full-size gradient that autograd would then
    add up, a pass over the weight per product."""

    @staticmethod
    def forward(ctx, W, acc):
        ctx.acc = acc
        ctx.set_materialize_grads(False)
        return W.view_as(W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        acc = list(ctx.acc)
        ctx.acc.clear()  # a second backward through a retained graph collects afresh
        if not acc:
            return grad, None
        left, right = (torch.cat(x, -2) for x in zip(*acc, strict=True))
        total = left.transpose(-1, -2) @ right
        return total if grad is None else total + grad, None


class _RowsTimesShared(torch.autograd.Function):
    """rows @ Wᵀ (transpose) or rows @ W for a weight from ``_SharedWeight``."""

    @staticmethod
    def forward(ctx, rows, W, acc, transpose):
        ctx.save_for_backward(rows, W)
        ctx.acc, ctx.transpose = acc, transpose
        return rows @ (W.transpose(-1, -2) if transpose else W)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, W = ctx.saved_tensors
        if ctx.needs_input_grad[1]:  # (a constant W, e.g. zero momentum, has no gradient)
            ctx.acc.append((grad, rows) if ctx.transpose else (rows, grad))
        return grad @ (W if ctx.transpose else W.transpose(-1, -2)), None, None, None


def _inner_factors(rule, K, V, w0, state, dual, inner, norm, eps, max_grad_norm, target=None):
    """``_factors`` for a block of gradient mini-batches of ``inner`` rows, each at the weights
    after the block's earlier rows (module docstring).

    state: the block's entry (W1, W2[, S1, S2]); dual: titans' (C [.., b, b], α, ρ [.., b]),
    the coefficients of the weights after each row; () for dla (α = 1, ρ = 0, C = 1 on j <= t).
    target: (W1_0 [H, Dv, Dh], W2_0 [H, Dh, Dk]) that titans' decay pulls toward, or None
    (toward zero). Returns (d1, hk, d2, w) as ``_factors`` (without the backward's extras).
    """
    titans = rule == "titans"
    W1, W2 = state[:2]
    b = K.shape[-2]
    KW2 = K @ W2.transpose(-1, -2)  # [.., b, Dh]
    # every mini-batch reads W1 (and S1) twice: their gradients are summed once per block
    acc_w = []
    W1 = _SharedWeight.apply(W1, acc_w)
    if titans:
        S1, S2 = state[2:]
        C, alpha, rho = dual
        KS2 = K @ S2.transpose(-1, -2)
        acc_s = []
        S1 = _SharedWeight.apply(S1, acc_s)
        if target is not None:
            T1, T2 = target
            KT2 = head_matmul(K, T2.transpose(-1, -2))  # [.., b, Dh]
    KK = K @ K.transpose(-1, -2)  # [.., b, b]
    d1s, hks, d2s, ws = [], [], [], []
    for r in range(0, b, inner):
        rows = slice(r, min(r + inner, b))
        Kr, Vr = K[..., rows, :], V[..., rows, :]
        z, a, p = KW2[..., rows, :], None, None
        if r:  # the rows before r moved the weights: W^(i) in low-rank form
            d1p, hp, d2p = (torch.cat(x, -2) for x in (d1s, hks, d2s))
            wp = torch.cat(ws, -1).unsqueeze(-2)  # [.., 1, r]
            cw = C[..., r - 1 : r, :r] * wp if titans else wp  # C[e, j] w_j
            if titans:
                a, p = alpha[..., r - 1 : r, None], rho[..., r - 1 : r, None]  # [.., 1, 1]
                z = a * z + p * KS2[..., rows, :]
                if target is not None:
                    z = z + (1.0 - a) * KT2[..., rows, :]
            z = z + (cw * KK[..., rows, :r]) @ d2p
        hk = gelu(z)
        yk = _RowsTimesShared.apply(hk, W1, acc_w, True)  # hk W1ᵀ: [.., m, Dv]
        if a is not None:
            yk = a * yk + p * _RowsTimesShared.apply(hk, S1, acc_s, True)
            if target is not None:
                yk = yk + (1.0 - a) * head_matmul(hk, T1.transpose(-1, -2))
        if r:
            yk = yk + (cw * (hk @ hp.transpose(-1, -2))) @ d1p
        nk, rstd = layer_norm(yk, eps) if norm else (yk, None)
        dO = 2.0 * (Kr + nk - Vr) if titans else -Vr  # dℓ/dM
        d1 = layer_norm_backward(dO, nk, rstd) if norm else dO  # dℓ/dy
        e = _RowsTimesShared.apply(d1, W1, acc_w, False)  # d1 W1^(i): [.., m, Dh]
        if a is not None:
            e = a * e + p * _RowsTimesShared.apply(d1, S1, acc_s, False)
            if target is not None:
                e = e + (1.0 - a) * head_matmul(d1, T1)
        if r:
            e = e + (cw * (d1 @ d1p.transpose(-1, -2))) @ hp
        d2 = e * gelu_grad(z)  # dℓ/dz
        w = w0[..., rows]
        if max_grad_norm is not None:
            sq = d1.pow(2).sum(-1) * hk.pow(2).sum(-1) + d2.pow(2).sum(-1) * Kr.pow(2).sum(-1)
            w = w / torch.clamp(torch.sqrt(sq + 1e-30) / max_grad_norm, min=1.0)
        for acc, x in zip((d1s, hks, d2s, ws), (d1, hk, d2, w), strict=True):
            acc.append(x)
    return tuple(torch.cat(x, -1 if x is ws else -2) for x in (d1s, hks, d2s, ws))


def _update(K, d1, hk, d2, w, state, coef, target=None):
    """The state leaving the mini-batch: state (W1, W2[, S1, S2]); coef (c, m [b], a, p,
    β [1]) for titans, () for dla; target: (W1_0, W2_0) the decay pulls toward, or None."""
    if not coef:  # dla: C[last, j] = 1 on real rows; padding rows have w = 0
        W1, W2 = state
        wc = w.unsqueeze(-1)
        return W1 + (d1 * wc).transpose(-1, -2) @ hk, W2 + (d2 * wc).transpose(-1, -2) @ K
    W1, W2, S1, S2 = state
    c, m, a, p, beta = coef
    cw, mw = (c * w).unsqueeze(-1), (m * w).unsqueeze(-1)  # [.., b, 1]
    a, p, beta = a[..., None], p[..., None], beta[..., None]
    if target is not None:  # decay the departure from the target
        W1, W2 = (w0 + a * (x - w0) for x, w0 in zip((W1, W2), target, strict=True))
    else:
        W1, W2 = a * W1, a * W2
    return (
        W1 + p * S1 + (d1 * cw).transpose(-1, -2) @ hk,
        W2 + p * S2 + (d2 * cw).transpose(-1, -2) @ K,
        beta * S1 + (d1 * mw).transpose(-1, -2) @ hk,
        beta * S2 + (d2 * mw).transpose(-1, -2) @ K,
    )


def _update_into(K, d1, hk, d2, w, state, coef, target, out):
    """``_update`` written into the tensors ``out`` (no grad; fewer temporaries)."""
    if not coef:
        wc = w.unsqueeze(-1)
        for o, x, d, r in zip(out, state, (d1, d2), (hk, K), strict=True):
            torch.matmul((d * wc).transpose(-1, -2), r, out=o).add_(x)
        return
    W1, W2, S1, S2 = state
    c, m, a, p, beta = coef
    cw, mw = (c * w).unsqueeze(-1), (m * w).unsqueeze(-1)  # [.., b, 1]
    a, p, beta = a[..., None], p[..., None], beta[..., None]
    for o, W, S, d, r in zip(out[:2], (W1, W2), (S1, S2), (d1, d2), (hk, K), strict=True):
        torch.matmul((d * cw).transpose(-1, -2), r, out=o).addcmul_(a, W).addcmul_(p, S)
    if target is not None:
        for o, w0 in zip(out[:2], target, strict=True):
            o.addcmul_(1.0 - a, w0)
    for o, S, d, r in zip(out[2:], (S1, S2), (d1, d2), (hk, K), strict=True):
        torch.matmul((d * mw).transpose(-1, -2), r, out=o).addcmul_(beta, S)


def scan_loop(
    rule, K, V, step, coefs, init, reset, resets, ends, norm, eps, max_grad_norm, inner=None,
    duals=(), target=None,
):  # fmt: skip
    """The scan under autograd (the Function's reference). Arguments as ``scan``."""
    state = init
    entries, factors, kept = [], [], []
    n_coef = len(coefs)
    per_batch = [x.unbind(0) for x in (K, V, step, *coefs, *duals)]
    for mb, (Km, Vm, w0, *coef) in enumerate(zip(*per_batch, strict=True)):
        if mb in resets:
            state = reset
        entries.append(state)
        coef, dual = coef[:n_coef], coef[n_coef:]
        if inner:
            d1, hk, d2, w = _inner_factors(
                rule, Km, Vm, w0, state, dual, inner, norm, eps, max_grad_norm, target
            )
        else:
            d1, hk, d2, w, _ = _factors(rule, Km, Vm, w0, *state[:2], norm, eps, max_grad_norm)
        factors.append((d1, hk, d2, w))
        state = _update(Km, d1, hk, d2, w, state, coef, target)
        if mb in ends:
            kept.append(state)
    stacked = [torch.stack(x) for x in zip(*entries, strict=True)]
    stacked += [torch.stack(x) for x in zip(*factors, strict=True)]
    stacked += [torch.stack(x) for x in zip(*kept, strict=True)] if kept else []
    return (*stacked, *state)


class ScanFunction(torch.autograd.Function):
    """``scan_loop`` with a hand-written backward (see the module docstring).

    apply(spec, K, V, step, *coefs, *target, *init, *reset) with spec = (rule, resets, ends,
    norm, eps, max_grad_norm, has_target), K, V [NB, B, H, b, D], step [NB, B, H, b], coefs
    (titans: c, m [NB, B, H, b], a, p, β [NB, B, H, 1]; dla: none), target: (W1_0, W2_0)
    [H, ...] that titans' decay pulls toward (empty when it pulls toward zero), init and
    reset: the state (W1, W2[, S1, S2]) at the start and after every reset (reset: empty
    without resets).
    Returns (*entries [NB, ...], d1, hk, d2, w, *kept [len(ends), ...], *final).
    """

    @staticmethod
    def forward(ctx, spec, K, V, step, *rest):
        rule, resets, ends, norm, eps, max_grad_norm, has_target = spec
        n_state = 4 if rule == "titans" else 2
        n_coef = 5 if rule == "titans" else 0
        n_target = 2 if has_target else 0
        coefs, rest = rest[:n_coef], rest[n_coef:]
        target, rest = rest[:n_target] or None, rest[n_target:]
        init, reset = rest[:n_state], rest[n_state:] or None
        NB = K.shape[0]
        # entry states written in place: slot mb + 1 receives the state leaving mb
        entry_stacks = [x.new_empty(NB, *x.shape) for x in init]
        for e, x in zip(entry_stacks, init, strict=True):
            e[0] = x
        factors, saved, kept = [], [], []
        per_batch = [x.unbind(0) for x in (K, V, step, *coefs)]
        for mb, (Km, Vm, w0, *coef) in enumerate(zip(*per_batch, strict=True)):
            if mb in resets:
                for e, x in zip(entry_stacks, reset, strict=True):
                    e[mb] = x
            state = [e[mb] for e in entry_stacks]
            d1, hk, d2, w, keep = _factors(rule, Km, Vm, w0, *state[:2], norm, eps, max_grad_norm)
            factors.append((d1, hk, d2, w))
            saved.append(keep)
            if mb + 1 == NB or mb + 1 in resets:  # not the next entry: a tensor of its own
                out = [x.new_empty(x.shape) for x in state]
            else:
                out = [e[mb + 1] for e in entry_stacks]
            _update_into(Km, d1, hk, d2, w, state, coef, target, out)
            if mb in ends:
                kept.append(out)
        state = out
        factor_stacks = [torch.stack(x) for x in zip(*factors, strict=True)]
        kept_stacks = [torch.stack(x) for x in zip(*kept, strict=True)] if kept else []
        ctx.spec, ctx.n_coef, ctx.n_state, ctx.has_reset = spec, n_coef, n_state, reset is not None
        ctx.internal = saved  # per mini-batch (zk, e, nk, rstd, gn): never exposed
        ctx.save_for_backward(K, V, step, *coefs, *(target or ()), *entry_stacks, *factor_stacks)
        return (*entry_stacks, *factor_stacks, *kept_stacks, *state)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        rule, resets, ends, norm, _, max_grad_norm, has_target = ctx.spec
        n_coef, n_state = ctx.n_coef, ctx.n_state
        K, V, step, *rest = ctx.saved_tensors
        coefs, rest = rest[:n_coef], rest[n_coef:]
        target, rest = (rest[:2], rest[2:]) if has_target else (None, rest)
        entries = rest[:n_state]
        d1s, hks, d2s, ws = rest[n_state:]
        NB = K.shape[0]
        g_entries = grads[:n_state]
        g_factors = grads[n_state : n_state + 4]
        g_kept = grads[n_state + 4 : 2 * n_state + 4] if ends else ()
        g_final = grads[len(grads) - n_state :]
        end_index = {mb: i for i, mb in enumerate(sorted(ends))}

        def zeros_if_none(g, like):
            return torch.zeros_like(like) if g is None else g

        gK, gV, gstep = torch.empty_like(K), torch.empty_like(V), torch.empty_like(step)
        gcoefs = [torch.empty_like(c) for c in coefs]
        g_reset = None
        g_target = [torch.zeros_like(x) for x in target] if has_target else []
        lam = [zeros_if_none(g, e[0]) for g, e in zip(g_final, entries, strict=True)]
        for mb in reversed(range(NB)):
            if mb in end_index:  # the kept state leaving this mini-batch
                i = end_index[mb]
                for j in range(n_state):
                    g = g_kept[j] if g_kept else None
                    if g is not None:
                        lam[j] = lam[j] + g[i]
            state = [e[mb] for e in entries]
            d1, hk, d2, w = d1s[mb], hks[mb], d2s[mb], ws[mb]
            gfac = [None if g is None else g[mb] for g in g_factors]
            coef = [c[mb] for c in coefs]
            lam, gk, gv, gw0, gcoef = _step_backward(
                rule, K[mb], V[mb], step[mb], state, coef, (d1, hk, d2, w),
                ctx.internal[mb], gfac, lam, norm, max_grad_norm, target, g_target,
            )  # fmt: skip
            gK[mb], gV[mb], gstep[mb] = gk, gv, gw0
            for gc, g in zip(gcoefs, gcoef, strict=True):
                gc[mb] = g
            for j in range(n_state):  # the entry state also feeds the read
                if g_entries[j] is not None:
                    lam[j] = lam[j] + g_entries[j][mb]
            if mb in resets:  # its entry is the reset state, not the previous one's exit
                if g_reset is not None:
                    lam = [a + b for a, b in zip(g_reset, lam, strict=True)]
                g_reset = lam
                lam = [torch.zeros_like(x) for x in lam]
        g_reset = (g_reset or [None] * n_state) if ctx.has_reset else []
        return (None, gK, gV, gstep, *gcoefs, *g_target, *lam, *g_reset)


def _step_backward(
    rule, K, V, w0, state, coef, factors, internal, gfac, lam, norm, clamp, target, g_target
):  # fmt: skip
    """Gradients of one mini-batch's factors and update, given the adjoint ``lam`` of the
    state leaving it and gfac, the read's gradients of (d1, hk, d2, w) (None: zero). target:
    the decay's target (W1_0, W2_0) or None; its gradient is added into ``g_target``.

    Returns (adjoint of the entry state, gK, gV, gw0, coefficient gradients)."""
    d1, hk, d2, w = factors
    zk, e, nk, rstd, gn = internal
    W1, W2 = state[:2]
    L1, L2 = lam[:2]
    # the update: W' = a W + p S + (d1 ⊙ cw)^T hk ..., S' = β S + (d1 ⊙ mw)^T hk ...
    A1 = hk @ L1.transpose(-1, -2)  # [b, Dv]
    A2 = K @ L2.transpose(-1, -2)  # [b, Dh]
    if rule == "titans":
        S1, S2 = state[2:]
        M1, M2 = lam[2:]
        c, m, a, p, beta = coef
        B1 = hk @ M1.transpose(-1, -2)
        B2 = K @ M2.transpose(-1, -2)
        cw, mw = (c * w).unsqueeze(-1), (m * w).unsqueeze(-1)
        gd1 = cw * A1 + mw * B1
        gd2 = cw * A2 + mw * B2
        ghk = (d1 * cw) @ L1 + (d1 * mw) @ M1
        gK = (d2 * cw) @ L2 + (d2 * mw) @ M2
        gcw = (d1 * A1).sum(-1) + (d2 * A2).sum(-1)  # [b]
        gmw = (d1 * B1).sum(-1) + (d2 * B2).sum(-1)
        gw = c * gcw + m * gmw
        a_, p_, b_ = a[..., None], p[..., None], beta[..., None]
        D1, D2 = W1, W2  # what the decay scales: the weights, or their departure from target
        if target is not None:
            D1, D2 = W1 - target[0], W2 - target[1]
            g_target[0] += ((1.0 - a_) * L1).sum(0)  # shared by the batch
            g_target[1] += ((1.0 - a_) * L2).sum(0)
        gcoef = [
            w * gcw,
            w * gmw,
            ((L1 * D1).sum((-1, -2)) + (L2 * D2).sum((-1, -2))).unsqueeze(-1),
            ((L1 * S1).sum((-1, -2)) + (L2 * S2).sum((-1, -2))).unsqueeze(-1),
            ((M1 * S1).sum((-1, -2)) + (M2 * S2).sum((-1, -2))).unsqueeze(-1),
        ]
        g_state = [a_ * L1, a_ * L2, p_ * L1 + b_ * M1, p_ * L2 + b_ * M2]
    else:
        wc = w.unsqueeze(-1)
        gd1, gd2 = wc * A1, wc * A2
        ghk = (d1 * wc) @ L1
        gK = (d2 * wc) @ L2
        gw = (d1 * A1).sum(-1) + (d2 * A2).sum(-1)
        gcoef = []
        g_state = [L1, L2]
    for acc, g in zip((gd1, ghk, gd2), gfac[:3], strict=True):
        if g is not None:
            acc += g
    if gfac[3] is not None:
        gw = gw + gfac[3]
    # the soft clamp: w = w0 / f, f = max(1, gn / c)
    if clamp is not None:
        f = torch.clamp(gn / clamp, min=1.0)
        gw0 = gw / f
        ggn = torch.where(gn / clamp >= 1.0, -gw * w / (f * clamp), 0.0)
        gsq = (ggn / (2.0 * gn)).unsqueeze(-1) * 2.0  # d(sq)/d(.) carries a factor 2
        gd1 = gd1 + gsq * hk.pow(2).sum(-1, keepdim=True) * d1
        ghk = ghk + gsq * d1.pow(2).sum(-1, keepdim=True) * hk
        gd2 = gd2 + gsq * K.pow(2).sum(-1, keepdim=True) * d2
        gK = gK + gsq * d2.pow(2).sum(-1, keepdim=True) * K
    else:
        gw0 = gw
    # d2 = e ⊙ σ'(zk), e = d1 W1
    gp = gelu_grad(zk)
    ge = gd2 * gp
    gzk = gd2 * e * _gelu_second(zk)
    gd1 = gd1 + ge @ W1.transpose(-1, -2)
    gW1 = g_state[0] + d1.transpose(-1, -2) @ ge
    # d1 = N'(dO) (LayerNorm's backward as a function of dO, nk, rstd)
    if norm:
        X = rstd * gd1
        Xn = (X * nk).mean(-1, keepdim=True)
        dO = 2.0 * (K + nk - V) if rule == "titans" else -V
        gdO = X - X.mean(-1, keepdim=True) - nk * Xn
        gnk = -X * (dO * nk).mean(-1, keepdim=True) - dO * Xn
        grstd = (gd1 * d1).sum(-1, keepdim=True) / rstd
    else:
        gdO, gnk = gd1, 0.0
    if rule == "titans":  # dO = 2 (K + nk - V)
        gK = gK + 2.0 * gdO
        gV = -2.0 * gdO
        gnk = gnk + 2.0 * gdO
    else:  # dO = -V
        gV = -gdO
    if norm:  # nk = N(yk), and rstd's own path
        gyk = layer_norm_backward(gnk, nk, rstd) - grstd * rstd.pow(2) * nk / nk.shape[-1]
    else:
        gyk = gnk  # 0.0 for dla without norm: yk is then unused
    # yk = hk W1^T, hk = σ(zk), zk = K W2^T
    if torch.is_tensor(gyk):
        ghk = ghk + gyk @ W1
        gW1 = gW1 + gyk.transpose(-1, -2) @ hk
    gzk = gzk + ghk * gp
    gK = gK + gzk @ W2
    gW2 = g_state[1] + gzk.transpose(-1, -2) @ K
    return [gW1, gW2, *g_state[2:]], gK, gV, gw0, gcoef


def scan(
    rule, K, V, step, coefs, init, reset, resets, ends, norm, eps, max_grad_norm, fused,
    inner=None, duals=(), target=None,
):  # fmt: skip
    """The deep scan. K, V [NB, B, H, b, D]; step [NB, B, H, b] (-η, padding 0); coefs: see
    ScanFunction; init, reset: states (reset None without resets); resets, ends: sets of
    blocks. fused: ScanFunction (True) or the plain autograd loop. inner: rows per gradient
    mini-batch inside a block (None: the whole block), run under plain autograd; duals:
    titans' dual-form coefficients for it, (C [NB, B, H, b, b], α, ρ [NB, B, H, b]); target:
    (W1_0, W2_0) [H, ...] that titans' decay pulls toward, or None (toward zero).

    Returns (entries, (d1, hk, d2, w), kept, final): entries a list of [NB, B, H, ...] state
    tensors, kept a list of [len(ends), B, H, ...] ones (empty without ends), final a list.
    """
    n = len(init)
    resets, ends = frozenset(resets), frozenset(ends)
    if fused and inner is None:
        spec = (rule, resets, ends, norm, eps, max_grad_norm, target is not None)
        out = ScanFunction.apply(spec, K, V, step, *coefs, *(target or ()), *init, *(reset or ()))
    else:
        args = (resets, ends, norm, eps, max_grad_norm)
        out = scan_loop(
            rule, K, V, step, coefs, init, reset, *args, inner=inner, duals=duals, target=target
        )
    entries, factors = list(out[:n]), tuple(out[n : n + 4])
    kept = list(out[n + 4 : n + 4 + n]) if ends else []
    return entries, factors, kept, list(out[len(out) - n :])
