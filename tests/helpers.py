"""Shared test helpers: closeness, random inputs of the memory ops, gradients of a random
functional, and feeding a stream in pieces."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import torch
import torch.nn.functional as F

from growmem.layers import MemoryConfig
from growmem.layers.config import DEEP_LAYER_DEFAULTS
from growmem.ops.caching.backend import iter_tensors, map_tensors
from growmem.ops.checks import RULE_GATES
from growmem.ops.deep import DeepState
from growmem.ops.spec import DEEP_RULES, Caching, DeepMemory, MatrixMemory

CACHING_FIELDS = frozenset(f.name for f in dataclasses.fields(Caching))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64; ‖a‖ when b is all zeros."""
    a, b = a.detach().double(), b.detach().double()
    nb = b.norm()
    if nb == 0:
        return a.norm().item()
    return ((a - b).norm() / nb).item()


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    """Same shape and relative error (``rel_err``) below ``tol``."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < tol, f"{what}: rel err {err:.3e} >= {tol:.0e}"


def assert_grads_close(grads: dict, expected: dict, tol: float, what: str = "") -> None:
    """The same gradients by name: close where ``expected`` has one, None or zero where not."""
    assert set(grads) == set(expected), f"{what}: {sorted(grads)} != {sorted(expected)}"
    for name, ref in expected.items():
        got = grads[name]
        if ref is None:
            assert got is None or not got.any(), f"{what} grad {name}: expected none"
        else:
            assert got is not None, f"{what} grad {name} is None, the expected one is not"
            assert_close(got, ref, tol, f"{what} grad {name}")


def outputs_and_grads(fn, named: dict[str, torch.Tensor], w_seed: int = 123):
    """Run ``fn()`` and differentiate a random linear functional of every tensor it returns (a
    tensor, or tuples and NamedTuples of them such as (o, states)) with respect to the
    ``named`` inputs; returns (the outputs detached, {name: gradient, None where unused})."""
    out = fn()
    gen = torch.Generator().manual_seed(w_seed)
    loss = sum(
        (x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in iter_tensors(out)
    )
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return map_tensors(out, torch.Tensor.detach), dict(zip(named, grads, strict=True))


def arg(name: str) -> str:
    """A regex for an error message that starts with the argument's name."""
    return r"^" + re.escape(name) + r"\b"


def call_op(op, kwargs: dict):
    """``op(q, k, v[, u], **rest)`` for a dict of its arguments (q, k, v and u by position)."""
    kwargs = dict(kwargs)
    args = [kwargs.pop(n) for n in ("q", "k", "v", "u") if n in kwargs]
    return op(*args, **kwargs)


def layer_past_loss(layer, x, t0: int, mask=None):
    """A layer's outputs on x [B, T, hidden] and d/dx of a random functional of the outputs
    before t0."""
    x = x.detach().requires_grad_()
    o, _ = layer(x, attention_mask=mask)
    w = torch.randn(o[:, :t0].shape, generator=torch.Generator().manual_seed(3), dtype=o.dtype)
    (grad,) = torch.autograd.grad((o[:, :t0] * w).sum(), x)
    return o.detach(), grad


def stream(call, cuts: list[int], T: int, cache=None):
    """Feed tokens 0..T-1 in the pieces [0, c1), [c1, c2), ..., [c_n, T):
    ``call(a, b, cache) -> (o [B, b - a, ...], cache)``, the first call with ``cache``;
    returns (the outputs concatenated along the token dim, the final cache)."""
    outs = []
    for a, b in itertools.pairwise([0, *cuts, T]):
        o, cache = call(a, b, cache)
        outs.append(o)
    return torch.cat(outs, 1), cache


def stream_layer(layer, x, pieces: list[int], cache=None, mask=None):
    """A layer over x [B, T, hidden] in pieces of the given lengths, continuing its cache (and
    the attention mask's pieces): returns (o [B, T, hidden], the cache)."""
    assert sum(pieces) == x.shape[1]
    cuts = list(itertools.accumulate(pieces))[:-1]

    def call(a, b, cache):
        m = None if mask is None else mask[:, a:b]
        return layer(x[:, a:b], attention_mask=m, cache=cache, use_cache=True)

    return stream(call, cuts, x.shape[1], cache)


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


def tiny_lm(rule: str, aggregation: str, vocab_size: int, **settings):
    """A GrowMemForCausalLM small enough for exactness tests: 2 layers, width 16, segments,
    chunks and deep mini-batches of 4 tokens, init std 0.7 (outputs that depend on the
    context), float64, eval mode, weights from seed 0; ``settings`` as growmem_config takes
    them."""
    from growmem.models import GrowMemForCausalLM

    config = growmem_config(
        rule,
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_heads=2,
        aggregation=aggregation,
        segment_size=4,
        mini_batch=4,
        chunk_size=4,
        initializer_range=0.7,
        **settings,
    )
    torch.manual_seed(0)
    return GrowMemForCausalLM(config).double().eval()


