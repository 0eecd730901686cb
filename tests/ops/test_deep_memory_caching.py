"""Tests of growmem.ops.memory_caching over the deep memories (dla, titans).

The fast path (per-piece mini-batch scans, cached MLP reads, routed ssc, Memory Soup inside the
scan) is checked against the per-token reference (impl="reference", autograd inner gradients)
in float64: outputs and gradients. Then the identities of DESIGN.md section 3 on deep memories
(one segment = none, soup != grm, ssc with k >= N = grm, none = deep_memory), causality,
streaming == parallel (with mini-batches left open between calls), bad input, the cache's size
and batch reordering, and a long-sequence stability smoke test.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re

import pytest
import torch
import torch.nn.functional as F

from growmem.ops import DeepState, deep_memory, log_segments, memory_caching
from growmem.ops.caching.cache import DeepMemoryCache
from tests.helpers import aggregation_inits, rel_err

RULES = ("dla", "titans")
AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc", "loglinear", "mean")
GATED = ("grm", "soup", "ssc", "loglinear")
INITS = ("continuous", "independent")
B, H, D, EXPANSION = 2, 2, 5, 4
DH = EXPANSION * D
TOL64 = 1e-9
FIELDS = ("W1", "W2", "S1", "S2")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """One set of inputs of memory_caching with a deep rule (float64 unless told)."""

    rule: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    eta: torch.Tensor
    g: torch.Tensor | None
    beta: torch.Tensor | None
    W1: torch.Tensor  # init_weights[0] [H, D, Dh]
    W2: torch.Tensor  # init_weights[1] [H, Dh, D]
    state: DeepState | None = None

    @property
    def T(self) -> int:
        return self.q.shape[1]

    def leaves(self) -> dict:
        """Named differentiable inputs (None entries dropped), in a fixed order."""
        named = {
            "q": self.q,
            "k": self.k,
            "v": self.v,
            "u": self.u,
            "eta": self.eta,
            "g": self.g,
            "beta": self.beta,
            "init W1": self.W1,
            "init W2": self.W2,
        }
        if self.state is not None:
            named.update({f"initial_state.{f}": x for f, x in zip(FIELDS, self.state, strict=True)})
        return {n: x for n, x in named.items() if x is not None}

    def part(self, a: int, b: int) -> Inputs:
        """Tokens a..b-1 (initial weights and initial state kept)."""

        def cut(x):
            return None if x is None else x[:, a:b]

        return dataclasses.replace(
            self, **{n: cut(getattr(self, n)) for n in ("q", "k", "v", "u", "eta", "g", "beta")}
        )

    def rows(self, index: torch.Tensor) -> Inputs:
        """Batch rows ``index`` (initial weights shared, initial state selected)."""

        def pick(x):
            return None if x is None else x[index]

        return dataclasses.replace(
            self,
            **{n: pick(getattr(self, n)) for n in ("q", "k", "v", "u", "eta", "g", "beta")},
            state=None if self.state is None else self.state.map(pick),
        )

    def run(self, *, with_state: bool = True, **kw):
        """memory_caching on these inputs; ``with_state`` passes initial_state."""
        kw.setdefault("max_grad_norm", 1.0)
        return memory_caching(
            self.q,
            self.k,
            self.v,
            self.u,
            rule=self.rule,
            eta=self.eta,
            g=self.g,
            beta=self.beta,
            init_weights=(self.W1, self.W2),
            initial_state=self.state if with_state else None,
            **kw,
        )

    def deep(self, state="own", **kw):
        """deep_memory on these inputs (no caching): (o, final state)."""
        kw.setdefault("max_grad_norm", 1.0)
        return deep_memory(
            self.q,
            self.k,
            self.v,
            rule=self.rule,
            eta=self.eta,
            g=self.g,
            beta=self.beta,
            init_weights=(self.W1, self.W2),
            initial_state=self.state if state == "own" else state,
            **kw,
        )


def make(
    rule: str,
    T: int,
    *,
    seed: int = 0,
    b: int = B,
    h: int = H,
    d: int = D,
    dh: int = DH,
    normalize: bool = True,
    with_state: bool = False,
    requires_grad: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Inputs:
    """Random inputs: q, k unit-norm (or not), v and gate queries u ~ N(0, 1) (u scaled by 2
    so the gates are far from uniform), eta ~ 0.5 U(0, 1), titans g ~ -0.2 U(0, 1) and
    beta ~ U(0, 1), initial weights ~ 0.3 N(0, 1); with_state adds a DeepState near them (with
    random momentum for titans). All tensors are leaves."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    titans = rule == "titans"
    q, k = randn(b, T, h, d), randn(b, T, h, d)
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = randn(b, T, h, d)
    u = 2.0 * randn(b, T, h, d)
    eta = 0.5 * rand(b, T, h)
    g = -0.2 * rand(b, T, h) if titans else None
    beta = rand(b, T, h) if titans else None
    W1 = 0.3 * randn(h, d, dh)
    W2 = 0.3 * randn(h, dh, d)
    state = None
    if with_state:
        state = DeepState(
            W1 + 0.1 * randn(b, h, d, dh),
            W2 + 0.1 * randn(b, h, dh, d),
            0.1 * randn(b, h, d, dh) if titans else None,
            0.1 * randn(b, h, dh, d) if titans else None,
        )

    def leaf(x):
        return None if x is None else x.to(dtype).detach().requires_grad_(requires_grad)

    if state is not None:
        state = state.map(leaf)
    return Inputs(rule, *(leaf(x) for x in (q, k, v, u, eta, g, beta, W1, W2)), state)


def mix(a: Inputs, c: Inputs, t0: int) -> Inputs:
    """Tokens < t0 of a, tokens >= t0 of c (initial weights and state of a)."""

    def cat(x, y):
        return None if x is None else torch.cat([x[:, :t0], y[:, t0:]], dim=1)

    names = ("q", "k", "v", "u", "eta", "g", "beta")
    return dataclasses.replace(a, **{n: cat(getattr(a, n), getattr(c, n)) for n in names})


def assert_close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < tol, f"{what}: rel err {err:.3e} >= {tol:.0e}"


def assert_states_close(a: DeepState, b: DeepState, tol, what, fields=FIELDS):
    for name, x, y in zip(FIELDS, a, b, strict=True):
        if name not in fields:
            continue
        assert (x is None) == (y is None), f"{what}.{name}: one of the two is None"
        if x is not None:
            assert_close(x, y, tol, f"{what}.{name}")


def segment_lengths(T: int, segment_size=None, segments=None) -> list[int]:
    """The segment lengths a plan gives T tokens."""
    if segments == "log":
        return log_segments(T)
    if segments is not None:
        return list(segments)
    return [segment_size] * (T // segment_size) + ([T % segment_size] if T % segment_size else [])


def seg_kwargs(kw: dict) -> dict:
    return {n: kw[n] for n in ("segment_size", "segments") if n in kw}


def output_and_grads(inp: Inputs, w_seed: int = 123, **kw):
    """Output and gradients of a random linear functional of it (None for unused inputs)."""
    o = inp.run(**kw)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(w_seed), dtype=o.dtype)
    named = inp.leaves()
    grads = torch.autograd.grad((o * w).sum(), list(named.values()), allow_unused=True)
    return o.detach(), dict(zip(named, grads, strict=True))


