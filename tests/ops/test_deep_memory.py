"""Tests of growmem.ops.deep_memory: the deep (MLP) memories dla and titans.

The mini-batch parallel path (impl="chunk") is checked against the per-token reference
(impl="reference", autograd inner gradients) in float64: outputs, states and gradients. Then
mini_batch=1 against a plain recurrence written here, the read convention (gradients at the
mini-batch's entry weights, token t reads the weights after its own update), boundary states,
continuation, gradcheck, long-sequence stability and autocast, and bad input. Known bugs are
strict xfails at the end.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from growmem.ops import DeepState, deep_memory
from tests.helpers import (
    OpInputs,
    arg,
    assert_close,
    call_op,
    make_op_inputs,
    outputs_and_grads,
    poison_entries,
    rel_err,
)

RULES = ("dla", "titans")
# every (rule, decay_to) pair: dla has no decay
RULE_DECAYS = [("dla", "init"), ("titans", "init"), ("titans", "zero")]
B, H, D, DH = 2, 2, 6, 24
TOL64 = 1e-9
FIELDS = ("W1", "W2", "S1", "S2")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_deep_inputs(
    rule: str,
    T: int,
    *,
    b: int = B,
    h: int = H,
    d: int = D,
    dh: int = DH,
    with_state: bool = False,
    eta_scale: float = 0.3,
    **kw,
) -> OpInputs:
    """Random inputs of deep_memory (``make_op_inputs``: q raw, keys unit-norm, eta ~
    eta_scale U(0, 1), no gate queries); with_state adds an initial DeepState."""
    return make_op_inputs(
        rule, T, b=b, h=h, dk=d, dh=dh, with_state=with_state, eta_scale=eta_scale,
        with_u=False, **kw,
    )  # fmt: skip


def run(inp: OpInputs, **kw):
    """deep_memory on ``inp``: (o, states)."""
    return deep_memory(
        inp.q, inp.k, inp.v, rule=inp.rule, **inp.gates, init_weights=inp.init_weights,
        initial_state=inp.initial_state, **kw,
    )  # fmt: skip


def assert_states_close(a: DeepState, b: DeepState, tol, what):
    assert isinstance(a, DeepState) and isinstance(b, DeepState)
    for name, x, y in zip(FIELDS, a, b, strict=True):
        assert (x is None) == (y is None), f"{what}.{name}: one of the two is None"
        if x is not None:
            assert_close(x, y, tol, f"{what}.{name}")


def check_state_fields(state: DeepState, rule: str, lead: tuple[int, ...], d=D, dh=DH):
    """The fields of a state have shape [*lead, ...]; S1, S2 exist exactly for titans."""
    shapes = {"W1": (d, dh), "W2": (dh, d), "S1": (d, dh), "S2": (dh, d)}
    for name, x in zip(FIELDS, state, strict=True):
        if name in ("S1", "S2") and rule == "dla":
            assert x is None, f"{name} must be None for dla"
        else:
            assert x.shape == (*lead, *shapes[name]), f"{name}: {tuple(x.shape)}"


def run_and_grads(inp: OpInputs, **kw):
    """Run the op, backprop a random linear functional of o and of every state tensor;
    return o, states and the gradients of every leaf (None where unused)."""
    (o, states), grads = outputs_and_grads(lambda: run(inp, **kw), inp.leaves())
    return o, states, grads


# --------------------------------------------------------------------------------------------
# 1. chunk vs reference, float64: outputs, states, gradients
# --------------------------------------------------------------------------------------------

# (T, mini_batch, initial_state given, boundary): T = 1; T < mini_batch; mini_batch dividing T
# or not (a short last mini-batch); with and without initial_state; with boundary states.
CONFIGS = [
    (1, 1, False, None),
    (1, 4, True, None),
    (5, 1, True, None),
    (5, 4, False, None),
    (5, 7, True, None),
    (23, 1, False, None),
    (23, 4, True, 8),
    (23, 7, False, None),
    (23, 7, True, 14),
]


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize(("T", "mini_batch", "with_state", "boundary"), CONFIGS)
def test_chunk_matches_reference_float64(
    rule, decay_to, norm, max_grad_norm, T, mini_batch, with_state, boundary
):
    seed = 100 * T + mini_batch
    kw = dict(mini_batch=mini_batch, norm=norm, max_grad_norm=max_grad_norm, boundary=boundary)
    kw["decay_to"] = decay_to
    results = {}
    for impl in ("chunk", "reference"):
        inp = make_deep_inputs(rule, T, seed=seed, requires_grad=True, with_state=with_state)
        results[impl] = run_and_grads(inp, impl=impl, **kw)
    o_c, s_c, g_c = results["chunk"]
    o_r, s_r, g_r = results["reference"]

    assert o_c.shape == (B, T, H, D) and o_c.dtype == torch.float64
    lead = (B, H) if boundary is None else (B, math.ceil(T / boundary), H)
    check_state_fields(s_c, rule, lead)
    assert s_c.W1.dtype == torch.float64
    assert_close(o_c, o_r, TOL64, "o")
    assert_states_close(s_c, s_r, TOL64, "state")

    expected = {"q", "k", "v", "eta", "init W1", "init W2"}
    if rule == "titans":
        expected |= {"g", "beta"}
    if with_state:
        expected |= {f"initial_state.{f}" for f in FIELDS[: 4 if rule == "titans" else 2]}
    assert set(g_c) == expected
    for name, gr in g_r.items():
        gc = g_c[name]
        if with_state and name.startswith("init ") and (rule, decay_to) != ("titans", "init"):
            # the initial weights are not read when an initial_state is given (titans' decay
            # toward them reads them)
            assert gc is None and gr is None, f"grad {name} should be None"
            continue
        assert gc is not None and gr is not None, f"grad {name} is None"
        # titans from zero momentum with T = 1: β_0 multiplies Σ_{-1} = 0, and a_0 the
        # departure of W_0 from the decay's target W_0 (zero with decay_to="init")
        first_from_init = T == 1 and not with_state
        if not (first_from_init and (name == "beta" or (name, decay_to) == ("g", "init"))):
            assert gr.abs().sum() > 0, f"reference gradient of {name} is zero"
        assert_close(gc, gr, TOL64, f"grad {name}")


def test_max_grad_norm_is_active_in_the_tests():
    """The clamp of the test configurations (0.5) changes the result; a huge one does not."""
    for rule in RULES:
        inp = make_deep_inputs(rule, 23, seed=5)
        o_none, _ = run(inp, mini_batch=4)
        o_clamp, _ = run(inp, mini_batch=4, max_grad_norm=0.5)
        o_huge, _ = run(inp, mini_batch=4, max_grad_norm=1e12)
        assert rel_err(o_clamp, o_none) > 1e-3, rule
        assert_close(o_huge, o_none, 1e-14, f"{rule}: max_grad_norm=1e12 vs None")


def test_initial_state_none_is_init_weights_and_zero_momentum():
    for rule in RULES:
        inp = make_deep_inputs(rule, 11, seed=6)
        o, s = run(inp, mini_batch=4)
        W1, W2 = (w.unsqueeze(0).expand(B, *w.shape).clone() for w in inp.init_weights)
        zeros = (torch.zeros_like(W1), torch.zeros_like(W2)) if rule == "titans" else ()
        o2, s2 = run(
            dataclasses.replace(inp, initial_state=DeepState(W1, W2, *zeros)), mini_batch=4
        )
        assert_close(o2, o, 1e-12, f"{rule}: o")
        assert_states_close(s2, s, 1e-12, f"{rule}: state")


# --------------------------------------------------------------------------------------------
# 2. mini_batch = 1 is the plain per-token recurrence
# --------------------------------------------------------------------------------------------


def plain_recurrence(
    inp: OpInputs, norm: bool, max_grad_norm, eps: float = 1e-5, decay_to: str = "init"
):
    """W_t from W_{t-1} with the gradient at W_{t-1}; o_t = M_{W_t}(q_t). Written from
    docs/design.md §2.4 with torch.autograd for the inner gradient; titans' decay pulls toward
    the initial weights (decay_to="init") or toward zero."""
    titans = inp.rule == "titans"
    Bn, T = inp.q.shape[:2]
    W1_0, W2_0 = inp.init_weights  # [H, D, Dh], [H, Dh, D]

    def memory(x, W1, W2):  # x [B, H, D]; W1 [B, H, D, Dh]; W2 [B, H, Dh, D]
        y = torch.einsum("bhij,bhj->bhi", W1, F.gelu(torch.einsum("bhij,bhj->bhi", W2, x)))
        if norm:
            y = F.layer_norm(y, y.shape[-1:], eps=eps)
        return x + y

    W1 = W1_0.unsqueeze(0).expand(Bn, *W1_0.shape)
    W2 = W2_0.unsqueeze(0).expand(Bn, *W2_0.shape)
    S1, S2 = (torch.zeros_like(W1), torch.zeros_like(W2)) if titans else (None, None)
    outs = []
    for t in range(T):
        k_t, v_t = inp.k[:, t], inp.v[:, t]
        out = memory(k_t, W1, W2)
        loss = (out - v_t).pow(2).sum() if titans else -(out * v_t).sum()
        G1, G2 = torch.autograd.grad(loss, (W1, W2), create_graph=True)
        lr = inp.gates["eta"][:, t]
        if max_grad_norm is not None:
            gnorm = (G1.pow(2).sum((-1, -2)) + G2.pow(2).sum((-1, -2))).sqrt()
            lr = lr * torch.clamp(max_grad_norm / gnorm, max=1.0)
        lr = lr[..., None, None]
        if titans:
            a = inp.gates["g"][:, t].exp()[..., None, None]
            b = inp.gates["beta"][:, t][..., None, None]
            S1, S2 = b * S1 - lr * G1, b * S2 - lr * G2
            if decay_to == "init":
                W1, W2 = W1_0 + a * (W1 - W1_0) + S1, W2_0 + a * (W2 - W2_0) + S2
            else:
                W1, W2 = a * W1 + S1, a * W2 + S2
        else:
            W1, W2 = W1 - lr * G1, W2 - lr * G2
        outs.append(memory(inp.q[:, t], W1, W2))
    return torch.stack(outs, 1), DeepState(W1, W2, S1, S2)


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("impl", ["chunk", "reference"])
def test_mini_batch_one_is_plain_recurrence(rule, decay_to, norm, max_grad_norm, impl):
    T = 9
    inp = make_deep_inputs(rule, T, seed=41, requires_grad=True)
    o_p, s_p = plain_recurrence(inp, norm, max_grad_norm, decay_to=decay_to)
    kw = dict(norm=norm, max_grad_norm=max_grad_norm, decay_to=decay_to, impl=impl)
    o, s = run(inp, mini_batch=1, **kw)
    assert_close(o, o_p, 1e-10, "o")
    assert_states_close(s, s_p, 1e-10, "final state")

    gen = torch.Generator().manual_seed(3)
    w_o = torch.randn(o.shape, generator=gen, dtype=o.dtype)
    w1 = torch.randn(s.W1.shape, generator=gen, dtype=o.dtype)
    w2 = torch.randn(s.W2.shape, generator=gen, dtype=o.dtype)
    named = inp.leaves()
    grads = [
        torch.autograd.grad(
            (out * w_o).sum() + (st.W1 * w1).sum() + (st.W2 * w2).sum(), list(named.values())
        )
        for out, st in ((o, s), (o_p, s_p))
    ]
    for name, ga, gb in zip(named, *grads, strict=True):
        assert gb.abs().sum() > 0, f"gradient of {name} is zero"
        assert_close(ga, gb, 1e-10, f"grad {name}")
    # and the mini-batch form is a different model (the comparison above is not vacuous)
    o4, _ = run(inp, mini_batch=4, **kw)
    assert rel_err(o4, o_p) > 1e-4


# --------------------------------------------------------------------------------------------
# 3. the read convention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("s", [0, 2, 5, 7, 9])
def test_mini_batch_causality(rule, impl, s):
    """Changing k, v (and eta, g, beta) of token s changes o_t for every t >= s (in its own
    mini-batch as well as later ones) and never for t < s; q_s changes o_s only."""
    T, mb = 13, 8  # mini-batches [0, 8) and [8, 13)
    inp = make_deep_inputs(rule, T, seed=7)
    other = make_deep_inputs(rule, T, seed=8)
    o, _ = run(inp, mini_batch=mb, impl=impl)

    def swap(name, x, y):
        if x is None:
            return None
        x = x.clone()
        x[:, s] = y[:, s]
        return x

    gates = {n: swap(n, x, other.gates[n]) for n, x in inp.gates.items()}
    changed = dataclasses.replace(
        inp, k=swap("k", inp.k, other.k), v=swap("v", inp.v, other.v), gates=gates
    )
    o2, _ = run(changed, mini_batch=mb, impl=impl)
    assert torch.equal(o2[:, :s], o[:, :s]) or rel_err(o2[:, :s], o[:, :s]) < 1e-14
    for t in range(s, T):
        assert rel_err(o2[:, t], o[:, t]) > 1e-6, f"o_{t} does not see token {s}"

    o3, _ = run(dataclasses.replace(inp, q=swap("q", inp.q, other.q)), mini_batch=mb, impl=impl)
    assert rel_err(o3[:, s], o[:, s]) > 1e-3
    keep = [t for t in range(T) if t != s]
    assert torch.equal(o3[:, keep], o[:, keep])


def gelu_prime(z):
    """dσ/dz of the exact GELU: Φ(z) + z φ(z)."""
    return torch.special.ndtr(z) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def mini_batch_by_hand(inp: OpInputs, mb: int, decay_to: str = "init"):
    """The mini-batch read convention written out without norm: the inner gradients of a
    mini-batch are all taken at its entry weights W,

        M_W(x) = x + W1 σ(W2 x),  e = dℓ/dM (dla: -v; titans: 2 (M_W(k) - v)),
        ∇_W1 ℓ = e σ(W2 k)^T,     ∇_W2 ℓ = (W1^T e ⊙ σ'(W2 k)) k^T,

    then applied token by token (titans: momentum, and decay toward the initial weights or
    toward zero), and o_t = M_{W_t}(q_t)."""
    titans = inp.rule == "titans"
    Bn, T = inp.q.shape[:2]
    W1_0, W2_0 = inp.init_weights  # [H, D, Dh], [H, Dh, D]
    W1 = W1_0.unsqueeze(0).expand(Bn, *W1_0.shape)
    W2 = W2_0.unsqueeze(0).expand(Bn, *W2_0.shape)
    S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)

    def mv(W, x):
        return torch.einsum("bhij,bhj->bhi", W, x)

    outs = []
    for start in range(0, T, mb):
        E1, E2 = W1, W2  # entry weights of this mini-batch
        for t in range(start, min(start + mb, T)):
            k, v = inp.k[:, t], inp.v[:, t]
            z = mv(E2, k)
            e = 2.0 * (k + mv(E1, F.gelu(z)) - v) if titans else -v
            G1 = e[..., :, None] * F.gelu(z)[..., None, :]
            G2 = (mv(E1.transpose(-1, -2), e) * gelu_prime(z))[..., :, None] * k[..., None, :]
            lr = inp.gates["eta"][:, t][..., None, None]
            if titans:
                a = inp.gates["g"][:, t].exp()[..., None, None]
                b = inp.gates["beta"][:, t][..., None, None]
                S1, S2 = b * S1 - lr * G1, b * S2 - lr * G2
                if decay_to == "init":
                    W1 = W1_0 + a * (W1 - W1_0) + S1
                    W2 = W2_0 + a * (W2 - W2_0) + S2
                else:
                    W1, W2 = a * W1 + S1, a * W2 + S2
            else:
                W1, W2 = W1 - lr * G1, W2 - lr * G2
            q = inp.q[:, t]
            outs.append(q + mv(W1, F.gelu(mv(W2, q))))
    return torch.stack(outs, 1), W1, W2


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize(("T", "mb"), [(12, 12), (12, 4), (10, 4), (10, 1)])
def test_gradients_at_mini_batch_entry_weights(rule, decay_to, impl, T, mb):
    inp = make_deep_inputs(rule, T, seed=19)
    o_hand, W1, W2 = mini_batch_by_hand(inp, mb, decay_to)
    o, s = run(inp, mini_batch=mb, norm=False, impl=impl, decay_to=decay_to)
    assert_close(o, o_hand, 1e-12, "o")
    assert_close(s.W1, W1, 1e-12, "W1")
    assert_close(s.W2, W2, 1e-12, "W2")
    if mb > 1:
        # gradients at the running weights (per-token) give something else
        o_tok, _, _ = mini_batch_by_hand(inp, 1)
        assert rel_err(o, o_tok) > 1e-4


def test_dla_single_mini_batch_closed_form():
    """mini_batch = T, dla, no norm: W_t = W_0 - Σ_{j<=t} η_j ∇ℓ(W_0; k_j, v_j), i.e.
    W1_t = W1_0 + Σ η_j v_j h_j^T and W2_t = W2_0 + Σ η_j (W1_0^T v_j ⊙ σ'(W2_0 k_j)) k_j^T,
    as cumulative sums; o_t = q_t + W1_t σ(W2_t q_t)."""
    T = 9
    inp = make_deep_inputs("dla", T, seed=23)
    W1_0, W2_0 = inp.init_weights  # [H, D, Dh], [H, Dh, D]
    eta = inp.gates["eta"][..., None, None]  # [B, T, H, 1, 1]
    z = torch.einsum("hij,bthj->bthi", W2_0, inp.k)
    u1 = inp.v[..., :, None] * F.gelu(z)[..., None, :]
    back = torch.einsum("hji,bthj->bthi", W1_0, inp.v) * gelu_prime(z)
    u2 = back[..., :, None] * inp.k[..., None, :]
    W1 = W1_0 + torch.cumsum(eta * u1, 1)  # [B, T, H, D, Dh]
    W2 = W2_0 + torch.cumsum(eta * u2, 1)
    hq = F.gelu(torch.einsum("bthij,bthj->bthi", W2, inp.q))
    o_hand = inp.q + torch.einsum("bthij,bthj->bthi", W1, hq)
    for mb in (T, T + 5):  # a mini-batch longer than T is one mini-batch of T
        for impl in ("chunk", "reference"):
            o, s = run(inp, mini_batch=mb, norm=False, impl=impl)
            assert_close(o, o_hand, 1e-12, f"o ({impl}, mini_batch {mb})")
            assert_close(s.W1, W1[:, -1], 1e-12, "W1")
            assert_close(s.W2, W2[:, -1], 1e-12, "W2")
    o1, _ = run(inp, mini_batch=1, norm=False)
    assert rel_err(o1, o_hand) > 1e-4


# --------------------------------------------------------------------------------------------
# 4. boundary states
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize(
    ("T", "mb", "boundary"), [(23, 4, 8), (20, 5, 10), (12, 3, 3), (10, 4, 16), (9, 1, 2)]
)
def test_boundary_states_are_prefix_final_states(rule, impl, T, mb, boundary):
    inp = make_deep_inputs(rule, T, seed=29, with_state=True)
    o_b, states = run(inp, mini_batch=mb, boundary=boundary, impl=impl)
    n = math.ceil(T / boundary)
    check_state_fields(states, rule, (B, n, H))
    o, final = run(inp, mini_batch=mb, impl=impl)
    check_state_fields(final, rule, (B, H))
    assert torch.equal(o_b, o) or rel_err(o_b, o) < 1e-14
    last = states.map(lambda x: x[:, -1])
    assert_states_close(last, final, 1e-12, "last boundary state vs final state")
    for i in range(n):
        t = min((i + 1) * boundary, T)
        _, s_t = run(inp.part(0, t), mini_batch=mb, impl=impl)
        assert_states_close(states.map(lambda x, i=i: x[:, i]), s_t, 1e-12, f"after {t} tokens")
    if n > 1:  # the states differ from one another (the checks are not vacuous)
        assert rel_err(states.W1[:, 0], states.W1[:, -1]) > 1e-3


@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize(("mb", "boundary"), [(4, 6), (4, 2), (3, 1), (5, 7)])
def test_boundary_not_multiple_of_mini_batch_raises(impl, mb, boundary):
    inp = make_deep_inputs("titans", 12, seed=1)
    with pytest.raises(ValueError, match=r"^boundary\b"):
        run(inp, mini_batch=mb, boundary=boundary, impl=impl)


# --------------------------------------------------------------------------------------------
# 5. continuation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("t", [4, 8, 16])
def test_continuation_equals_whole_run(rule, impl, t):
    T, mb = 19, 4
    inp = make_deep_inputs(rule, T, seed=31)
    o_all, s_all = run(inp, mini_batch=mb, impl=impl)
    o1, s1 = run(inp.part(0, t, initial_state=None), mini_batch=mb, impl=impl)
    o2, s2 = run(inp.part(t, T, initial_state=s1), mini_batch=mb, impl=impl)
    assert_close(torch.cat([o1, o2], 1), o_all, 1e-12, "o")
    assert_states_close(s2, s_all, 1e-12, "final state")
    # a split inside a mini-batch moves the mini-batch grid of the second part
    o1, s1 = run(inp.part(0, t - 2, initial_state=None), mini_batch=mb, impl=impl)
    o2, _ = run(inp.part(t - 2, T, initial_state=s1), mini_batch=mb, impl=impl)
    assert rel_err(torch.cat([o1, o2], 1), o_all) > 1e-4


# --------------------------------------------------------------------------------------------
# 6. gradcheck (the outer backward differentiates the closed-form inner gradients)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("max_grad_norm", [None, 0.3])
@pytest.mark.parametrize("with_state", [False, True])
def test_gradcheck(rule, max_grad_norm, with_state):
    inp = make_deep_inputs(
        rule, 4, b=1, h=2, d=3, dh=6, seed=37, requires_grad=True, with_state=with_state
    )
    names = list(inp.leaves())
    if with_state:
        names = [n for n in names if not n.startswith("init ")]

    def f(*xs):
        named = dict(zip(names, xs, strict=True))
        state = None
        if with_state:
            state = DeepState(*(named.get(f"initial_state.{f}") for f in FIELDS))
        o, s = deep_memory(
            named["q"],
            named["k"],
            named["v"],
            rule=rule,
            eta=named["eta"],
            g=named.get("g"),
            beta=named.get("beta"),
            init_weights=(
                named.get("init W1", inp.init_weights[0]),
                named.get("init W2", inp.init_weights[1]),
            ),
            initial_state=state,
            mini_batch=2,
            norm=True,
            max_grad_norm=max_grad_norm,
        )
        return (o, *(x for x in s if x is not None))

    leaves = inp.leaves()
    assert torch.autograd.gradcheck(f, tuple(leaves[n] for n in names))


# --------------------------------------------------------------------------------------------
# 7. long sequences: stability, autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", RULES)
def test_long_sequence_fp32_stable_and_autocast(rule):
    T = 4096
    inp = make_deep_inputs(
        rule, T, b=1, h=1, d=16, dh=64, dtype=torch.float32, seed=43, eta_scale=0.1
    )
    inp.q.requires_grad_()
    kw = dict(mini_batch=64, max_grad_norm=1.0)
    o, s = run(inp, **kw)
    assert o.dtype == torch.float32 and s.W1.dtype == torch.float32
    assert torch.isfinite(o).all()
    for x in s:
        assert x is None or torch.isfinite(x).all()
    # the memory keeps learning: late outputs still differ from q
    assert rel_err(o[:, -64:], inp.q[:, -64:]) > 1e-2
    (grad_q,) = torch.autograd.grad(o.pow(2).mean(), inp.q)
    assert torch.isfinite(grad_q).all() and grad_q.abs().sum() > 0
    # fp32 accumulation over 64 mini-batches stays close to float64
    inp64 = make_deep_inputs(rule, T, b=1, h=1, d=16, dh=64, seed=43, eta_scale=0.1)
    assert_close(o, run(inp64, **kw)[0], 1e-3, "o (fp32 vs float64)")

    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_ac, s_ac = run(inp, **kw)
    assert o_ac.dtype == torch.float32 and s_ac.W1.dtype == torch.float32
    assert torch.isfinite(o_ac).all()
    assert_close(o_ac, o, 1e-4, "o under autocast")
    assert_close(s_ac.W1, s.W1, 1e-4, "W1 under autocast")


def test_bf16_inputs_close_to_float64():
    for rule in RULES:
        inp = make_deep_inputs(rule, 20, seed=47)
        o64, s64 = run(inp, mini_batch=4, impl="reference")
        bf = dataclasses.replace(inp, q=inp.q.bfloat16(), k=inp.k.bfloat16(), v=inp.v.bfloat16())
        o, s = run(bf, mini_batch=4)
        assert o.dtype == torch.bfloat16 and s.W1.dtype == torch.float32
        assert_close(o, o64, 5e-2, f"{rule}: o (bf16 vs float64)")
        assert_close(s.W1, s64.W1, 5e-2, f"{rule}: W1 (bf16 vs float64)")


# --------------------------------------------------------------------------------------------
# 8. bad input
# --------------------------------------------------------------------------------------------


def _good(rule="titans"):
    inp = make_deep_inputs(rule, 6, b=2, h=3, d=4, dh=8, dtype=torch.float32, with_state=True)
    return dict(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        rule=rule,
        eta=inp.gates["eta"],
        g=inp.gates.get("g"),
        beta=inp.gates.get("beta"),
        init_weights=inp.init_weights,
        initial_state=inp.initial_state,
    )


def _with(rule="titans", **changes):
    kw = _good(rule)
    kw.update(changes)
    return kw


def _state(rule="titans", **changes):
    return _good(rule)["initial_state"]._replace(**changes)


BAD_INPUTS = {
    "unknown rule": ("rule", lambda: {**_good("titans"), "rule": "ttt"}),
    "linear rule": ("rule", lambda: {**_good("dla"), "g": None, "beta": None, "rule": "delta"}),
    "Dk != Dv": ("v", lambda: _with(v=torch.randn(2, 6, 3, 5))),
    "eta missing": ("eta", lambda: _with(eta=None)),
    "eta missing dla": ("eta", lambda: _with("dla", eta=None)),
    "eta wrong shape": ("eta", lambda: _with(eta=torch.rand(2, 6, 2))),
    "eta rank 4": ("eta", lambda: _with(eta=torch.rand(2, 6, 3, 1))),
    "g missing titans": ("g", lambda: _with(g=None)),
    "beta missing titans": ("beta", lambda: _with(beta=None)),
    "g wrong shape": ("g", lambda: _with(g=torch.zeros(2, 5, 3))),
    "beta wrong shape": ("beta", lambda: _with(beta=torch.zeros(2, 6))),
    "g given to dla": ("g", lambda: _with("dla", g=torch.zeros(2, 6, 3))),
    "beta given to dla": ("beta", lambda: _with("dla", beta=torch.zeros(2, 6, 3))),
    "init_weights one tensor": ("init_weights", lambda: _with(init_weights=torch.randn(3, 4, 8))),
    "init_weights triple": (
        "init_weights",
        lambda: _with(init_weights=(torch.randn(3, 4, 8), torch.randn(3, 8, 4), None)),
    ),
    "init_weights W1 wrong D": (
        "init_weights",
        lambda: _with(init_weights=(torch.randn(3, 5, 8), torch.randn(3, 8, 4))),
    ),
    "init_weights W2 wrong Dh": (
        "init_weights",
        lambda: _with(init_weights=(torch.randn(3, 4, 8), torch.randn(3, 7, 4))),
    ),
    "init_weights W2 wrong H": (
        "init_weights",
        lambda: _with(init_weights=(torch.randn(3, 4, 8), torch.randn(2, 8, 4))),
    ),
    "init_weights W1 batched": (
        "init_weights",
        lambda: _with(init_weights=(torch.randn(2, 3, 4, 8), torch.randn(3, 8, 4))),
    ),
    "initial_state a tensor": ("initial_state", lambda: _with(initial_state=torch.zeros(2, 3, 4))),
    "initial_state a tuple": (
        "initial_state",
        lambda: _with(initial_state=tuple(_good()["initial_state"])),
    ),
    "initial_state W1 unbatched": (
        "initial_state",
        lambda: _with(initial_state=_state(W1=torch.zeros(3, 4, 8))),
    ),
    "initial_state W2 wrong Dh": (
        "initial_state",
        lambda: _with(initial_state=_state(W2=torch.zeros(2, 3, 7, 4))),
    ),
    "initial_state no momentum titans": (
        "initial_state",
        lambda: _with(initial_state=_state(S1=None, S2=None)),
    ),
    "initial_state half momentum titans": (
        "initial_state",
        lambda: _with(initial_state=_state(S2=None)),
    ),
    "initial_state momentum dla": (
        "initial_state",
        lambda: _with("dla", initial_state=_state("titans")),
    ),
    "mini_batch 0": ("mini_batch", lambda: _with(mini_batch=0)),
    "mini_batch float": ("mini_batch", lambda: _with(mini_batch=4.0)),
    "boundary 0": ("boundary", lambda: _with(boundary=0)),
    "max_grad_norm 0": ("max_grad_norm", lambda: _with(max_grad_norm=0)),
    "max_grad_norm negative": ("max_grad_norm", lambda: _with(max_grad_norm=-1.0)),
    "max_grad_norm inf": ("max_grad_norm", lambda: _with(max_grad_norm=math.inf)),
    "max_grad_norm bool": ("max_grad_norm", lambda: _with(max_grad_norm=True)),
    "eps 0": ("eps", lambda: _with(eps=0.0)),
    "eps negative": ("eps", lambda: _with(eps=-1e-5)),
    "eps nan": ("eps", lambda: _with(eps=math.nan)),
    "eps inf": ("eps", lambda: _with(eps=math.inf)),
    "eps string": ("eps", lambda: _with(eps="1e-5")),
    "eps None": ("eps", lambda: _with(eps=None)),
    "eps bool": ("eps", lambda: _with(eps=True)),
    "eps tensor": ("eps", lambda: _with(eps=torch.tensor(1e-5))),
    "unknown decay_to": ("decay_to", lambda: _with(decay_to="one")),
    "decay_to None": ("decay_to", lambda: _with("dla", g=None, beta=None, decay_to=None)),
    "unknown impl": ("impl", lambda: _with(impl="triton")),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    name, make_kwargs = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=arg(name)):
        call_op(deep_memory, make_kwargs())


@pytest.mark.parametrize("rule", RULES)
def test_good_inputs_of_bad_input_table_run(rule):
    kw = _good(rule)
    if rule == "dla":
        kw.update(g=None, beta=None, initial_state=_state(S1=None, S2=None))
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    o, s = deep_memory(q, k, v, mini_batch=4, boundary=4, max_grad_norm=1, **kw)
    assert o.shape == (2, 6, 3, 4)
    check_state_fields(s, rule, (2, 2, 3), d=4, dh=8)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("boundary", [None, 4])
def test_empty_batch_gives_empty_outputs_and_states(rule, impl, boundary):
    inp = make_deep_inputs(rule, 10, b=0, requires_grad=True)
    o, s = run(inp, mini_batch=4, boundary=boundary, impl=impl)
    assert o.shape == (0, 10, H, D)
    check_state_fields(s, rule, (0, H) if boundary is None else (0, 3, H))
    o.sum().backward()  # the graph holds: the initial weights get a (zero) gradient
    assert inp.init_weights[0].grad is not None and inp.init_weights[0].grad.abs().sum() == 0


# --------------------------------------------------------------------------------------------
# initial-state fields, momentum floor
# --------------------------------------------------------------------------------------------

UNCHECKED_STATES = {
    "S1 unbatched": lambda: _state(S1=torch.zeros(3, 4, 8)),
    "S2 batch 1": lambda: _state(S2=torch.zeros(1, 3, 8, 4)),
    "S1 wrong Dh": lambda: _state(S1=torch.zeros(2, 3, 4, 7)),
    "W1 not a tensor": lambda: _state(W1=[[0.0]]),
}


@pytest.mark.parametrize("case", list(UNCHECKED_STATES))
def test_bad_initial_state_fields_raise_value_error(case):
    kwargs = _with(initial_state=UNCHECKED_STATES[case]())
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(ValueError, match=r"^initial_state\b"):
        deep_memory(q, k, v, **kwargs)


def test_titans_zero_beta_is_the_documented_floor_in_both_paths():
    """β = 0 acts as β = 1e-30 in both paths (log-space momentum): same outputs and
    gradients, and no gradient reaches the floored β."""
    grads = {}
    for impl in ("chunk", "reference"):
        inp = make_deep_inputs("titans", 6, seed=53, with_state=True)
        beta = inp.gates["beta"].clone()
        beta[:, 1] = 0.0
        inp = dataclasses.replace(inp, gates={**inp.gates, "beta": beta.requires_grad_()})
        o, _ = run(inp, mini_batch=4, impl=impl)
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=o.dtype)
        (grads[impl],) = torch.autograd.grad((o * w).sum(), inp.gates["beta"])
    assert grads["reference"][:, 1].abs().sum() == 0
    assert grads["reference"].abs().sum() > 0
    assert_close(grads["chunk"], grads["reference"], TOL64, "grad beta")


@pytest.mark.parametrize(
    ("name", "value"), [("beta", -0.5), ("beta", 1.5), ("eta", -0.1), ("eta", -1e-30)]
)
def test_gate_values_out_of_range_raise(name, value):
    inp = make_deep_inputs("titans", 6, seed=1)
    bad = inp.gates[name].detach().clone()
    bad[:, 2] = value
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        run(dataclasses.replace(inp, gates={**inp.gates, name: bad}), mini_batch=4)


# --------------------------------------------------------------------------------------------
# 9. non-finite inputs stay causal
# --------------------------------------------------------------------------------------------

HEAD = 1  # the head that receives the non-finite entries


def earlier_grads(inp: OpInputs, s: int, **kw):
    """Output, states, and the gradients of the inputs of a loss on the outputs before s."""
    o, states = run(inp, **kw)
    w = torch.randn(o[:, :s].shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    named = {n: x for n, x in inp.leaves().items() if not n.startswith("init")}
    grads = torch.autograd.grad((o[:, :s] * w).sum(), list(named.values()), allow_unused=True)
    return o.detach(), states, dict(zip(named, grads, strict=True))


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("mb", [3, 8])  # blocks of mini-batches; one block per mini-batch
@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_non_finite_input_reaches_no_earlier_output(rule, decay_to, impl, mb, value):
    """A NaN or inf at token s (batch row i: in input i, head HEAD) leaves every earlier
    output, state and gradient of a loss on earlier outputs as in the clean run, and the other
    head untouched; a non-finite write makes the head's outputs and states NaN from s on, a
    non-finite query only its own output."""
    T, s = 13, 6  # s inside a mini-batch for both mini-batch sizes
    names = ["q", "k", "v", "eta"] + (["g", "beta"] if rule == "titans" else [])
    kw = dict(mini_batch=mb, boundary=mb, decay_to=decay_to, max_grad_norm=1.0, impl=impl)
    clean = make_deep_inputs(rule, T, b=len(names), seed=61, requires_grad=True)
    o_c, states_c, grads_c = earlier_grads(clean, s, **kw)
    o, states, grads = earlier_grads(poison_entries(clean, names, s, HEAD, value), s, **kw)
    assert torch.equal(o[:, :s], o_c[:, :s]), "an earlier output changed"
    other = 1 - HEAD
    assert torch.equal(o[:, :, other], o_c[:, :, other]), "the other head changed"
    after = torch.tensor(list(range(mb, T + 1, mb)) + ([T] if T % mb else [])) > s
    for row, name in enumerate(names):
        if name == "q":  # a read: only its own output
            assert o[row, s, HEAD].isnan().all()
            keep = [t for t in range(T) if t != s]
            assert torch.equal(o[row, keep, HEAD], o_c[row, keep, HEAD])
        else:
            assert o[row, s:, HEAD].isnan().all(), f"{name}: a later output is not NaN"
        for field, x, x_c in zip(FIELDS, states, states_c, strict=True):
            if x is None:
                continue
            assert torch.equal(x[:, :, other], x_c[:, :, other]), f"{field} of the other head"
            if name == "q":
                assert torch.equal(x[row, :, HEAD], x_c[row, :, HEAD]), f"{name}: {field}"
            else:
                assert x[row, after, HEAD].isnan().all(), f"{name}: {field} after s is finite"
            before = x[row, ~after, HEAD], x_c[row, ~after, HEAD]
            assert torch.equal(*before), f"{name}: {field} before s changed"
    for n, grad in grads.items():
        assert torch.isfinite(grad).all(), f"gradient of {n} is not finite"
        assert_close(grad, grads_c[n], 1e-12, f"gradient of {n}")