@dataclasses.dataclass
class OpInputs:
    """One set of inputs of a memory op (linear_memory, deep_memory, memory_caching) for
    ``rule``.

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; u: [B, T, H, Dk] gate queries of Memory Caching, or
    None; gates: the rule's [B, T, H] gates by name; init_weights: a deep rule's (W1 [H, Dv,
    Dh], W2 [H, Dh, Dk]), else None; initial_state: [B, H, Dv, Dk], a DeepState of [B, H, ...]
    tensors, or None; gate_inputs: Memory Caching's optional gate inputs by name (temperature
    and online_bias per head [H] or per token [B, T, H], summary_keys [B, T, H, Dk]).
    """

    rule: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor | None
    gates: dict[str, torch.Tensor]
    init_weights: tuple[torch.Tensor, torch.Tensor] | None = None
    initial_state: torch.Tensor | DeepState | None = None
    gate_inputs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def T(self) -> int:
        return self.q.shape[1]

    @property
    def all_gates(self) -> dict[str, torch.Tensor]:
        """The op's ``gates`` dict: the rule's gates and the gate inputs."""
        return {**self.gates, **self.gate_inputs}

    def leaves(self) -> dict[str, torch.Tensor]:
        """Named differentiable inputs, in a fixed order (None entries dropped)."""
        named = {"q": self.q, "k": self.k, "v": self.v, "u": self.u, **self.all_gates}
        if self.init_weights is not None:
            named.update({"init W1": self.init_weights[0], "init W2": self.init_weights[1]})
        state = self.initial_state
        if isinstance(state, DeepState):
            named.update(
                {f"initial_state.{f}": x for f, x in zip(state._fields, state, strict=True)}
            )
        else:
            named["initial_state"] = state
        return {n: x for n, x in named.items() if x is not None}

    def map_tokens(self, fn, **changes) -> OpInputs:
        """The inputs with ``fn`` applied to every per-token tensor (q, k, v, u, gates, the
        gate inputs but the per-head [H] ones)."""
        return dataclasses.replace(
            self,
            **{n: None if x is None else fn(x) for n, x in (("q", self.q), ("k", self.k),
                                                          ("v", self.v), ("u", self.u))},
            gates={n: fn(x) for n, x in self.gates.items()},
            gate_inputs={n: x if x.dim() == 1 else fn(x) for n, x in self.gate_inputs.items()},
            **changes,
        )  # fmt: skip

    def part(self, a: int, b: int, **changes) -> OpInputs:
        """Tokens a..b-1 (the initial weights and the initial state kept unless changed)."""
        return self.map_tokens(lambda x: x[:, a:b], **changes)

    def rows(self, index: torch.Tensor) -> OpInputs:
        """Batch rows ``index`` (the initial weights shared, the initial state selected)."""
        state = self.initial_state
        if state is not None:
            state = state.map(lambda x: x[index]) if isinstance(state, DeepState) else state[index]
        return self.map_tokens(lambda x: x[index], initial_state=state)

    def spliced(self, other: OpInputs, t0: int) -> OpInputs:
        """Tokens before t0 of these inputs, tokens from t0 on of ``other``."""
        names = ("q", "k", "v", "u")
        return dataclasses.replace(
            self,
            **{n: _splice(getattr(self, n), getattr(other, n), t0) for n in names},
            gates={n: _splice(x, other.gates[n], t0) for n, x in self.gates.items()},
            gate_inputs={
                n: x if x.dim() == 1 else _splice(x, other.gate_inputs[n], t0)
                for n, x in self.gate_inputs.items()
            },
        )

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> OpInputs:
        """Every tensor in ``dtype`` (and on ``device`` when given), as leaves that do not
        require grad."""

        def cast(x):
            return x.detach().to(device=device, dtype=dtype)

        state = self.initial_state
        if state is not None:
            state = state.map(cast) if isinstance(state, DeepState) else cast(state)
        weights = None if self.init_weights is None else tuple(map(cast, self.init_weights))
        cast_inputs = self.map_tokens(cast, init_weights=weights, initial_state=state)
        # (map_tokens leaves the per-head gate inputs alone)
        per_head = {n: cast(x) for n, x in self.gate_inputs.items() if x.dim() == 1}
        return dataclasses.replace(cast_inputs, gate_inputs={**cast_inputs.gate_inputs, **per_head})