def check_fast_vs_reference(inp: Inputs, aggregation: str, **kw):
    """Fast path == reference: output and every gradient, float64."""
    o_f, g_f = output_and_grads(inp, aggregation=aggregation, **kw)
    o_r, g_r = output_and_grads(inp, aggregation=aggregation, impl="reference", **kw)
    assert o_f.shape == inp.q.shape and o_f.dtype == torch.float64
    assert torch.isfinite(o_r).all()
    assert_close(o_f, o_r, TOL64, "o")
    expected = {"q", "k", "v", "u", "eta", "init W1", "init W2"}
    if inp.rule == "titans":
        expected |= {"g", "beta"}
    if inp.state is not None:
        expected |= {f"initial_state.{f}" for f in FIELDS[: 4 if inp.rule == "titans" else 2]}
    assert set(g_f) == set(g_r) == expected
    for name, gr in g_r.items():
        gf = g_f[name]
        if gr is None:
            assert gf is None or not gf.any(), f"grad {name}: the reference does not use it"
        else:
            assert gf is not None, f"grad {name} is None, the reference's is not"
            assert_close(gf, gr, TOL64, f"grad {name}")
    for name in ("q", "k", "v", "eta"):  # the comparisons above are not vacuous
        assert g_r[name].abs().sum() > 0, f"reference gradient of {name} is zero"
    n_seg = len(segment_lengths(inp.T, **seg_kwargs(kw)))
    if aggregation in GATED and n_seg > 1:
        assert g_r["u"] is not None and g_r["u"].abs().sum() > 0
    if aggregation not in GATED:
        assert g_r["u"] is None
    return o_r


# --------------------------------------------------------------------------------------------
# 1. fast path vs per-token reference, float64, outputs + gradients
# --------------------------------------------------------------------------------------------

# size 8 / mini_batch 4: the grid of every segment is deep_memory's; [7, 12, 10] / 3: the grid
# restarts mid-way (mini-batches 3 3 1 | 3 3 3 3 | 3 3 3 1).
LAYOUTS = {
    "size8-mb4": dict(segment_size=8, mini_batch=4),
    "list-mb3": dict(segments=[7, 12, 10], mini_batch=3),
}
T_MAIN = 29


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", RULES)
def test_fast_matches_reference(rule, aggregation, init, layout):
    seed = 17 * RULES.index(rule) + 3 * AGGREGATIONS.index(aggregation) + len(layout)
    inp = make(rule, T_MAIN, seed=seed, requires_grad=True)
    check_fast_vs_reference(inp, aggregation, init=init, **LAYOUTS[layout])


def _case(rule, aggregation, init, T, normalize=True, with_state=False, **kw):
    name = f"{rule}-{aggregation}-{init}-T{T}-" + "-".join(
        f"{k}{v}".replace(" ", "") for k, v in kw.items()
    )
    name += ("" if normalize else "-raw") + ("-s0" if with_state else "")
    return pytest.param(rule, aggregation, init, T, normalize, with_state, kw, id=name)


EXTRA_CASES = [
    # logarithmic segments: 29 -> [16, 8, 4, 1]
    *(
        _case(rule, agg, init, 29, segments="log", mini_batch=mb)
        for rule, agg, init, mb in [
            ("dla", "grm", "continuous", 4),
            ("titans", "soup", "independent", 4),
            ("titans", "ssc", "continuous", 3),
            ("dla", "soup", "continuous", 3),
            ("titans", "residual", "independent", 3),
            ("dla", "mean", "independent", 4),
        ]
    ),
    # summary = sum
    _case("titans", "grm", "continuous", 29, summary="sum", segment_size=8, mini_batch=4),
    _case("dla", "soup", "independent", 29, summary="sum", segments=[7, 12, 10], mini_batch=3),
    _case("titans", "ssc", "independent", 29, summary="sum", segment_size=8, mini_batch=4),
    # ssc top_k 1 and 3 over up to 7 caches
    *(
        _case(rule, "ssc", init, 29, top_k=top_k, segment_size=4, mini_batch=mb)
        for rule, mb in (("dla", 4), ("titans", 3))
        for top_k in (1, 3)
        for init in INITS
    ),
    _case("titans", "ssc", "continuous", 29, top_k=3, segments=[3, 1, 9, 2, 6, 8], mini_batch=2),
    # loglinear over up to 9 caches (buckets of 8 and 1), sum summaries
    _case("dla", "loglinear", "continuous", 31, segment_size=3, mini_batch=2),
    _case("titans", "loglinear", "continuous", 31, summary="sum", segment_size=3, mini_batch=3),
    # norm=False
    *(
        _case(rule, agg, init, 29, norm=False, segments=[7, 12, 10], mini_batch=3)
        for rule, agg, init in [
            ("dla", "grm", "continuous"),
            ("titans", "soup", "continuous"),
            ("titans", "ssc", "independent"),
            ("dla", "residual", "independent"),
            ("titans", "mean", "continuous"),
            ("dla", "soup", "independent"),
        ]
    ),
    # q, k not normalised
    _case("titans", "soup", "continuous", 29, False, segment_size=8, mini_batch=4),
    _case("dla", "grm", "independent", 29, False, segments=[7, 12, 10], mini_batch=3),
    _case("titans", "ssc", "continuous", 29, False, top_k=1, segment_size=8, mini_batch=3),
    # no clamp of the inner gradients
    _case("titans", "soup", "continuous", 29, max_grad_norm=None, segment_size=8, mini_batch=4),
    _case("dla", "grm", "independent", 29, max_grad_norm=None, segments=[7, 12, 10], mini_batch=3),
    # an initial state
    _case("titans", "soup", "independent", 29, with_state=True, segments=[7, 12, 10], mini_batch=3),
    _case("dla", "grm", "continuous", 29, with_state=True, segment_size=8, mini_batch=4),
    _case("titans", "ssc", "independent", 29, with_state=True, segment_size=8, mini_batch=3),
    _case("dla", "mean", "independent", 29, with_state=True, segments=[7, 12, 10], mini_batch=3),
    # mini_batch 1 (the plain recurrence), mini-batches longer than the segments
    _case("titans", "soup", "continuous", 20, segments=[7, 5, 8], mini_batch=1),
    _case("dla", "ssc", "independent", 20, segment_size=6, mini_batch=1),
    _case("titans", "grm", "continuous", 29, segment_size=8, mini_batch=16),
    _case("dla", "soup", "independent", 29, segments=[7, 12, 10], mini_batch=5),
    # one token per segment; one segment longer than the sequence; a single token
    _case("titans", "grm", "continuous", 10, segment_size=1, mini_batch=4),
    _case("dla", "soup", "independent", 10, segment_size=1, mini_batch=4),
    _case("titans", "ssc", "independent", 10, segment_size=1, mini_batch=4, top_k=2),
    _case("titans", "soup", "continuous", 13, segment_size=64, mini_batch=4),
    _case("dla", "grm", "continuous", 1, segment_size=8, mini_batch=4),
    _case("titans", "soup", "independent", 1, segments=[1], mini_batch=3),
    # gate_scale
    _case("titans", "soup", "continuous", 29, gate_scale=0.7, segment_size=8, mini_batch=4),
    # titans' decay toward zero (the default pulls toward the initial weights)
    *(
        _case("titans", agg, init, 29, decay_to="zero", segments=[7, 12, 10], mini_batch=3, **kw)
        for agg, init, kw in [
            ("none", "continuous", {}),
            ("grm", "independent", {}),
            ("soup", "continuous", {}),
            ("ssc", "continuous", {"with_state": True}),
            ("mean", "independent", {"norm": False}),
        ]
    ),
]


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "T", "normalize", "with_state", "kw"), EXTRA_CASES
)
def test_fast_matches_reference_more(rule, aggregation, init, T, normalize, with_state, kw):
    inp = make(rule, T, seed=T + 7, normalize=normalize, with_state=with_state, requires_grad=True)
    check_fast_vs_reference(inp, aggregation, init=init, **kw)


