"""Argument checks shared by the ops: every bad input becomes a ValueError naming the argument."""

from __future__ import annotations

import torch

LINEAR_RULES = ("linear", "decay", "delta", "gated_delta", "swla")

# Per-token gates each rule reads: g (log-decay), beta (write strength), lam (current-token weight).
RULE_GATES: dict[str, tuple[str, ...]] = {
    "linear": (),
    "decay": ("g",),
    "delta": ("beta",),
    "gated_delta": ("g", "beta"),
    "swla": ("g", "beta", "lam"),
}


def check_tensor(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of rank ``ndim``; ``layout`` names its dims."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}"
        )


def check_positive_int(name: str, x, allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")


def check_choice(name: str, x, choices) -> None:
    if x not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {x!r}")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """Check q, k: [B, T, H, Dk] and v: [B, T, H, Dv]; returns (B, T, H, Dk, Dv)."""
    check_tensor("q", q, 4, "[B, T, H, Dk]")
    check_tensor("k", k, 4, "[B, T, H, Dk]")
    check_tensor("v", v, 4, "[B, T, H, Dv]")
    B, T, H, Dk = q.shape
    check_shape("k", k, (B, T, H, Dk), "[B, T, H, Dk] like q")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"v must have shape [B, T, H, Dv] with B, T, H = {(B, T, H)} as q, got {tuple(v.shape)}"
        )
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, T, H, Dk, v.shape[-1]


def check_gates(rule: str, B: int, T: int, H: int, **gates) -> None:
    """Check that exactly the gates ``rule`` needs are given, each of shape [B, T, H]."""
    check_choice("rule", rule, LINEAR_RULES)
    needed = RULE_GATES[rule]
    for name, x in gates.items():
        if name in needed:
            if x is None:
                raise ValueError(f"{name} is required by rule {rule!r}: a [B, T, H] tensor")
            check_tensor(name, x, 3, "[B, T, H]")
            check_shape(name, x, (B, T, H), "[B, T, H]")
            # The chunk form takes differences of cumulative log-decays: -inf would give NaN.
            if name == "g" and not bool(torch.isfinite(x).all()):
                raise ValueError(
                    "g must be finite (a_t = exp(g_t) > 0); for a hard reset use "
                    "a large negative value such as -30"
                )
        elif x is not None:
            raise ValueError(
                f"{name} is not used by rule {rule!r} (it reads {list(needed)}); pass {name}=None"
            )


def check_state(name: str, x, expected: tuple[int, ...], layout: str) -> None:
    if x is None:
        return
    check_tensor(name, x, len(expected), layout)
    check_shape(name, x, expected, layout)