def poison_entries(inp: OpInputs, names, s: int, head: int, value: float = math.nan) -> OpInputs:
    """inp with ``value`` at token s, head ``head``, in input names[i] of batch row i (one
    entry each; a name of q, k, v, u or a gate): its per-token inputs as fresh leaves (requiring
    grad), the rest shared."""
    fresh = inp.map_tokens(lambda x: x.detach().clone())
    for row, name in enumerate(names):
        x = fresh.all_gates[name] if name in fresh.all_gates else getattr(fresh, name)
        if x.dim() == 4:
            x[row, s, head, 1] = value
        else:
            x[row, s, head] = value
    return fresh.map_tokens(lambda x: x.requires_grad_())


def _splice(x, y, t0):
    return None if x is None else torch.cat([x[:, :t0], y[:, t0:]], dim=1)


def make_op_inputs(
    rule: str,
    T: int,
    *,
    b: int = 2,
    h: int = 2,
    dk: int = 5,
    dv: int = 4,
    dh: int = 20,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    with_u: bool = True,
    with_state: bool = True,
    normalize_q: bool = False,
    eta_scale: float = 0.5,
    temperature: str | None = None,
    online_bias: str | None = None,
    summary_keys: bool = False,
) -> OpInputs:
    """Random inputs of ``rule``, all leaf tensors.

    The gate inputs: ``temperature`` and ``online_bias`` "head" ([H]), "token" ([B, T, H]) or
    None (none), τ ~ U(0.5, 2), b ~ N(0, 1); ``summary_keys`` ~ N(0, 1) [B, T, H, Dk] when
    True (drawn from a stream of their own, so the other inputs do not change).

    A matrix rule: ``make_inputs`` (keys unit-norm, gates as RULE_GATES says, an initial state)
    and u from ``make_u``. A deep rule (Dv = Dk = dk, hidden size dh): q, v ~ N(0, 1) (q
    unit-norm with normalize_q), unit-norm keys, u ~ 2 N(0, 1), eta ~ eta_scale U(0, 1), titans'
    g ~ -0.2 U(0, 1) and beta ~ U(0, 1), initial weights ~ 0.3 N(0, 1), and an initial DeepState
    near them (with random momentum for titans).
    """
    gate_inputs = make_gate_inputs(
        (b, T, h, dk), seed, dtype, requires_grad, temperature, online_bias, summary_keys
    )
    if rule not in DEEP_RULES:
        q, k, v, gates, s0 = make_inputs(rule, b, T, h, dk, dv, dtype, seed, requires_grad)
        if normalize_q:
            q = F.normalize(q.detach(), dim=-1).requires_grad_(requires_grad)
        u = make_u(b, T, h, dk, dtype, seed, requires_grad) if with_u else None
        return OpInputs(rule, q, k, v, u, gates, None, s0 if with_state else None, gate_inputs)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    titans = rule == "titans"
    d = dk
    q, k, v = randn(b, T, h, d), F.normalize(randn(b, T, h, d), dim=-1), randn(b, T, h, d)
    q = F.normalize(q, dim=-1) if normalize_q else q
    u = 2.0 * randn(b, T, h, d) if with_u else None
    gates = {"eta": eta_scale * rand(b, T, h)}
    if titans:
        gates.update(g=-0.2 * rand(b, T, h), beta=rand(b, T, h))
    W1, W2 = 0.3 * randn(h, d, dh), 0.3 * randn(h, dh, d)
    state = DeepState(
        W1 + 0.1 * randn(b, h, d, dh),
        W2 + 0.1 * randn(b, h, dh, d),
        0.1 * randn(b, h, d, dh) if titans else None,
        0.1 * randn(b, h, dh, d) if titans else None,
    )

    def leaf(x):
        return None if x is None else x.to(dtype).detach().requires_grad_(requires_grad)

    return OpInputs(
        rule,
        *(leaf(x) for x in (q, k, v, u)),
        {n: leaf(x) for n, x in gates.items()},
        (leaf(W1), leaf(W2)),
        state.map(leaf) if with_state else None,
        gate_inputs,
    )


def make_gate_inputs(
    shape, seed, dtype, requires_grad, temperature=None, online_bias=None, summary_keys=False
) -> dict[str, torch.Tensor]:
    """The gate inputs ``make_op_inputs`` describes, for shape = (B, T, H, Dk)."""
    B, T, H, Dk = shape
    gen = torch.Generator().manual_seed(seed + 104729)
    sizes = {"head": (H,), "token": (B, T, H), None: None}
    values = {}
    if sizes[temperature] is not None:
        uniform = torch.rand(sizes[temperature], generator=gen, dtype=torch.float64)
        values["temperature"] = 0.5 + 1.5 * uniform
    if sizes[online_bias] is not None:
        values["online_bias"] = torch.randn(sizes[online_bias], generator=gen, dtype=torch.float64)
    if summary_keys:
        values["summary_keys"] = torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64)
    return {n: x.to(dtype).requires_grad_(requires_grad) for n, x in values.items()}