@pytest.mark.parametrize("aggregation", ["grm", "soup", "ssc"])
def test_float32_fast_matches_float64_reference(aggregation):
    inp = make("titans", 40, seed=8, d=8, dh=32)
    kw = dict(aggregation=aggregation, segments=[11, 16, 13], mini_batch=4)
    o_r = inp.run(impl="reference", **kw)
    inp32 = dataclasses.replace(
        inp,
        **{
            n: getattr(inp, n).float() for n in ("q", "k", "v", "u", "eta", "g", "beta", "W1", "W2")
        },
    )
    o = inp32.run(**kw)
    assert o.dtype == torch.float32
    assert_close(o, o_r, 1e-4, "o")


# --------------------------------------------------------------------------------------------
# 2. identities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seg", [dict(segment_size=29), dict(segment_size=64), dict(segments=[29])])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_one_segment_every_aggregation_equals_none(rule, init, seg):
    inp = make(rule, 29, seed=1)
    base = inp.run(aggregation="none", init=init, mini_batch=4, **seg)
    for aggregation in (a for a, i in aggregation_inits(AGGREGATIONS[1:]) if i == init):
        o = inp.run(aggregation=aggregation, init=init, mini_batch=4, **seg)
        assert_close(o, base, 1e-12, f"{aggregation} with one segment")
    # two segments: the aggregations are no longer the plain RNN (the check is not vacuous)
    for aggregation in (a for a, i in aggregation_inits(AGGREGATIONS[1:]) if i == init):
        o2 = inp.run(aggregation=aggregation, init=init, segment_size=16, mini_batch=4)
        assert rel_err(o2, base) > 1e-3, aggregation


@pytest.mark.parametrize(
    "seg",
    [dict(segment_size=8, mini_batch=4), dict(segments=[7, 12, 10], mini_batch=3)],
    ids=["size8-mb4", "list-mb3"],
)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_soup_differs_from_grm_on_deep_memories(rule, init, seg):
    """Memory Soup mixes the MLPs' parameters; GRM mixes their outputs. On an MLP memory the
    two are different models (unlike on matrix memories)."""
    inp = make(rule, 29, seed=2)
    kw = dict(init=init, **seg)
    grm, soup = (inp.run(aggregation=a, **kw) for a in ("grm", "soup"))
    assert rel_err(soup, grm) > 1e-3
    # tokens of the first segment see no cache: there the two agree
    first = segment_lengths(29, **seg_kwargs(seg))[0]
    assert_close(soup[:, :first], grm[:, :first], 1e-12, "first segment")
    grm_r, soup_r = (inp.run(aggregation=a, impl="reference", **kw) for a in ("grm", "soup"))
    assert rel_err(soup_r, grm_r) > 1e-3
    assert_close(soup, soup_r, TOL64, "soup vs reference")


def test_soup_equals_grm_when_all_memories_are_equal():
    """With all-equal cached and online weights (eta = 0, continuous: every memory is the
    initial MLP) the parameter mix is that MLP, so soup = grm = none."""
    inp = make("dla", 29, seed=3)
    inp.eta = torch.zeros_like(inp.eta)
    kw = dict(init="continuous", segment_size=8, mini_batch=4)
    none = inp.run(aggregation="none", **kw)
    assert_close(inp.run(aggregation="soup", **kw), none, 1e-12, "soup")
    assert_close(inp.run(aggregation="grm", **kw), none, 1e-12, "grm")


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_ssc_with_top_k_at_least_segments_equals_grm(rule, init):
    inp = make(rule, 29, seed=3, requires_grad=True)
    kw = dict(init=init, segment_size=8, mini_batch=4)  # 4 segments, at most 3 cached
    o_grm, g_grm = output_and_grads(inp, aggregation="grm", **kw)
    for top_k in (3, 4, 9):
        o, g = output_and_grads(inp, aggregation="ssc", top_k=top_k, **kw)
        assert_close(o, o_grm, 1e-12, f"ssc top_k={top_k} vs grm")
        for name, gr in g_grm.items():
            assert_close(g[name], gr, 1e-10, f"grad {name}, ssc top_k={top_k} vs grm")
    o1 = inp.run(aggregation="ssc", top_k=1, **kw)
    assert rel_err(o1, o_grm) > 1e-4  # routing to fewer caches changes the output


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_mean_is_residual_over_segment_count(rule, init):
    inp = make(rule, 29, seed=4)
    kw = dict(init=init, segments=[7, 12, 10], mini_batch=3)
    res, mean = (inp.run(aggregation=a, **kw) for a in ("residual", "mean"))
    count = torch.tensor([1] * 7 + [2] * 12 + [3] * 10, dtype=res.dtype)[None, :, None, None]
    assert_close(mean * count, res, 1e-12, "mean * (cached + 1) vs residual")
    assert rel_err(mean, res) > 1e-2


ALIGNED = {
    "size8-mb4": dict(segment_size=8, mini_batch=4),
    "size12-mb4": dict(segment_size=12, mini_batch=4),
    "size8-mb8": dict(segment_size=8, mini_batch=8),
    "list-mb4": dict(segments=[8, 4, 12, 5], mini_batch=4),
    "log-mb4": dict(segments="log", mini_batch=4),
    "list-mb1": dict(segments=[7, 12, 10], mini_batch=1),
}


@pytest.mark.parametrize("seg", list(ALIGNED))
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_none_continuous_equals_deep_memory(rule, with_state, seg):
    """Segment lengths that are multiples of mini_batch keep deep_memory's grid."""
    kw = ALIGNED[seg]
    inp = make(rule, 29, seed=5, with_state=with_state, requires_grad=True)
    o = inp.run(aggregation="none", init="continuous", **kw)
    o_deep, _ = inp.deep(mini_batch=kw["mini_batch"])
    assert_close(o, o_deep, 1e-12, "o")
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=o.dtype)
    named = inp.leaves()
    g1 = torch.autograd.grad((o * w).sum(), list(named.values()), allow_unused=True)
    g2 = torch.autograd.grad((o_deep * w).sum(), list(named.values()), allow_unused=True)
    for name, a, b in zip(named, g1, g2, strict=True):
        if b is None:
            assert a is None or not a.any(), name
        else:
            assert_close(a, b, 1e-10, f"grad {name}")


