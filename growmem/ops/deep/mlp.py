"""The deep memory M_W(x) = x + N(W1 σ(W2 x)) and its inner gradients, in closed form.

σ is the exact GELU and N an optional LayerNorm without affine parameters. The inner loss
ℓ(W; k, v) is ``titans``: ||M_W(k) - v||², or ``dla``: -<M_W(k), v>. Writing the gradient
out (instead of calling autograd inside the model) keeps the outer backward a first-order
autograd pass through these formulas, and lets many tokens' gradients be formed by matmuls.
For one token the gradients are rank one:
    ∇_W1 ℓ = δ1 h^T  with h = σ(W2 k),   ∇_W2 ℓ = δ2 k^T.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


class DeepState(NamedTuple):
    """Weights of a deep memory (and titans' momentum), each with leading dims [..., ]:
    W1 [..., Dv, Dh], W2 [..., Dh, Dk]; S1, S2 like W1, W2 (titans only, else None)."""

    W1: torch.Tensor
    W2: torch.Tensor
    S1: torch.Tensor | None = None
    S2: torch.Tensor | None = None

    def map(self, fn) -> DeepState:
        """Apply ``fn`` to every tensor (None stays None)."""
        return DeepState(*(None if x is None else fn(x) for x in self))


def expand_weights(init_weights, B: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned initial weights (W1 [H, Dv, Dh], W2 [H, Dh, Dk]) as [B, H, ...] views."""
    return tuple(w.to(dtype).unsqueeze(0).expand(B, *w.shape) for w in init_weights)


def start_state(init_weights, initial_state, rule: str, B: int, dtype) -> DeepState:
    """The state a stream starts from: ``initial_state`` if given, else the learned initial
    weights (W1 [H, Dv, Dh], W2 [H, Dh, Dk]) expanded over the batch, and zero momentum for
    titans."""
    if initial_state is not None:
        return initial_state.map(lambda x: x.to(dtype))
    W1, W2 = expand_weights(init_weights, B, dtype)
    if rule == "titans":
        return DeepState(W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))
    return DeepState(W1, W2)


# Where titans' decay a_t pulls the weights: "init", the learned initial weights
# (W_t = a_t W_{t-1} + (1 - a_t) W_0 + Σ_t), or "zero" (W_t = a_t W_{t-1} + Σ_t, Titans' equation
# read literally). Decay toward zero shrinks the MLP's weights: with the output LayerNorm its read
# does not change with their scale, so nothing is forgotten, but the inner loss's curvature
# grows as 1/var(y) and the inner gradient steps turn unstable; without the norm the weights
# reach the 2-layer MLP's zero saddle, where every inner gradient vanishes and nothing more is
# stored (docs/design.md, "Decay toward the initial weights").
DECAY_TARGETS = ("init", "zero")


def decay_target(rule, decay_to, init_weights, dtype):
    """The weights titans' decay pulls toward, (W1_0 [H, Dv, Dh], W2_0 [H, Dh, Dk]) shared by
    the batch, or None when it pulls toward zero (and for dla, which has no decay)."""
    if rule != "titans" or decay_to == "zero":
        return None
    return tuple(w.to(dtype) for w in init_weights)


def head_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., H, L, Din] @ w [H, Din, Dout] -> [..., H, L, Dout] as one bmm over the heads:
    a broadcasting matmul would copy w for every leading index (and sum as many copies of
    its gradient)."""
    H, L, Din = x.shape[-3:]
    lead = x.shape[:-3]
    n = math.prod(lead) * L
    out = torch.bmm(x.movedim(-3, 0).reshape(H, n, Din), w)  # [H, n, Dout]
    return out.view(H, *lead, L, w.shape[-1]).movedim(0, -3)


def clamp_momentum(beta: torch.Tensor) -> torch.Tensor:
    """β floored at 1e-30: the fast path takes log β (the reference applies the same floor, so
    both compute one function)."""
    return beta.clamp_min(1e-30)


def gelu(z: torch.Tensor) -> torch.Tensor:
    return F.gelu(z)


def gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """dσ/dz of the exact GELU, Φ(z) + z φ(z), written so that autograd can differentiate it."""
    return 0.5 * (1.0 + torch.erf(z * _INV_SQRT2)) + z * torch.exp(-0.5 * z * z) * _INV_SQRT2PI


def layer_norm(y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim without affine parameters; returns (n, 1/std)."""
    mu = y.mean(-1, keepdim=True)
    rstd = torch.rsqrt((y - mu).pow(2).mean(-1, keepdim=True) + eps)
    return (y - mu) * rstd, rstd


def layer_norm_backward(dn: torch.Tensor, n: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. y of LayerNorm's output n, given dn."""
    return rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))


def mlp_forward(x, W1, W2, norm: bool, eps: float):
    """M_W(x) for rows x [..., L, Dk]; W1 [..., Dv, Dh], W2 [..., Dh, Dk] (Dv = Dk).

    Returns (out [..., L, Dv], cache) where cache holds what the inner gradient needs.
    """
    z = x @ W2.transpose(-1, -2)  # [..., L, Dh]
    h = gelu(z)
    y = h @ W1.transpose(-1, -2)  # [..., L, Dv]
    if norm:
        n, rstd = layer_norm(y, eps)
        return x + n, (z, h, n, rstd)
    return x + y, (z, h, None, None)


def inner_gradients(rule, x, v, W1, mlp_cache, out):
    """Per-row factors of the inner gradient at W, for keys x and values v [..., L, D].

    Returns (d1 [..., L, Dv], h [..., L, Dh], d2 [..., L, Dh]): ∇_W1 ℓ_j = d1_j h_j^T and
    ∇_W2 ℓ_j = d2_j x_j^T.
    """
    z, h, n, rstd = mlp_cache
    d_out = 2.0 * (out - v) if rule == "titans" else -v  # dℓ/dM
    d1 = d_out if n is None else layer_norm_backward(d_out, n, rstd)  # dℓ/dy
    d2 = (d1 @ W1) * gelu_grad(z)  # dℓ/dz
    return d1, h, d2


def gradient_norm(x, d1, h, d2) -> torch.Tensor:
    """Frobenius norm of the joint gradient (∇_W1, ∇_W2) of each row: [..., L]."""
    sq = d1.pow(2).sum(-1) * h.pow(2).sum(-1) + d2.pow(2).sum(-1) * x.pow(2).sum(-1)
    return torch.sqrt(sq + 1e-30)
