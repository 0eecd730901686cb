"""Tests of growmem.ops.linear_memory: the chunkwise path against the per-token reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from growmem.ops import linear_memory
from growmem.ops.checks import LINEAR_RULES, RULE_GATES
from tests.helpers import (
    arg,
    assert_close,
    assert_finite_and_equal,
    call_op,
    make_inputs,
    nan_from,
    outputs_and_grads,
    rel_err,
)

B, H, DK, DV = 2, 2, 24, 40
TOL64 = 1e-9


def run(q, k, v, gates, s0=None, *, rule, **kw):
    return linear_memory(q, k, v, rule=rule, initial_state=s0, **gates, **kw)


def leaves(q, k, v, gates, s0):
    """Named leaf tensors of one input set, in a fixed order."""
    named = {"q": q, "k": k, "v": v, **gates}
    if s0 is not None:
        named["initial_state"] = s0
    return named


def run_and_grads(inputs, rule, **kw):
    """Run the op, backprop a random linear functional of o and states; return o, states, grads."""
    q, k, v, gates, s0 = inputs
    (o, states), grads = outputs_and_grads(
        lambda: run(q, k, v, gates, s0, rule=rule, **kw), leaves(q, k, v, gates, s0)
    )
    return o, states, grads


def n_states(T, boundary):
    return 1 if boundary is None else math.ceil(T / boundary)


def state_shape(T, boundary, b=B, h=H, dk=DK, dv=DV):
    if boundary is None:
        return (b, h, dv, dk)
    return (b, n_states(T, boundary), h, dv, dk)


# --------------------------------------------------------------------------------------------
# chunkwise vs reference, float64, outputs + states + gradients
# --------------------------------------------------------------------------------------------

# (T, chunk_size, boundary): boundary None, < C and not dividing it (7), a multiple of C,
# larger than T, and 1 (a state after every token). The reference is a Python loop over
# tokens, so T = 517 gets only two configurations per rule.
CONFIGS = [
    (1, 16, None),
    (1, 64, 7),
    (63, 16, None),
    (63, 16, 7),
    (63, 16, 32),
    (63, 64, 100),
    (63, 16, 1),
    (200, 16, 7),
    (200, 64, None),
    (200, 64, 128),
    (200, 16, 1000),
    (517, 64, 7),
    (517, 16, 64),
]


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize(("T", "chunk_size", "boundary"), CONFIGS)
def test_chunk_matches_reference_float64(rule, T, chunk_size, boundary):
    seed = 1000 * T + chunk_size
    inp_c = make_inputs(rule, B, T, H, DK, DV, torch.float64, seed, requires_grad=True)
    inp_r = make_inputs(rule, B, T, H, DK, DV, torch.float64, seed, requires_grad=True)
    o_c, s_c, g_c = run_and_grads(inp_c, rule, boundary=boundary, chunk_size=chunk_size)
    o_r, s_r, g_r = run_and_grads(inp_r, rule, boundary=boundary, impl="reference")

    assert o_c.shape == (B, T, H, DV) and o_c.dtype == torch.float64
    assert s_c.shape == state_shape(T, boundary) and s_c.dtype == torch.float64
    assert_close(o_c, o_r, TOL64, "o")
    assert_close(s_c, s_r, TOL64, "states")
    assert set(g_c) == {"q", "k", "v", "initial_state", *RULE_GATES[rule]}
    for name in g_r:
        # (swla with T = 1: β only scales v_0 k_0^T = 0, so its gradient is truly zero)
        if not (rule == "swla" and name == "beta" and T == 1):
            assert g_r[name].abs().sum() > 0, f"reference gradient of {name} is zero"
        assert_close(g_c[name], g_r[name], TOL64, f"grad {name}")


@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_chunk_matches_reference_without_initial_state(rule):
    T = 45
    inp_c = list(make_inputs(rule, B, T, H, DK, DV, torch.float64, 7, requires_grad=True))
    inp_r = list(make_inputs(rule, B, T, H, DK, DV, torch.float64, 7, requires_grad=True))
    inp_c[4] = inp_r[4] = None
    o_c, s_c, g_c = run_and_grads(inp_c, rule, boundary=10, chunk_size=16)
    o_r, s_r, g_r = run_and_grads(inp_r, rule, boundary=10, impl="reference")
    assert_close(o_c, o_r, TOL64, "o")
    assert_close(s_c, s_r, TOL64, "states")
    for name in g_r:
        assert_close(g_c[name], g_r[name], TOL64, f"grad {name}")


@pytest.mark.parametrize("boundary", [None, 9])
def test_swla_prev_kv_chunk_matches_reference(boundary):
    T = 70
    grads = []
    results = []
    for impl in ("chunk", "reference"):
        q, k, v, gates, s0 = make_inputs("swla", B, T, H, DK, DV, torch.float64, 3, True)
        gen = torch.Generator().manual_seed(4)
        k_prev = torch.randn(B, H, DK, generator=gen, dtype=torch.float64).requires_grad_()
        v_prev = torch.randn(B, H, DV, generator=gen, dtype=torch.float64).requires_grad_()
        o, s = run(
            q,
            k,
            v,
            gates,
            s0,
            rule="swla",
            boundary=boundary,
            chunk_size=16,
            prev_kv=(k_prev, v_prev),
            impl=impl,
        )
        w1 = torch.randn(o.shape, generator=gen, dtype=o.dtype)
        w2 = torch.randn(s.shape, generator=gen, dtype=s.dtype)
        ((o * w1).sum() + (s * w2).sum()).backward()
        results.append((o.detach(), s.detach()))
        grads.append([x.grad for x in (q, k, v, *gates.values(), s0, k_prev, v_prev)])
    assert_close(results[0][0], results[1][0], TOL64, "o")
    assert_close(results[0][1], results[1][1], TOL64, "states")
    for gc, gr in zip(*grads, strict=True):
        assert gr.abs().sum() > 0
        assert_close(gc, gr, TOL64, "grad")


# --------------------------------------------------------------------------------------------
# float32 chunk vs float64 reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize(("T", "boundary"), [(63, None), (200, 7)])
def test_chunk_float32_matches_float64_reference(rule, T, boundary, device):
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, torch.float64, 11)
    o_r, s_r = run(q, k, v, gates, s0, rule=rule, boundary=boundary, impl="reference")
    # the chunk path on CUDA when one is present
    f32 = [x.to(device, torch.float32) for x in (q, k, v, s0)]
    gates32 = {n: x.to(device, torch.float32) for n, x in gates.items()}
    o, s = run(*f32[:3], gates32, f32[3], rule=rule, boundary=boundary, chunk_size=32)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert_close(o.cpu(), o_r, 1e-4, "o")
    assert_close(s.cpu(), s_r, 1e-4, "states")


# --------------------------------------------------------------------------------------------
# boundary states
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize(("T", "boundary", "chunk_size"), [(70, 16, 16), (70, 10, 16), (64, 16, 8)])
def test_boundary_states_are_prefix_final_states(rule, impl, T, boundary, chunk_size):
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, torch.float64, 5)
    _, states = run(
        q, k, v, gates, s0, rule=rule, boundary=boundary, chunk_size=chunk_size, impl=impl
    )
    nb = math.ceil(T / boundary)
    assert states.shape == (B, nb, H, DV, DK)
    _, final = run(q, k, v, gates, s0, rule=rule, chunk_size=chunk_size, impl=impl)
    assert final.shape == (B, H, DV, DK)
    assert_close(states[:, -1], final, 1e-12, "last boundary state vs final state")
    for i in range(nb - (T % boundary != 0)):
        t = (i + 1) * boundary
        prefix = {n: x[:, :t] for n, x in gates.items()}
        _, s_t = run(
            q[:, :t], k[:, :t], v[:, :t], prefix, s0, rule=rule, chunk_size=chunk_size, impl=impl
        )
        assert_close(states[:, i], s_t, 1e-12, f"state after {t} tokens")
    # the states differ from one another (the check above is not vacuous)
    assert rel_err(states[:, 0], states[:, -1]) > 1e-3


def test_boundary_larger_than_T_gives_one_state():
    q, k, v, gates, s0 = make_inputs("gated_delta", B, 20, H, DK, DV, torch.float64, 1)
    _, states = run(q, k, v, gates, s0, rule="gated_delta", boundary=21)
    _, final = run(q, k, v, gates, s0, rule="gated_delta")
    assert states.shape == (B, 1, H, DV, DK)
    assert_close(states[:, 0], final, 1e-12, "state")


# --------------------------------------------------------------------------------------------
# chunk size does not change results
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("boundary", [None, 7])
def test_chunk_size_invariance(rule, boundary):
    T = 100
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, torch.float64, 9)
    results = [
        run(q, k, v, gates, s0, rule=rule, boundary=boundary, chunk_size=c) for c in (1, 5, 64)
    ]
    o_ref, s_ref = results[-1]
    for o, s in results[:-1]:
        assert_close(o, o_ref, 1e-12, "o")
        assert_close(s, s_ref, 1e-12, "states")


# --------------------------------------------------------------------------------------------
# continuing a sequence
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("t", [1, 37, 64])
def test_continuation_equals_whole_run(rule, impl, t):
    T = 90
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, torch.float64, 21)
    o_all, s_all = run(q, k, v, gates, s0, rule=rule, chunk_size=16, impl=impl)

    def part(sl):
        return q[:, sl], k[:, sl], v[:, sl], {n: x[:, sl] for n, x in gates.items()}

    o1, s1 = run(*part(slice(None, t)), s0, rule=rule, chunk_size=16, impl=impl)
    extra = {}
    if rule == "swla":
        extra["prev_kv"] = (k[:, t - 1], v[:, t - 1])  # [B, H, Dk], [B, H, Dv]
    o2, s2 = run(*part(slice(t, None)), s1, rule=rule, chunk_size=16, impl=impl, **extra)
    assert_close(torch.cat([o1, o2], dim=1), o_all, 1e-12, "o")
    assert_close(s2, s_all, 1e-12, "final state")
    if rule == "swla":
        # without prev_kv the first token of part two misses β v_{t-1} k_{t-1}^T
        o2_bad, _ = run(*part(slice(t, None)), s1, rule=rule, chunk_size=16, impl=impl)
        assert rel_err(o2_bad[:, :1], o_all[:, t : t + 1]) > 1e-3


# --------------------------------------------------------------------------------------------
# causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_future_tokens_do_not_change_past_outputs(rule):
    T, t = 50, 23
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, torch.float64, 2)
    o, _ = run(q, k, v, gates, s0, rule=rule, chunk_size=16, boundary=30)
    q2, k2, v2, gates2, _ = make_inputs(rule, B, T, H, DK, DV, torch.float64, 3)

    def mix(a, b):
        return torch.cat([a[:, :t], b[:, t:]], dim=1)

    o_mix, _ = run(
        mix(q, q2),
        mix(k, k2),
        mix(v, v2),
        {n: mix(x, gates2[n]) for n, x in gates.items()},
        s0,
        rule=rule,
        chunk_size=16,
        boundary=30,
    )
    assert torch.equal(o[:, :t], o_mix[:, :t]) or rel_err(o_mix[:, :t], o[:, :t]) < 1e-14
    assert rel_err(o_mix[:, t:], o[:, t:]) > 1e-3


# A NaN in the future must not reach the past: the chunk form mixes a chunk's tokens in
# matmuls (0 · NaN = NaN), and every backward pairs zero adjoints with later activations.
NAN_T, NAN_ENDS = 37, (7, 14, 21, 28, 35, 37)  # boundary 7, chunks of 16


def _past_loss_run(named: dict, rule: str, t0: int):
    """o, states and the gradients of a random functional of the outputs before t0."""
    gates = {n: x for n, x in named.items() if n in RULE_GATES[rule]}
    o, states = linear_memory(
        named["q"],
        named["k"],
        named["v"],
        rule=rule,
        **gates,
        initial_state=named["initial_state"],
        chunk_size=16,
        boundary=7,
    )
    w = torch.randn(o[:, :t0].shape, generator=torch.Generator().manual_seed(5), dtype=o.dtype)
    grads = torch.autograd.grad((o[:, :t0] * w).sum(), list(named.values()))
    return o.detach(), states.detach(), dict(zip(named, grads, strict=True))


def _nan_inputs(rule: str, poisoned: str, t0: int, t1: int | None = None):
    """(clean, poisoned) named leaves: NaN in input ``poisoned`` at tokens t0..t1-1."""
    q, k, v, gates, s0 = make_inputs(rule, B, NAN_T, H, 5, 4, torch.float64, 4, True)
    clean = dict(q=q, k=k, v=v, **gates, initial_state=s0)
    return clean, {**clean, poisoned: nan_from(clean[poisoned], t0, t1)}


def _check_nan_causality(rule: str, poisoned: str, t0: int):
    clean, bad = _nan_inputs(rule, poisoned, t0)
    o, states, grads = _past_loss_run(clean, rule, t0)
    o_bad, states_bad, grads_bad = _past_loss_run(bad, rule, t0)
    assert_finite_and_equal(o_bad[:, :t0], o[:, :t0], "outputs before t0")
    # from a key, value or gate on the memory is corrupt; a query only spoils its own output
    assert torch.isnan(o_bad[:, t0:]).all()
    before = torch.tensor(NAN_ENDS) <= t0
    assert_finite_and_equal(states_bad[:, before], states[:, before], "states before t0")
    if poisoned == "q":
        assert_finite_and_equal(states_bad[:, ~before], states[:, ~before], "states")
    else:
        assert torch.isnan(states_bad[:, ~before]).all()
    for name, g in grads.items():  # (0 at the tokens from t0 on, in both runs)
        assert_finite_and_equal(grads_bad[name], g, f"grad {name}")


@pytest.mark.parametrize("t0", [1, 21])
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_nan_in_future_tokens_does_not_reach_the_past(rule, poisoned, t0):
    _check_nan_causality(rule, poisoned, t0)


@pytest.mark.parametrize("rule", ["decay", "delta", "gated_delta", "swla"])
def test_nan_gates_do_not_reach_the_past(rule):
    """A NaN gate is a failed activation, carried causally like a NaN key or value."""
    for name in RULE_GATES[rule]:
        _check_nan_causality(rule, name, 21)


@pytest.mark.parametrize("rule", ["linear", "gated_delta", "swla"])
def test_nan_query_spoils_only_its_own_output(rule):
    t0 = 21
    clean, bad = _nan_inputs(rule, "q", t0, t0 + 1)
    o, states, _ = _past_loss_run(clean, rule, t0)
    o_bad, states_bad, _ = _past_loss_run(bad, rule, t0)
    assert torch.isnan(o_bad[:, t0]).all()
    keep = torch.arange(NAN_T) != t0
    assert_finite_and_equal(o_bad[:, keep], o[:, keep], "other outputs")
    assert_finite_and_equal(states_bad, states, "states")


# --------------------------------------------------------------------------------------------
# dtypes and autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("boundary", [None, 16])
def test_autocast_bf16_with_fp32_inputs(rule, boundary):
    q, k, v, gates, s0 = make_inputs(rule, B, 40, H, DK, DV, torch.float32, 13)
    o_ref, s_ref = run(q, k, v, gates, s0, rule=rule, boundary=boundary, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = run(q, k, v, gates, s0, rule=rule, boundary=boundary, chunk_size=16)
    assert s.dtype == torch.float32
    assert o.dtype == torch.float32
    assert_close(o, o_ref, 1e-5, "o")
    assert_close(s, s_ref, 1e-5, "states")


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_inputs(rule, autocast):
    T = 40
    q, k, v, gates, s0 = make_inputs(rule, B, T, H, DK, DV, torch.float64, 17)
    o64, s64 = run(q, k, v, gates, s0, rule=rule, boundary=16, impl="reference")
    bf = [x.bfloat16().requires_grad_() for x in (q, k, v)]
    gates_bf = {n: x.bfloat16() for n, x in gates.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o, s = run(*bf, gates_bf, s0.float(), rule=rule, boundary=16, chunk_size=16)
    assert o.dtype == torch.bfloat16
    assert s.dtype == torch.float32
    assert o.shape == (B, T, H, DV) and s.shape == (B, 3, H, DV, DK)
    assert_close(o, o64, 5e-2, "o (bf16 vs float64 reference)")
    assert_close(s, s64, 5e-2, "states (bf16 vs float64 reference)")
    (o.float().sum() + s.sum()).backward()
    for x in bf:
        assert x.grad is not None and x.grad.dtype == torch.bfloat16
        assert torch.isfinite(x.grad.float()).all()


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def _good(rule="gated_delta"):
    q, k, v, gates, s0 = make_inputs(rule, 2, 6, 3, 4, 5, torch.float32, 0)
    return dict(q=q, k=k, v=v, rule=rule, initial_state=s0, **gates)


def _with(rule="gated_delta", **changes):
    kw = _good(rule)
    kw.update(changes)
    return kw


BAD_INPUTS = {
    "q rank 3": ("q", lambda: _with(q=torch.randn(2, 6, 4))),
    "k different T": ("k", lambda: _with(k=torch.randn(2, 7, 3, 4))),
    "v different H": ("v", lambda: _with(v=torch.randn(2, 6, 2, 5))),
    "integer q": ("q", lambda: _with(q=torch.ones(2, 6, 3, 4, dtype=torch.int64))),
    "unknown rule": ("rule", lambda: {**_good("linear"), "rule": "mamba"}),
    "g missing decay": ("g", lambda: _with("decay", g=None)),
    "g missing gated_delta": ("g", lambda: _with("gated_delta", g=None)),
    "g missing swla": ("g", lambda: _with("swla", g=None)),
    "beta missing delta": ("beta", lambda: _with("delta", beta=None)),
    "lam missing swla": ("lam", lambda: _with("swla", lam=None)),
    "g given to linear": ("g", lambda: _with("linear", g=torch.zeros(2, 6, 3))),
    "g wrong shape": ("g", lambda: _with(g=torch.zeros(2, 6))),
    "beta wrong shape": ("beta", lambda: _with(beta=torch.zeros(2, 6, 2))),
    "initial_state wrong shape": (
        "initial_state",
        lambda: _with(initial_state=torch.zeros(2, 3, 4, 5)),
    ),
    "boundary 0": ("boundary", lambda: _with(boundary=0)),
    "boundary bool": ("boundary", lambda: _with(boundary=True)),
    "chunk_size 0": ("chunk_size", lambda: _with(chunk_size=0)),
    "prev_kv non-swla": (
        "prev_kv",
        lambda: _with(prev_kv=(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))),
    ),
    "prev_kv wrong shape": (
        "prev_kv",
        lambda: _with("swla", prev_kv=(torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))),
    ),
    "prev_kv not a pair": (
        "prev_kv",
        lambda: _with("swla", prev_kv=(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), None)),
    ),
    "unknown impl": ("impl", lambda: _with(impl="triton")),
    "no heads": (
        "q",
        lambda: _with(
            q=torch.randn(2, 6, 0, 4), k=torch.randn(2, 6, 0, 4), v=torch.randn(2, 6, 0, 5)
        ),
    ),
    "Dv 0": ("v", lambda: _with(v=torch.randn(2, 6, 3, 0))),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    name, make_kwargs = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=arg(name)):
        call_op(linear_memory, make_kwargs())


@pytest.mark.parametrize("rule", LINEAR_RULES)
@pytest.mark.parametrize("boundary", [None, 4])
def test_empty_batch_gives_empty_outputs_and_states(rule, boundary):
    q, k, v, gates, s0 = make_inputs(rule, 0, 9, H, 5, 4, torch.float64, 0, True)
    o, states = run(q, k, v, gates, s0, rule=rule, boundary=boundary, chunk_size=4)
    assert o.shape == (0, 9, H, 4)
    assert states.shape == ((0, H, 4, 5) if boundary is None else (0, 3, H, 4, 5))
    (o.sum() + states.sum()).backward()
    assert q.grad.shape == q.shape and s0.grad.shape == s0.shape


def test_good_inputs_of_bad_input_table_run():
    kw = _good("swla")
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    o, s = linear_memory(q, k, v, prev_kv=(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)), **kw)
    assert o.shape == (2, 6, 3, 5) and s.shape == (2, 3, 5, 4)


# --------------------------------------------------------------------------------------------
# property test
# --------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    rule=st.sampled_from(LINEAR_RULES),
    T=st.integers(1, 90),
    chunk_size=st.integers(1, 40),
    boundary=st.one_of(st.none(), st.integers(1, 100)),
    Dk=st.integers(1, 9),
    Dv=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_chunk_matches_reference_property(rule, T, chunk_size, boundary, Dk, Dv, seed):
    q, k, v, gates, s0 = make_inputs(rule, 1, T, 2, Dk, Dv, torch.float64, seed)
    o_c, s_c = run(q, k, v, gates, s0, rule=rule, boundary=boundary, chunk_size=chunk_size)
    o_r, s_r = run(q, k, v, gates, s0, rule=rule, boundary=boundary, impl="reference")
    assert s_c.shape == state_shape(T, boundary, 1, 2, Dk, Dv)
    assert_close(o_c, o_r, TOL64, "o")
    assert_close(s_c, s_r, TOL64, "states")


# --------------------------------------------------------------------------------------------
# gradcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["gated_delta", "swla"])
@pytest.mark.parametrize("boundary", [None, 2])
def test_gradcheck(rule, boundary):
    q, k, v, gates, s0 = make_inputs(rule, 1, 5, 2, 3, 2, torch.float64, 31, requires_grad=True)
    names = list(gates)
    extra = []
    if rule == "swla":
        gen = torch.Generator().manual_seed(5)
        extra = [
            torch.randn(1, 2, 3, generator=gen, dtype=torch.float64).requires_grad_(),
            torch.randn(1, 2, 2, generator=gen, dtype=torch.float64).requires_grad_(),
        ]

    def f(q, k, v, s0, *rest):
        g = dict(zip(names, rest[: len(names)], strict=True))
        prev = tuple(rest[len(names) :]) or None
        return linear_memory(
            q, k, v, rule=rule, initial_state=s0, boundary=boundary, chunk_size=2, prev_kv=prev, **g
        )

    assert torch.autograd.gradcheck(f, (q, k, v, s0, *gates.values(), *extra))