@pytest.mark.parametrize("rule", RULES)
def test_mini_batch_grid_restarts_at_segment_starts(rule):
    """With segments [6, 23] and mini_batch 4 the grid is 4 2 | 4 4 4 4 4 3: the second segment
    is deep_memory from the first one's final weights, not deep_memory's grid 4 4 4 ..."""
    inp = make(rule, 29, seed=6, with_state=True)
    o = inp.run(aggregation="none", init="continuous", segments=[6, 23], mini_batch=4)
    o1, s1 = inp.part(0, 6).deep(mini_batch=4)
    o2, _ = inp.part(6, 29).deep(state=s1, mini_batch=4)
    assert_close(o, torch.cat([o1, o2], 1), 1e-12, "o")
    o_deep, _ = inp.deep(mini_batch=4)
    assert_close(o[:, :4], o_deep[:, :4], 1e-12, "first mini-batch")
    assert rel_err(o[:, 6:], o_deep[:, 6:]) > 1e-4  # another grid, another model


@pytest.mark.parametrize("seg", ["size8-mb4", "list-mb3"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_none_independent_is_deep_memory_per_segment(rule, with_state, seg):
    kw = LAYOUTS[seg]
    inp = make(rule, 29, seed=7, with_state=with_state)
    o = inp.run(aggregation="none", init="independent", **kw)
    bounds = [0, *itertools.accumulate(segment_lengths(29, **seg_kwargs(kw)))]
    for a, b in itertools.pairwise(bounds):
        o_seg, _ = inp.part(a, b).deep(mini_batch=kw["mini_batch"])
        assert_close(o[:, a:b], o_seg, 1e-12, f"segment {a}:{b}")
    o_cont = inp.run(aggregation="none", init="continuous", **kw)
    assert rel_err(o[:, 8:], o_cont[:, 8:]) > 1e-3  # the check is not vacuous


def expected_segment_states(inp: Inputs, init: str, lengths: list[int], mini_batch: int):
    """Final DeepState of every segment, from deep_memory run segment by segment."""
    states, state, start = [], inp.state, 0
    for n in lengths:
        first = inp.state if init == "independent" else state
        _, state = inp.part(start, start + n).deep(state=first, mini_batch=mini_batch)
        states.append(state)
        start += n
    return states


@pytest.mark.parametrize("seg", ["size8-mb4", "list-mb3"])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_cache_holds_segment_end_weights_and_summaries(rule, init, seg):
    kw = LAYOUTS[seg]
    inp = make(rule, 29, seed=8, with_state=True)
    lengths = segment_lengths(29, **seg_kwargs(kw))
    for summary in ("mean", "sum"):
        _, cache = inp.run(aggregation="grm", init=init, summary=summary, output_cache=True, **kw)
        assert isinstance(cache, DeepMemoryCache)
        expected = expected_segment_states(inp, init, lengths, kw["mini_batch"])
        N = len(lengths) - 1
        assert cache.num_cached == N
        assert cache.states.W1.shape == (B, H, N, D, DH)
        assert cache.states.W2.shape == (B, H, N, DH, D)
        for i in range(N):
            assert_close(cache.states.W1[:, :, i], expected[i].W1, 1e-12, f"cached W1 {i}")
            assert_close(cache.states.W2[:, :, i], expected[i].W2, 1e-12, f"cached W2 {i}")
        assert_states_close(cache.last_state, expected[-1], 1e-12, "last state")
        bounds = [0, *itertools.accumulate(lengths)]
        for i, (a, b) in enumerate(itertools.pairwise(bounds[:-1])):
            c = inp.k[:, a:b].sum(1) / (b - a if summary == "mean" else 1)  # [B, H, D]
            assert_close(cache.summaries[:, :, i], c, 1e-12, f"summary {i}")


# --------------------------------------------------------------------------------------------
# 3. causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", RULES)
def test_future_tokens_do_not_change_past_outputs(rule, aggregation, init):
    T = 29
    inp, other = make(rule, T, seed=9), make(rule, T, seed=10)
    for layout in LAYOUTS.values():
        kw = dict(aggregation=aggregation, init=init, top_k=1, **layout)
        o = inp.run(**kw)
        # mid-mini-batch, at segment starts, right after one, at a mini-batch start
        for t0 in (5, 7, 8, 13, 16, 17, 19, 22, 27):
            o_mix = mix(inp, other, t0).run(**kw)
            past, now = o_mix[:, :t0], o[:, :t0]
            assert torch.equal(past, now) or rel_err(past, now) < 1e-12, f"{layout}, t0={t0}"
            assert rel_err(o_mix[:, t0:], o[:, t0:]) > 1e-3


@pytest.mark.parametrize("aggregation", GATED)
def test_gate_queries_of_one_token_change_only_its_output(aggregation):
    inp = make("titans", 29, seed=11)
    kw = dict(aggregation=aggregation, segments=[7, 12, 10], mini_batch=3, top_k=1)
    o = inp.run(**kw)
    s = 20
    u = inp.u.clone()
    u[:, s] = -3.0 * u[:, s]
    o2 = dataclasses.replace(inp, u=u).run(**kw)
    keep = [t for t in range(29) if t != s]
    # (ssc groups tokens by selected cache: other tokens may see round-off only)
    assert torch.equal(o2[:, keep], o[:, keep]) or rel_err(o2[:, keep], o[:, keep]) < 1e-14
    assert rel_err(o2[:, s], o[:, s]) > 1e-3


# --------------------------------------------------------------------------------------------
# 4. streaming == parallel
# --------------------------------------------------------------------------------------------


def stream(inp: Inputs, cuts, check_mini_batch: int | None = None, **kw):
    """Feed inp in pieces [0, c1), [c1, c2), ...; returns (concatenated outputs, final cache).
    The first call passes the initial state, later ones the cache."""
    outs, cache = [], None
    for a, b in itertools.pairwise([0, *cuts, inp.T]):
        part = inp.part(a, b)
        if cache is None:
            o, cache = part.run(output_cache=True, **kw)
        else:
            o, cache = part.run(with_state=False, cache=cache, output_cache=True, **kw)
        assert isinstance(cache, DeepMemoryCache)
        assert o.shape == part.q.shape
        if check_mini_batch is not None:
            check_cache_counters(cache, b, kw, check_mini_batch)
        outs.append(o)
    return torch.cat(outs, dim=1), cache


def check_cache_counters(cache: DeepMemoryCache, seen: int, kw: dict, mini_batch: int):
    """After ``seen`` tokens: finished segments are cached (the one holding the last token
    stays open), and the tokens after the last mini-batch boundary of the open segment are
    pending."""
    lengths = segment_lengths(10**4, **seg_kwargs(kw))
    starts = [s for s in itertools.accumulate([0, *lengths]) if s < seen]
    finished = len(starts) - 1
    in_segment = seen - starts[-1]
    assert cache.seen_tokens == seen
    assert cache.num_cached == (0 if kw["aggregation"] == "none" else finished), seen
    assert cache.segment_tokens == in_segment, seen
    assert cache.pending_tokens == in_segment % mini_batch, seen
    assert cache.pending_tokens < mini_batch


# per segmentation: the mini_batch, a prefill length (then token-by-token decode), and cut sets
# ending exactly at segment ends, mid-mini-batch, at mini-batch ends, and a few tokens apart
STREAM_LAYOUTS = {
    "size8-mb4": (
        LAYOUTS["size8-mb4"],
        13,
        [[8, 16, 24], [5, 14, 22], [4, 12, 20, 28], [1, 2, 3, 11, 26, 27], [7, 9, 15, 17]],
    ),
    "list-mb3": (
        LAYOUTS["list-mb3"],
        11,
        [[7, 19], [5, 11, 20], [6, 7, 18, 19, 20], [1, 8, 17, 27, 28], [2, 4, 13, 23]],
    ),
}


def random_cuts(T: int, seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(1, T), rng.randint(1, 6))) for _ in range(n)]


