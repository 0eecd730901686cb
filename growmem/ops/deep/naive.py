"""Per-token reference of the deep memories (dla, titans): the tests' ground truth.

Read convention (mini-batch gradient descent, as in Titans/TTT): tokens are grouped in
mini-batches; the inner gradient of every token of a mini-batch is taken at the weights W_(m)
the mini-batch starts from; the updates then run token by token (momentum and decay are
linear scans), and token t reads the weights after its own update:

    u_t = ∇ℓ(W_(m); k_t, v_t)                       (gradient at the mini-batch start)
    dla:    W_t = W_{t-1} - η_t u_t
    titans: Σ_t = β_t Σ_{t-1} - η_t u_t,  W_t = a_t W_{t-1} + (1 - a_t) W_0 + Σ_t
    o_t = M_{W_t}(q_t)

with W_0 the learned initial weights (decay_to="init"; "zero" drops that term).

With mini-batches of one token this is the plain recurrence of docs/design.md §2.4. The
inner gradient here comes from torch.autograd (double backward for the outer gradients), so
it independently checks the closed-form gradients of the fast path.
"""

from __future__ import annotations

import itertools

import torch

from growmem.ops.deep.mlp import (
    DeepState,
    clamp_momentum,
    decay_target,
    mlp_forward,
    start_state,
)
from growmem.ops.precision import compute_dtype


def deep_memory_reference(
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
    ends=None,
    norm=True,
    max_grad_norm=None,
    eps=1e-5,
    decay_to="init",
):
    """Deep memory token by token.

    Args:
        q, k, v: [B, T, H, D]; eta: [B, T, H] inner learning rates; g: [B, T, H] log-decay
            and beta: [B, T, H] momentum (titans only).
        init_weights: (W1 [H, Dv, Dh], W2 [H, Dh, Dk]) learned initial weights.
        initial_state: DeepState with [B, H, ...] tensors, or None (the initial weights and
            zero momentum).
        batch_lengths: mini-batch lengths summing to T.
        ends: token counts after which to record the state (None: only the final state).
        norm, max_grad_norm, eps, decay_to: see ``deep_memory``.

    Returns:
        (o [B, T, H, D], states): the final DeepState ([B, H, ...]) if ends is None, else a
        DeepState of [B, len(ends), H, ...] tensors.
    """
    B, T = q.shape[:2]
    dtype = compute_dtype(q)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    W1, W2, S1, S2 = start_state(init_weights, initial_state, rule, B, dtype)
    target = decay_target(rule, decay_to, init_weights, dtype)
    starts = set(itertools.accumulate([0, *batch_lengths[:-1]]))
    end_set = set(ends or ())
    outputs, recorded = [], []
    for t in range(T):
        if t in starts:
            W1m, W2m = W1, W2  # the gradients of this mini-batch are taken here
        W1, W2, S1, S2 = token_step(
            rule,
            DeepState(W1, W2, S1, S2),
            (W1m, W2m),
            t,
            k,
            v,
            eta,
            g,
            beta,
            norm,
            eps,
            max_grad_norm,
            target,
        )
        out, _ = mlp_forward(q[:, t, :, None, :], W1, W2, norm, eps)
        outputs.append(out[:, :, 0])
        if t + 1 in end_set:
            recorded.append(DeepState(W1, W2, S1, S2))
    o = torch.stack(outputs, dim=1)
    if ends is None:
        return o, DeepState(W1, W2, S1, S2)
    return o, DeepState(
        *(None if x[0] is None else torch.stack(x, 1) for x in zip(*recorded, strict=True))
    )


def token_step(rule, state, entry, t, k, v, eta, g, beta, norm, eps, max_grad_norm, target):
    """Token t's update of ``state``, its inner gradient taken at the ``entry`` weights
    (W1, W2) of its mini-batch; k, v: [B, T, H, D], eta, g, beta: [B, T, H] (or None);
    target: the weights titans' decay pulls toward (``decay_target``)."""
    grads = token_gradient(rule, k[:, t], v[:, t], *entry, norm, eps)  # [B, H, ...]
    return token_update(
        rule,
        state,
        grads,
        eta[:, t],
        None if g is None else g[:, t],
        None if beta is None else beta[:, t],
        max_grad_norm,
        target,
    )


def token_update(
    rule, state: DeepState, grads, eta_t, g_t, beta_t, max_grad_norm, target=None
) -> DeepState:
    """One token's update of the weights (and momentum) with its gradient ``grads``.

    eta_t, g_t, beta_t: [B, H] (g_t, beta_t titans only); the step -η_t is scaled by
    min(1, max_grad_norm / ||grads||) when max_grad_norm is given. target: (W1_0, W2_0) that
    the decay pulls toward, or None (toward zero).
    """
    W1, W2, S1, S2 = state
    step = -eta_t.to(W1.dtype)  # [B, H]
    if max_grad_norm is not None:
        gnorm = torch.sqrt(sum(x.pow(2).sum((-1, -2)) for x in grads) + 1e-30)
        step = step / torch.clamp(gnorm / max_grad_norm, min=1.0)
    step = step[..., None, None]
    if rule == "dla":
        return DeepState(W1 + step * grads[0], W2 + step * grads[1])
    a = torch.exp(g_t.to(W1.dtype))[..., None, None]
    b = clamp_momentum(beta_t.to(W1.dtype))[..., None, None]
    S1, S2 = b * S1 + step * grads[0], b * S2 + step * grads[1]
    if target is not None:  # decay the departure from the initial weights
        W1, W2 = (w0 + a * (w - w0) for w, w0 in zip((W1, W2), target, strict=True))
        return DeepState(W1 + S1, W2 + S2, S1, S2)
    return DeepState(a * W1 + S1, a * W2 + S2, S1, S2)


def token_gradient(rule, k_t, v_t, W1, W2, norm, eps):
    """(∇_W1 ℓ, ∇_W2 ℓ) of one token per [B, H], by autograd (differentiable)."""
    with torch.enable_grad():
        differentiable = any(x.requires_grad for x in (W1, W2, k_t, v_t))
        # weights outside any graph still need a handle to differentiate the loss by
        W1, W2 = (w if w.requires_grad else w.detach().requires_grad_() for w in (W1, W2))
        out, _ = mlp_forward(k_t[:, :, None, :], W1, W2, norm, eps)
        out = out[:, :, 0]
        loss = (out - v_t).pow(2).sum() if rule == "titans" else -(out * v_t).sum()
        return torch.autograd.grad(loss, (W1, W2), create_graph=differentiable)
