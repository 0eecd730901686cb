"""Shared test helpers: relative error and random inputs for the linear-family memory rules."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from growmem.layers import MemoryConfig
from growmem.layers.config import DEEP_LAYER_DEFAULTS
from growmem.ops.checks import RULE_GATES
from growmem.ops.spec import DEEP_RULES, Caching, DeepMemory, MatrixMemory

CACHING_FIELDS = frozenset(f.name for f in dataclasses.fields(Caching))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; ‖a‖ when b is all zeros."""
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    if nb == 0:
        return a.norm().item()
    return ((a - b).norm() / nb).item()


def make_inputs(
    rule: str,
    B: int,
    T: int,
    H: int,
    Dk: int,
    Dv: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = False,
):
    """Random q, k (unit-norm along the last dim), v, the gates ``rule`` reads, initial state.

    Returns (q, k, v, gates, initial_state): q, k [B, T, H, Dk], v [B, T, H, Dv], gates a dict
    with exactly the names in RULE_GATES[rule] ([B, T, H]: g = log-decay in about [-0.5, 0],
    beta and lam in (0, 1)), initial_state [B, H, Dv, Dk]. All are leaf tensors.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q = randn(B, T, H, Dk)
    k = F.normalize(randn(B, T, H, Dk), dim=-1)
    v = randn(B, T, H, Dv)
    makers = {
        "g": lambda: -F.softplus(randn(B, T, H)) * 0.3,
        "beta": lambda: torch.sigmoid(randn(B, T, H)),
        "lam": lambda: torch.sigmoid(randn(B, T, H)),
    }
    gates = {name: makers[name]() for name in RULE_GATES[rule]}
    s0 = randn(B, H, Dv, Dk) * 0.5

    def leaf(x):
        return x.to(dtype).detach().requires_grad_(requires_grad)

    return leaf(q), leaf(k), leaf(v), {n: leaf(x) for n, x in gates.items()}, leaf(s0)


def make_u(
    B: int,
    T: int,
    H: int,
    Dk: int,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    requires_grad: bool = False,
    scale: float = 2.0,
) -> torch.Tensor:
    """Random gate queries u [B, T, H, Dk] of Memory Caching (grm, soup, ssc): a leaf tensor.

    Drawn from its own stream (seed offset), so ``make_u(..., seed)`` differs from the q of
    ``make_inputs(..., seed)``; ``scale`` makes the gates far from uniform.
    """
    gen = torch.Generator().manual_seed(seed + 7919)
    u = torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64) * scale
    return u.to(dtype).detach().requires_grad_(requires_grad)


def aggregation_inits(aggregations, inits=("continuous", "independent")) -> list[tuple[str, str]]:
    """The (aggregation, init) pairs that fit together: loglinear needs init="continuous"."""
    return [(a, i) for a in aggregations for i in inits if a != "loglinear" or i == "continuous"]


def nan_from(x: torch.Tensor, t0: int, t1: int | None = None) -> torch.Tensor:
    """A leaf copy of x [B, T, ...] with NaN at tokens t0..t1-1 (to the end when t1 is None),
    requiring grad as x does."""
    y = x.detach().clone()
    y[:, t0:t1] = math.nan
    return y.requires_grad_(x.requires_grad)


def assert_finite_and_equal(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-12):
    """a is finite and equals b (b finite): relative error below ``tol``."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: not finite"
    assert torch.equal(a, b) or rel_err(a, b) < tol, f"{what}: rel err {rel_err(a, b):.3e}"


def memory_config(rule: str = "gated_delta", **settings) -> MemoryConfig:
    """A MemoryConfig from one flat dict of test settings: the ``Caching`` fields (aggregation,
    segment_size, segments, top_k, init, summary, gate_scale) go to ``caching``, the rest are
    the rule's knobs and the layer's options (names as in ``MemoryConfig.to_dict``)."""
    caching = {k: settings.pop(k) for k in CACHING_FIELDS & set(settings)}
    return MemoryConfig.from_dict({"rule": rule, **settings, "caching": caching})


# A memory's settings that only one kind of memory has (the rest: both, or the caching ones).
_DEEP_ONLY = {f.name for f in dataclasses.fields(DeepMemory)} - {"rule"} | set(DEEP_LAYER_DEFAULTS)
_MATRIX_ONLY = {f.name for f in dataclasses.fields(MatrixMemory)} - {"rule"}


def growmem_config(rule: str = "gated_delta", **settings):
    """A GrowMemConfig from flat test settings: its own arguments and the memory's (as
    ``memory_config`` takes them). A knob of the other kind of memory is left out, so that one
    set of settings serves every rule; rule "attention" is the Transformer++ (no memory)."""
    import inspect

    from growmem.models import GrowMemConfig

    own = set(inspect.signature(GrowMemConfig.__init__).parameters) - {"self", "kwargs"}
    model = {k: settings.pop(k) for k in own & set(settings)}
    if rule == "attention":
        return GrowMemConfig(**model, memory=None)
    other = _DEEP_ONLY if rule not in DEEP_RULES else _MATRIX_ONLY
    memory = memory_config(rule, **{k: v for k, v in settings.items() if k not in other})
    return GrowMemConfig(**model, memory=memory)