@pytest.mark.parametrize("layout", list(STREAM_LAYOUTS))
@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", RULES)
def test_streaming_equals_parallel(rule, aggregation, init, layout):
    T = T_MAIN
    seg, prefill, cut_sets = STREAM_LAYOUTS[layout]
    mb = seg["mini_batch"]
    inp = make(rule, T, seed=12 + AGGREGATIONS.index(aggregation), with_state=True)
    kw = dict(aggregation=aggregation, init=init, top_k=1, **seg)
    o_par, cache_par = inp.run(output_cache=True, **kw)
    seed = 100 * RULES.index(rule) + 10 * AGGREGATIONS.index(aggregation) + INITS.index(init)
    for cuts in [list(range(prefill, T)), *cut_sets, *random_cuts(T, seed, 3)]:
        o_str, cache = stream(inp, cuts, check_mini_batch=mb, **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")
        assert cache.num_cached == cache_par.num_cached
        assert cache.pending_tokens == cache_par.pending_tokens
        assert_states_close(cache.last_state, cache_par.last_state, 1e-10, "last state")
        assert_states_close(cache.online_state, cache_par.online_state, 1e-10, "online state")
        if cache.num_cached:
            assert_states_close(cache.states, cache_par.states, 1e-10, "cached", ("W1", "W2"))
            assert_close(cache.summaries, cache_par.summaries, 1e-12, "summaries")


@pytest.mark.parametrize(
    ("rule", "aggregation", "init"),
    [
        ("titans", "soup", "continuous"),
        ("dla", "ssc", "independent"),
        ("titans", "grm", "independent"),
        ("dla", "mean", "continuous"),
    ],
)
def test_streaming_log_segments_equals_parallel(rule, aggregation, init):
    T = 29  # [16, 8, 4, 1]
    inp = make(rule, T, seed=13, with_state=True)
    kw = dict(aggregation=aggregation, init=init, top_k=2, mini_batch=3)
    o_par = inp.run(segments="log", **kw)
    kw["segments"] = log_segments(T)
    for cuts in (list(range(15, T)), [16, 24, 28], [5, 17, 26], [10, 23, 27]):
        o_str, _ = stream(inp, cuts, check_mini_batch=3, **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")


@pytest.mark.parametrize(
    "options",
    [
        dict(norm=False),
        dict(summary="sum"),
        dict(max_grad_norm=None),
        dict(gate_scale=0.7),
        dict(mini_batch=1),
        dict(mini_batch=5),
        dict(mini_batch=16),
        dict(decay_to="zero"),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
@pytest.mark.parametrize("aggregation", ["soup", "ssc", "grm"])
def test_streaming_equals_parallel_other_options(aggregation, options):
    inp = make("titans", 29, seed=19, normalize=False)
    kw = dict(aggregation=aggregation, top_k=1, **{**LAYOUTS["list-mb3"], **options})
    o_par = inp.run(**kw)
    for cuts in (list(range(11, 29)), [5, 11, 20], [7, 19], [2, 9, 13, 25]):
        o_str, _ = stream(inp, cuts, check_mini_batch=kw["mini_batch"], **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")


@pytest.mark.parametrize("rule", RULES)
def test_ssc_ties_are_broken_the_same_way_everywhere(rule):
    """Zero keys (e.g. padding) give the first segments equal summaries: the parallel path,
    the reference and decoding must pick the same caches."""
    inp = make(rule, 29, seed=21, b=1)
    inp.k = inp.k.clone()
    inp.k[:, :16] = 0
    kw = dict(aggregation="ssc", top_k=2, segment_size=4, mini_batch=2)
    o_par = inp.run(**kw)
    assert_close(o_par, inp.run(impl="reference", **kw), TOL64, "fast vs reference")
    o_str, _ = stream(inp, list(range(5, 29)), check_mini_batch=2, **kw)
    assert_close(o_str, o_par, 1e-10, "decode vs parallel")


def test_streaming_from_one_token_calls_keeps_continuing():
    """A stream of 1-token calls only, across several segments (mini-batches never full at
    a call's end until a boundary), continued past the parallel length."""
    inp = make("titans", 29, seed=14)
    kw = dict(aggregation="soup", segment_size=5, mini_batch=3)
    o_par = inp.run(**kw)
    o_str, cache = stream(inp, list(range(1, 29)), check_mini_batch=3, **kw)
    assert_close(o_str, o_par, 1e-10, "decode vs parallel")
    assert cache.num_cached == 5


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "layout", "with_state"),
    [
        ("dla", "soup", "continuous", "list-mb3", True),
        ("titans", "ssc", "independent", "size8-mb4", False),
        ("titans", "grm", "continuous", "list-mb3", False),
        ("titans", "soup", "independent", "size8-mb4", True),
    ],
)
def test_gradients_through_streaming_equal_parallel(rule, aggregation, init, layout, with_state):
    T = T_MAIN
    inp = make(rule, T, seed=15, with_state=with_state, requires_grad=True)
    kw = dict(aggregation=aggregation, init=init, top_k=1, **LAYOUTS[layout])
    named = inp.leaves()
    w = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g_par = torch.autograd.grad((inp.run(**kw) * w).sum(), list(named.values()), allow_unused=True)
    o, _ = stream(inp, [5, 11, 20, *range(21, T)], **kw)  # pieces, then decode steps
    g_str = torch.autograd.grad((o * w).sum(), list(named.values()), allow_unused=True)
    for name, gs, gp in zip(named, g_str, g_par, strict=True):
        if gp is None:
            assert gs is None or not gs.any(), f"grad {name}"
        else:
            assert gp.abs().sum() > 0, f"parallel gradient of {name} is zero"
            assert_close(gs, gp, 1e-10, f"grad {name}")


# --------------------------------------------------------------------------------------------
# 5. bad input
# --------------------------------------------------------------------------------------------


def _good(rule="titans", aggregation="grm", T=6):
    inp = make(rule, T, seed=0, b=2, h=3, d=4, dh=16, dtype=torch.float32)
    return dict(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        u=inp.u,
        rule=rule,
        eta=inp.eta,
        g=inp.g,
        beta=inp.beta,
        init_weights=(inp.W1, inp.W2),
        aggregation=aggregation,
        segment_size=4,
        mini_batch=2,
        max_grad_norm=1.0,
    )


def _with(rule="titans", drop=(), **changes):
    kw = _good(rule)
    for name in drop:
        kw.pop(name)
    kw.update(changes)
    return kw


def arg(name: str) -> str:
    """A message that starts with the argument's name."""
    return r"^" + re.escape(name) + r"\b"


def _state(rule="titans", b=2, h=3, d=4, dh=16, momentum=True):
    W1, W2 = torch.zeros(b, h, d, dh), torch.zeros(b, h, dh, d)
    if momentum:
        return DeepState(W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))
    return DeepState(W1, W2)


def _linear(**changes):
    """The base call with the linear rule gated_delta (its gates, no deep arguments)."""
    kw = _with("gated_delta", eta=None, g=-torch.rand(2, 6, 3), beta=torch.rand(2, 6, 3))
    for name in ("init_weights", "mini_batch", "max_grad_norm"):
        kw.pop(name)
    kw.update(changes)
    return kw


BAD_INPUTS = {
    "eta missing (titans)": (arg("eta"), lambda: _with(eta=None)),
    "eta missing (dla)": (arg("eta"), lambda: _with("dla", eta=None)),
    "eta wrong shape": (arg("eta"), lambda: _with(eta=torch.rand(2, 6, 2))),
    "eta wrong rank": (arg("eta"), lambda: _with(eta=torch.rand(2, 6, 3, 1))),
    "init_weights missing": (arg("init_weights"), lambda: _with(drop=["init_weights"])),
    "init_weights not a pair": (
        arg("init_weights"),
        lambda: _with(init_weights=(torch.zeros(3, 4, 16),)),
    ),
    "init_weights W1 wrong shape": (
        arg("init_weights"),
        lambda: _with(init_weights=(torch.zeros(3, 5, 16), torch.zeros(3, 16, 4))),
    ),
    "init_weights W2 wrong shape": (
        arg("init_weights"),
        lambda: _with(init_weights=(torch.zeros(3, 4, 16), torch.zeros(3, 12, 4))),
    ),
    "init_weights wrong heads": (
        arg("init_weights"),
        lambda: _with(init_weights=(torch.zeros(2, 4, 16), torch.zeros(2, 16, 4))),
    ),
    "init_weights per batch": (
        arg("init_weights"),
        lambda: _with(init_weights=(torch.zeros(2, 3, 4, 16), torch.zeros(2, 3, 16, 4))),
    ),
    "lam given (titans)": (arg("lam"), lambda: _with(lam=torch.rand(2, 6, 3))),
    "lam given (dla)": (
        arg("lam"),
        lambda: _with("dla", lam=torch.rand(2, 6, 3)),
    ),
    "g given to dla": (arg("g"), lambda: _with("dla", g=-torch.rand(2, 6, 3))),
    "beta given to dla": (arg("beta"), lambda: _with("dla", beta=torch.rand(2, 6, 3))),
    "g missing (titans)": (arg("g"), lambda: _with(g=None)),
    "beta missing (titans)": (arg("beta"), lambda: _with(beta=None)),
    "eta negative": (arg("eta"), lambda: _with(eta=-torch.rand(2, 6, 3))),
    "beta above 1": (arg("beta"), lambda: _with(beta=1.5 * torch.ones(2, 6, 3))),
    "eta given to a linear rule": (
        arg("eta"),
        lambda: _linear(eta=torch.rand(2, 6, 3)),
    ),
    "init_weights given to a linear rule": (
        arg("init_weights"),
        lambda: _linear(init_weights=_good()["init_weights"]),
    ),
    "mini_batch 0": (arg("mini_batch"), lambda: _with(mini_batch=0)),
    "mini_batch float": (arg("mini_batch"), lambda: _with(mini_batch=2.0)),
    "max_grad_norm 0": (arg("max_grad_norm"), lambda: _with(max_grad_norm=0.0)),
    "max_grad_norm negative": (arg("max_grad_norm"), lambda: _with(max_grad_norm=-1.0)),
    "eps 0": (arg("eps"), lambda: _with(eps=0.0)),
    "eps negative": (arg("eps"), lambda: _with(eps=-1.0)),
    "eps nan": (arg("eps"), lambda: _with(eps=float("nan"))),
    "eps string": (arg("eps"), lambda: _with(eps="small")),
    "eps None": (arg("eps"), lambda: _with(eps=None)),
    "unknown decay_to": (arg("decay_to"), lambda: _with(decay_to="half")),
    "Dk != Dv": (arg("v"), lambda: _with(v=torch.randn(2, 6, 3, 5))),
    "initial_state a tensor": (
        arg("initial_state"),
        lambda: _with(initial_state=torch.zeros(2, 3, 4, 4)),
    ),
    "initial_state a tuple": (
        arg("initial_state"),
        lambda: _with(initial_state=tuple(_state())),
    ),
    "initial_state wrong shape": (
        arg("initial_state"),
        lambda: _with(initial_state=_state(dh=8)),
    ),
    "initial_state wrong batch": (arg("initial_state"), lambda: _with(initial_state=_state(b=1))),
    "initial_state without momentum (titans)": (
        arg("initial_state"),
        lambda: _with(initial_state=_state(momentum=False)),
    ),
    "initial_state with momentum (dla)": (
        arg("initial_state"),
        lambda: _with("dla", initial_state=_state()),
    ),
    "u missing soup": (arg("u"), lambda: _with(aggregation="soup", u=None)),
    "unknown rule": (arg("rule"), lambda: _with(rule="mlp", eta=None, drop=["init_weights"])),
}


def _call(kwargs):
    q, k, v, u = (kwargs.pop(n) for n in ("q", "k", "v", "u"))
    return memory_caching(q, k, v, u, **kwargs)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_argument(case):
    pattern, make_kwargs = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=pattern):
        _call(make_kwargs())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", RULES)
def test_empty_batch_gives_empty_outputs(rule, aggregation):
    inp = make(rule, 13, b=0)
    kw = dict(aggregation=aggregation, segment_size=4, mini_batch=2)
    o, cache = inp.run(output_cache=True, **kw)
    assert o.shape == (0, 13, H, D)
    assert cache.seen_tokens == 13 and cache.last_state.W1.shape[0] == 0
    o2 = inp.part(0, 1).run(with_state=False, cache=cache, **kw)  # and the stream goes on
    assert o2.shape == (0, 1, H, D)
    assert inp.run(impl="reference", **kw).shape == (0, 13, H, D)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", RULES)
def test_good_inputs_of_bad_input_table_run(rule, aggregation):
    """The table's base calls are valid: each case breaks one thing."""
    o = _call(_with(rule, aggregation=aggregation))
    assert o.shape == (2, 6, 3, 4) and torch.isfinite(o).all()
    state = _state(momentum=rule == "titans")
    o2 = _call(_with(rule, aggregation=aggregation, initial_state=state))
    assert o2.shape == (2, 6, 3, 4)
    _, cache = _call(_with(rule, aggregation=aggregation, output_cache=True))
    assert isinstance(cache, DeepMemoryCache) and cache.seen_tokens == 6
    # the base of the linear-rule cases: gated_delta without eta and init_weights
    o3 = _call(_linear(aggregation=aggregation))
    assert o3.shape == (2, 6, 3, 4)


def _continue(cache, T=3, **changes):
    inp = make("titans", T, seed=1, b=2, h=3, d=4, dh=16, dtype=torch.float32)
    kw = dict(
        rule="titans",
        eta=inp.eta,
        g=inp.g,
        beta=inp.beta,
        init_weights=(inp.W1, inp.W2),
        aggregation="grm",
        segment_size=4,
        mini_batch=2,
        max_grad_norm=1.0,
        cache=cache,
    )
    kw.update(changes)
    return memory_caching(inp.q, inp.k, inp.v, inp.u, **kw)


@pytest.fixture
def titans_cache():
    _, cache = _call(_with(output_cache=True))
    return cache


@pytest.mark.parametrize(
    "changes",
    [
        dict(mini_batch=3),
        dict(mini_batch=1),
        dict(norm=False),
        dict(max_grad_norm=0.5),
        dict(max_grad_norm=None),
        dict(eps=1e-6),
        dict(aggregation="soup"),
        dict(init="independent"),
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_cache_of_another_configuration_is_rejected(titans_cache, changes):
    _continue(titans_cache)  # the same configuration continues
    with pytest.raises(ValueError, match=r"^cache\b"):
        _continue(titans_cache, **changes)


def test_cache_of_another_rule_is_rejected(titans_cache):
    inp = make("dla", 3, seed=1, b=2, h=3, d=4, dh=16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"^cache\b"):
        memory_caching(
            inp.q,
            inp.k,
            inp.v,
            inp.u,
            rule="dla",
            eta=inp.eta,
            init_weights=(inp.W1, inp.W2),
            aggregation="grm",
            segment_size=4,
            mini_batch=2,
            max_grad_norm=1.0,
            cache=titans_cache,
        )


def test_cache_with_other_hidden_size_is_rejected(titans_cache):
    W1, W2 = torch.zeros(3, 4, 8), torch.zeros(3, 8, 4)
    with pytest.raises(ValueError, match=r"^cache\b"):
        _continue(titans_cache, init_weights=(W1, W2))


def test_initial_state_with_cache_is_rejected(titans_cache):
    with pytest.raises(ValueError, match=r"^initial_state\b"):
        _continue(titans_cache, initial_state=_state())


def test_reference_takes_no_cache(titans_cache):
    with pytest.raises(ValueError, match=r"^impl\b"):
        _continue(titans_cache, impl="reference")


# --------------------------------------------------------------------------------------------
# 6. the cache: size and batch reordering
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "aggregation"), [("titans", "grm"), ("dla", "soup"), ("titans", "none")]
)
@pytest.mark.parametrize("init", INITS)
def test_cache_nbytes_grows_by_one_memory_per_segment(rule, aggregation, init):
    T, mb = 29, 4
    inp = make(rule, T, seed=16)
    kw = dict(aggregation=aggregation, init=init, segment_size=8, mini_batch=mb)
    _, cache = inp.part(0, 2).run(output_cache=True, **kw)
    history = [(cache.num_cached, cache.pending_tokens, cache.nbytes())]
    for t in range(2, T):
        _, cache = inp.part(t, t + 1).run(with_state=False, cache=cache, output_cache=True, **kw)
        history.append((cache.num_cached, cache.pending_tokens, cache.nbytes()))
    assert history[-1][0] == (0 if aggregation == "none" else 3)
    # one (W1, W2) pair and one key summary per head and batch row, float64
    per_segment = B * H * (D * DH + DH * D + D) * 8
    base = {}  # bytes with no cached segment, by number of pending tokens
    for n, pending, nbytes in history:
        assert pending < mb
        base.setdefault(pending, nbytes - n * per_segment)
        assert nbytes == base[pending] + n * per_segment, (n, pending, nbytes, history)
    assert len(base) == mb  # every pending count was seen
    # the rest: the online memory (W1, W2[, S1, S2]) and the open segment's key sum; with
    # pending tokens also the state after the last token and their k, v, eta[, g, beta]
    state = B * H * 2 * D * DH * (2 if rule == "titans" else 1) * 8
    key_sum = B * H * D * 8
    per_pending = B * H * (2 * D + (3 if rule == "titans" else 1)) * 8
    assert base[0] == state + key_sum, base
    for p in range(1, mb):
        assert base[p] == 2 * state + key_sum + p * per_pending, base


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "index"),
    [
        ("dla", "soup", "independent", [1, 0]),
        ("titans", "ssc", "continuous", [1, 0]),
        ("titans", "grm", "independent", [1, 0]),
        ("titans", "soup", "continuous", [1]),
    ],
)
def test_cache_index_select_continues_the_selected_rows(rule, aggregation, init, index):
    T, t = 29, 13  # 13 tokens: one cached segment and one token pending (mini_batch 4)
    inp = make(rule, T, seed=17, with_state=True)
    kw = dict(aggregation=aggregation, init=init, segment_size=8, mini_batch=4, top_k=1)
    _, cache = inp.part(0, t).run(output_cache=True, **kw)
    assert cache.pending_tokens == 1 and cache.num_cached == 1
    index = torch.tensor(index)
    picked = cache.index_select(index)
    assert picked.pending_tokens == 1 and picked.num_cached == 1
    o_all, _ = stream_from(inp, cache, t, **kw)
    o_pick, _ = stream_from(inp.rows(index), picked, t, **kw)
    assert_close(o_pick, o_all[index], 1e-12, "o of the selected rows")
    # the selected stream is the stream of the selected rows from the start
    o_rows = inp.rows(index).run(**kw)
    assert_close(o_pick, o_rows[:, t:], 1e-10, "o vs the selected rows' own stream")
    # and it is not the unselected one (the check is not vacuous)
    if index.tolist() == [1, 0]:
        assert rel_err(o_pick, o_all) > 1e-3


def stream_from(inp: Inputs, cache, t: int, **kw):
    """Decode tokens t, t+1, ... of inp one by one, continuing ``cache``."""
    outs = []
    for s in range(t, inp.T):
        o, cache = inp.part(s, s + 1).run(with_state=False, cache=cache, output_cache=True, **kw)
        outs.append(o)
    return torch.cat(outs, 1), cache


# --------------------------------------------------------------------------------------------
# 7. bf16 autocast and stability
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["grm", "soup"])
@pytest.mark.parametrize("rule", RULES)
def test_long_sequence_is_finite(rule, aggregation):
    inp = make(rule, 2048, seed=18, b=1, h=1, d=16, dh=64, dtype=torch.float32)
    o = inp.run(aggregation=aggregation, segment_size=256, mini_batch=64, max_grad_norm=1.0)
    assert o.dtype == torch.float32 and o.shape == (1, 2048, 1, 16)
    assert torch.isfinite(o).all()
    assert o.abs().max() < 1e3


@pytest.mark.parametrize("aggregation", ["grm", "soup", "ssc", "mean"])
@pytest.mark.parametrize("rule", RULES)
def test_autocast_bf16_with_fp32_inputs(rule, aggregation):
    """The scans and the cached reads run in fp32 under bf16 autocast."""
    inp = make(rule, 40, seed=20, d=8, dh=32, dtype=torch.float32)
    kw = dict(aggregation=aggregation, segments=[11, 16, 13], mini_batch=4)
    o_ref, cache_ref = inp.run(output_cache=True, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, cache = inp.part(0, 30).run(output_cache=True, **kw)
        o2, cache = inp.part(30, 40).run(with_state=False, cache=cache, output_cache=True, **kw)
    assert o.dtype == o2.dtype == torch.float32
    assert_close(torch.cat([o, o2], 1), o_ref, 1e-5, "o")
    for x in (*cache.states, cache.summaries, *cache.last_state, *cache.pending.values()):
        if x is not None:
            assert x.dtype == torch.float32
    assert_states_close(cache.last_state, cache_ref.last_state, 1e-5, "last state")


def saved_for_backward(inp: Inputs, **kw) -> tuple[int, int]:
    """(elements of the largest tensor, elements of all storages) the forward saves for the
    backward of memory_caching on ``inp``; runs the backward too."""
    largest, storages = [0], {}

    def pack(x):
        largest[0] = max(largest[0], x.numel())
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.itemsize
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o = inp.run(**kw)
        o.square().sum().backward()
    return largest[0], sum(storages.values())


def _memory_inputs(T):
    inp = make("titans", T, seed=22, b=1, h=2, d=16, dh=64, dtype=torch.float32)
    for x in inp.leaves().values():
        x.requires_grad_(True)
    return inp


@pytest.mark.parametrize("aggregation", ["grm", "soup", "ssc", "residual"])
def test_backward_keeps_no_per_token_read_of_every_cache(aggregation):
    """The cached MLP reads are recomputed in the backward (checkpointed, routed for ssc):
    nothing of size [T, N, D] (a read of every cache by every token) is kept."""
    T, size, Hm, Dm = 1024, 64, 2, 16
    N = T // size
    inp = _memory_inputs(T)
    largest, _ = saved_for_backward(
        inp, aggregation=aggregation, segment_size=size, mini_batch=16, top_k=2
    )
    assert largest >= T * Hm * Dm  # the hook saw the inputs: it is not vacuous
    assert largest < Hm * T * N * Dm, f"largest saved tensor has {largest} elements"
    if aggregation != "residual":
        assert inp.u.grad is not None and inp.u.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "aggregation",
    [
        "grm",
        "ssc",
        "residual",
        "soup",
    ],
)
def test_backward_memory_grows_linearly_with_segment_count(aggregation):
    """What the backward keeps beyond the plain scan (aggregation none) grows like the number
    of cached memories N, not N^2: doubling N at most about doubles it."""
    T = 512
    inp = _memory_inputs(T)
    kw = dict(mini_batch=8, top_k=2)
    extra = {}
    for size in (16, 8):  # N = 32, 64
        _, base = saved_for_backward(inp, aggregation="none", segment_size=size, **kw)
        _, total = saved_for_backward(inp, aggregation=aggregation, segment_size=size, **kw)
        extra[T // size] = total - base
    assert extra[32] > 0
    assert extra[64] < 2.5 * extra[32], f"saved beyond the plain scan: {extra}"


# --------------------------------------------------------------------------------------------
# non-finite inputs stay causal
# --------------------------------------------------------------------------------------------

HEAD = 1  # the head that receives the non-finite entries


def poison_rows(inp: Inputs, names, s: int, value: float = float("nan")) -> Inputs:
    """inp (as fresh leaves) with ``value`` at token s, head HEAD, in input names[i] of batch
    row i (one entry each)."""
    fields = ("q", "k", "v", "u", "eta", "g", "beta")
    fresh = {n: getattr(inp, n) for n in fields}
    fresh = {n: None if x is None else x.detach().clone() for n, x in fresh.items()}
    for row, name in enumerate(names):
        if fresh[name].dim() == 4:
            fresh[name][row, s, HEAD, 1] = value
        else:
            fresh[name][row, s, HEAD] = value
    return dataclasses.replace(
        inp, **{n: None if x is None else x.requires_grad_() for n, x in fresh.items()}
    )


def earlier_grads(inp: Inputs, s: int, **kw):
    """The output, and the gradients of the inputs of a loss on the outputs before token s."""
    o = inp.run(**kw)
    w = torch.randn(o[:, :s].shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    named = {n: x for n, x in inp.leaves().items() if not n.startswith("init")}
    grads = torch.autograd.grad((o[:, :s] * w).sum(), list(named.values()), allow_unused=True)
    return o.detach(), dict(zip(named, grads, strict=True))


def check_poisoned_outputs(o, o_c, names, s, what):
    """Row i holds a NaN in input names[i] at token s, head HEAD: earlier outputs and the other
    heads are those of the clean run o_c; a write makes the head's outputs NaN from s on, a
    read (q, u) only at s."""
    T = o.shape[1]
    # (ssc routes the tokens of all rows and heads together, by the caches they select: a
    # changed selection elsewhere may change the round-off of a token's read)
    assert_close(o[:, :s], o_c[:, :s], 1e-14, f"{what}: an earlier output changed")
    others = [h for h in range(o.shape[2]) if h != HEAD]
    assert_close(o[:, :, others], o_c[:, :, others], 1e-14, f"{what}: another head changed")
    for row, name in enumerate(names):
        if name in ("q", "u"):  # reads: only their own output
            assert o[row, s, HEAD].isnan().all(), f"{what}: NaN {name} not in its output"
            keep = [t for t in range(T) if t != s]
            assert_close(o[row, keep, HEAD], o_c[row, keep, HEAD], 1e-14, f"{what}: {name}")
        else:
            assert o[row, s:, HEAD].isnan().all(), f"{what}: after a NaN {name}, a finite output"


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_input_reaches_no_earlier_output(rule, aggregation, init):
    """A NaN at token s (after two cached segments) in any input leaves the earlier outputs
    and the gradients of a loss on them as in the clean run, and the other heads untouched
    (batch row i is poisoned in input i); both paths."""
    T, s = 13, 9
    kw = dict(aggregation=aggregation, init=init, top_k=1, segment_size=4, mini_batch=2)
    names = ["q", "k", "v", "u", "eta"] + (["g", "beta"] if rule == "titans" else [])
    for impl in ("chunk", "reference"):
        clean = make(rule, T, seed=71, b=len(names), requires_grad=True)
        o_c, grads_c = earlier_grads(clean, s, impl=impl, **kw)
        o, grads = earlier_grads(poison_rows(clean, names, s), s, impl=impl, **kw)
        check_poisoned_outputs(o, o_c, names, s, impl)
        for n, grad in grads.items():
            if grad is None:
                assert grads_c[n] is None
                continue
            assert torch.isfinite(grad).all(), f"{impl}: gradient of {n} is not finite"
            assert_close(grad, grads_c[n], 1e-12, f"{impl}: gradient of {n}")


@pytest.mark.parametrize("aggregation", ["none", "grm", "soup", "ssc"])
@pytest.mark.parametrize("s", [8, 9])  # left pending by the first call; inside its last block
def test_non_finite_write_poisons_the_stream(aggregation, s):
    """A stream cut right after a NaN continues as the parallel run does: NaN outputs after a
    NaN write in that row and head (the pending tokens are kept as given, the states after
    the write are NaN), and as the clean stream everywhere else."""
    T = 13
    names = ["k", "eta", "q", "u"]
    kw = dict(aggregation=aggregation, top_k=1, segment_size=4, mini_batch=2)
    clean = make("titans", T, seed=73, b=len(names))
    o_c, _ = stream(clean, [s + 1], **kw)
    o, cache = stream(poison_rows(clean, names, s), [s + 1], **kw)
    check_poisoned_outputs(o, o_c, names, s, f"cut at {s + 1}")
    poisoned = cache.last_state.W1[:, HEAD].isnan().flatten(1).all(1)  # [B]
    assert poisoned.tolist() == [True, True, False, False]
    assert torch.isfinite(cache.last_state.W1[:, 1 - HEAD]).all()
