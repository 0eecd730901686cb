"""Tests of growmem.ops.memory_caching: Memory Caching over the linear-family memories.

The fast path (impl="chunk") is checked against the per-token reference (impl="reference"):
outputs and gradients in float64. Then the identities of DESIGN.md section 3, causality,
streaming == parallel, bad input, autocast, the cache's size and a bound on what the backward
pass keeps.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from growmem.ops import MemoryCache, linear_memory, log_segments, memory_caching
from growmem.ops.caching.select import log_bucket_bounds, log_buckets
from growmem.ops.checks import LINEAR_RULES, RULE_GATES
from tests.helpers import (
    aggregation_inits,
    assert_finite_and_equal,
    make_inputs,
    make_u,
    nan_from,
    rel_err,
)

AGGREGATIONS = ("none", "residual", "grm", "soup", "ssc", "loglinear", "mean")
GATED = ("grm", "soup", "ssc", "loglinear")
INITS = ("continuous", "independent")
B, H = 2, 2
TOL64 = 1e-9


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """One set of inputs of memory_caching (float64 unless told)."""

    rule: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    u: torch.Tensor
    gates: dict
    s0: torch.Tensor | None

    @property
    def T(self) -> int:
        return self.q.shape[1]

    def leaves(self) -> dict:
        """Named differentiable inputs, in a fixed order."""
        named = {"q": self.q, "k": self.k, "v": self.v, "u": self.u, **self.gates}
        if self.s0 is not None:
            named["initial_state"] = self.s0
        return named

    def part(self, a: int, b: int) -> Inputs:
        """Tokens a..b-1 (the initial state is kept)."""
        return Inputs(
            self.rule,
            *(x[:, a:b] for x in (self.q, self.k, self.v, self.u)),
            {n: x[:, a:b] for n, x in self.gates.items()},
            self.s0,
        )

    def run(self, *, with_state: bool = True, **kw):
        """memory_caching on these inputs; ``with_state`` passes initial_state."""
        return memory_caching(
            self.q,
            self.k,
            self.v,
            self.u,
            rule=self.rule,
            **self.gates,
            initial_state=self.s0 if with_state else None,
            **kw,
        )

    def linear(self, **kw):
        """linear_memory on these inputs (no caching): (o, final state)."""
        return linear_memory(
            self.q, self.k, self.v, rule=self.rule, **self.gates, initial_state=self.s0, **kw
        )


def make(
    rule: str,
    T: int,
    Dk: int = 5,
    Dv: int = 4,
    seed: int = 0,
    b: int = B,
    h: int = H,
    dtype: torch.dtype = torch.float64,
    requires_grad: bool = False,
    with_s0: bool = True,
) -> Inputs:
    q, k, v, gates, s0 = make_inputs(rule, b, T, h, Dk, Dv, dtype, seed, requires_grad)
    u = make_u(b, T, h, Dk, dtype, seed, requires_grad)
    return Inputs(rule, q, k, v, u, gates, s0 if with_s0 else None)


def mix(a: Inputs, c: Inputs, t0: int) -> Inputs:
    """Tokens < t0 of a, tokens >= t0 of c (initial state of a)."""

    def cat(x, y):
        return torch.cat([x[:, :t0], y[:, t0:]], dim=1)

    return Inputs(
        a.rule,
        cat(a.q, c.q),
        cat(a.k, c.k),
        cat(a.v, c.v),
        cat(a.u, c.u),
        {n: cat(x, c.gates[n]) for n, x in a.gates.items()},
        a.s0,
    )


def assert_close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err < tol, f"{what}: rel err {err:.3e} >= {tol:.0e}"


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
    kw.pop("chunk_size", None)
    o_r, g_r = output_and_grads(inp, aggregation=aggregation, impl="reference", **kw)
    assert o_f.shape == (*inp.q.shape[:3], inp.v.shape[-1]) and o_f.dtype == torch.float64
    assert_close(o_f, o_r, TOL64, "o")
    assert (
        set(g_f)
        == set(g_r)
        == {"q", "k", "v", "u", *RULE_GATES[inp.rule]}
        | (set() if inp.s0 is None else {"initial_state"})
    )
    for name, gr in g_r.items():
        gf = g_f[name]
        if gr is None:
            assert gf is None or not gf.any(), f"grad {name}: the reference does not use it"
        else:
            assert gf is not None, f"grad {name} is None, the reference's is not"
            assert_close(gf, gr, TOL64, f"grad {name}")
    n_seg = len(segment_lengths(inp.T, **seg_kwargs(kw)))
    if aggregation in GATED and n_seg > 1:  # the gates matter: comparing u's grad is not vacuous
        assert g_r["u"] is not None and g_r["u"].abs().sum() > 0
    if aggregation not in GATED:
        assert g_r["u"] is None
    return o_r


def cache_tensors(cache: MemoryCache) -> list[torch.Tensor]:
    """Every tensor a cache holds (fields, and tensors inside tuple fields)."""
    out = []
    for f in dataclasses.fields(cache):
        x = getattr(cache, f.name)
        for t in x if isinstance(x, (tuple, list)) else (x,):
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


# --------------------------------------------------------------------------------------------
# 1. fast path vs per-token reference, float64, outputs + gradients
# --------------------------------------------------------------------------------------------

# Segments never align with chunks: size 8 inside chunks of 16; lengths 7, 20, 3, 20 in
# chunks of 4.
PRODUCT_LAYOUTS = {
    "T37-size8-chunk16": dict(T=37, segment_size=8, chunk_size=16),
    "T50-list-chunk4": dict(T=50, segments=[7, 20, 3, 20], chunk_size=4),
}


@pytest.mark.parametrize("layout", list(PRODUCT_LAYOUTS))
@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_fast_matches_reference(rule, aggregation, init, layout):
    kw = dict(PRODUCT_LAYOUTS[layout])
    T = kw.pop("T")
    seed = 17 * LINEAR_RULES.index(rule) + 3 * AGGREGATIONS.index(aggregation) + T
    inp = make(rule, T, seed=seed, requires_grad=True)
    check_fast_vs_reference(inp, aggregation, init=init, **kw)


def _case(rule, aggregation, init, T, dims=(5, 4), with_s0=True, **kw):
    Dk, Dv = dims
    name = f"{rule}-{aggregation}-{init}-T{T}-" + "-".join(
        f"{k}{v}".replace(" ", "") for k, v in kw.items()
    )
    return pytest.param(rule, aggregation, init, T, Dk, Dv, with_s0, kw, id=f"{name}-D{Dk}x{Dv}")


D_ODD = (24, 40)
EXTRA_CASES = [
    # odd head dims
    _case("gated_delta", "grm", "continuous", 63, D_ODD, segment_size=16, chunk_size=4),
    _case("swla", "ssc", "independent", 63, D_ODD, segment_size=8, chunk_size=16),
    _case("delta", "residual", "continuous", 63, D_ODD, segments=[5, 30, 1, 27], chunk_size=16),
    _case("decay", "soup", "independent", 37, D_ODD, segments="log", chunk_size=4),
    # logarithmic segments: 37 -> [32, 4, 1], 63 -> [32, 16, 8, 4, 2, 1]
    *(
        _case(rule, agg, init, T, segments="log", chunk_size=c)
        for (rule, agg, init), T, c in zip(
            [
                ("gated_delta", "grm", "continuous"),
                ("swla", "ssc", "independent"),
                ("linear", "mean", "independent"),
                ("delta", "residual", "continuous"),
                ("decay", "ssc", "continuous"),
            ],
            [37, 63, 63, 37, 63],
            [16, 4, 16, 4, 16],
            strict=True,
        )
    ),
    # summary = sum
    _case("gated_delta", "grm", "continuous", 37, summary="sum", segment_size=8, chunk_size=16),
    _case("swla", "ssc", "independent", 37, summary="sum", segment_size=8, chunk_size=4),
    _case("linear", "soup", "continuous", 37, summary="sum", segments=[7, 20, 3, 7]),
    # gate_scale
    _case("delta", "grm", "independent", 37, gate_scale=0.7, segment_size=8, chunk_size=16),
    _case("decay", "ssc", "continuous", 37, gate_scale=0.7, top_k=1, segment_size=8),
    # ssc top_k on 8 segments
    *(
        _case("gated_delta", "ssc", init, 63, top_k=top_k, segment_size=8, chunk_size=16)
        for top_k in (1, 2, 3)
        for init in INITS
    ),
    _case("swla", "ssc", "continuous", 63, top_k=3, segments=[9, 1, 13, 8, 20, 12], chunk_size=4),
    # longer sequences
    _case("gated_delta", "grm", "continuous", 200, segment_size=32, chunk_size=16),
    _case("swla", "ssc", "independent", 200, segment_size=32, chunk_size=64, top_k=2),
    _case("delta", "residual", "independent", 200, segment_size=32, chunk_size=16),
    _case("decay", "mean", "continuous", 200, segments=[50, 3, 97, 50], chunk_size=16),
    # one token per segment, segments longer than the sequence, a single token
    _case("gated_delta", "grm", "continuous", 20, segment_size=1, chunk_size=4),
    _case("swla", "ssc", "independent", 20, segment_size=1, chunk_size=4, top_k=3),
    _case("delta", "mean", "independent", 20, segment_size=1, chunk_size=16),
    _case("linear", "grm", "independent", 20, segment_size=64, chunk_size=16),
    _case("gated_delta", "grm", "continuous", 1, segment_size=8, chunk_size=16),
    _case("swla", "ssc", "independent", 1, segments=[1], chunk_size=4),
    # loglinear: up to 15 caches in buckets of 8, 4, 2, 1; sum summaries; uneven segments
    _case("gated_delta", "loglinear", "continuous", 63, D_ODD, segment_size=4, chunk_size=16),
    _case("swla", "loglinear", "continuous", 61, summary="sum", segment_size=4, chunk_size=8),
    _case("delta", "loglinear", "continuous", 50, segments=[3, 9, 1, 4, 11, 2, 5, 15]),
    # no initial state
    _case("gated_delta", "grm", "independent", 37, with_s0=False, segment_size=8, chunk_size=4),
    _case("swla", "residual", "continuous", 37, with_s0=False, segment_size=8, chunk_size=16),
    _case("delta", "ssc", "independent", 37, with_s0=False, segments=[7, 20, 3, 7]),
]


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "T", "Dk", "Dv", "with_s0", "kw"), EXTRA_CASES
)
def test_fast_matches_reference_more(rule, aggregation, init, T, Dk, Dv, with_s0, kw):
    inp = make(rule, T, Dk, Dv, seed=T + Dk, requires_grad=True, with_s0=with_s0)
    check_fast_vs_reference(inp, aggregation, init=init, **kw)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_float32_fast_matches_float64_reference(aggregation):
    inp = make("gated_delta", 63, 24, 40, seed=8)
    kw = dict(aggregation=aggregation, segment_size=16)
    o_r = inp.run(impl="reference", **kw)
    inp32 = Inputs(
        inp.rule,
        *(x.float() for x in (inp.q, inp.k, inp.v, inp.u)),
        {n: x.float() for n, x in inp.gates.items()},
        inp.s0.float(),
    )
    o = inp32.run(chunk_size=16, **kw)
    assert o.dtype == torch.float32
    assert_close(o, o_r, 1e-4, "o")


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
def test_chunk_size_does_not_change_results(aggregation, init):
    inp = make("swla", 45, seed=4)
    kw = dict(aggregation=aggregation, init=init, segments=[10, 3, 20, 12])
    results = [inp.run(chunk_size=c, **kw) for c in (1, 5, 7, 64)]
    for o in results[:-1]:
        assert_close(o, results[-1], 1e-12, "o")


# --------------------------------------------------------------------------------------------
# 2. identities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seg", [dict(segment_size=30), dict(segment_size=64), dict(segments=[30])])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_one_segment_every_aggregation_equals_none(rule, init, seg):
    inp = make(rule, 30, seed=1)
    base = inp.run(aggregation="none", init=init, chunk_size=8, **seg)
    for aggregation in (a for a, i in aggregation_inits(AGGREGATIONS[1:]) if i == init):
        o = inp.run(aggregation=aggregation, init=init, chunk_size=8, **seg)
        assert_close(o, base, 1e-12, f"{aggregation} with one segment")
    # two segments: the aggregations are no longer the plain RNN (the check is not vacuous)
    o2 = inp.run(aggregation="residual", init=init, segment_size=15, chunk_size=8)
    assert rel_err(o2, base) > 1e-3


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_soup_equals_grm(rule, init):
    inp = make(rule, 45, seed=2)
    kw = dict(init=init, segments=[8, 13, 1, 15, 8], chunk_size=8)
    grm = inp.run(aggregation="grm", **kw)
    assert_close(inp.run(aggregation="soup", **kw), grm, 1e-12, "soup vs grm (fast path)")
    # the reference mixes the memories' parameters for soup: the identity, not a shared kernel
    grm_r = inp.run(aggregation="grm", impl="reference", init=init, segments=kw["segments"])
    soup_r = inp.run(aggregation="soup", impl="reference", init=init, segments=kw["segments"])
    assert_close(soup_r, grm_r, 1e-12, "soup vs grm (reference)")
    assert rel_err(grm, inp.run(aggregation="mean", **kw)) > 1e-3  # the gates matter


def test_log_buckets_are_the_binary_decomposition():
    n = torch.arange(71)
    start, end, valid = log_buckets(n, 7)
    for i in range(71):
        present = zip(start[i].tolist(), end[i].tolist(), valid[i].tolist(), strict=True)
        slots = sorted((a, b) for a, b, ok in present if ok)
        assert slots == log_bucket_bounds(i), i
    assert log_bucket_bounds(11) == [(0, 8), (8, 10), (10, 11)]
    assert log_bucket_bounds(0) == []


@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_loglinear_is_grm_while_a_token_sees_one_cache(rule):
    inp = make(rule, 30, seed=14, requires_grad=True)
    kw = dict(segments=[13, 17], chunk_size=8)
    o_grm, g_grm = output_and_grads(inp, aggregation="grm", **kw)
    o_log, g_log = output_and_grads(inp, aggregation="loglinear", **kw)
    assert_close(o_log, o_grm, 1e-12, "o")
    for name, g in g_grm.items():
        assert (g is None) == (g_log[name] is None), name
        if g is not None:
            assert_close(g_log[name], g, 1e-12, f"grad {name}")
    # with two caches the buckets merge them: no longer grm (the check is not vacuous)
    kw = dict(segments=[10, 10, 10], chunk_size=8)
    assert rel_err(inp.run(aggregation="loglinear", **kw), inp.run(aggregation="grm", **kw)) > 1e-3


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_ssc_with_top_k_at_least_segments_equals_grm(rule, init):
    inp = make(rule, 40, seed=3, requires_grad=True)
    kw = dict(init=init, segment_size=8, chunk_size=16)  # 5 segments, at most 4 cached
    o_grm, g_grm = output_and_grads(inp, aggregation="grm", **kw)
    for top_k in (4, 5, 9):
        o, g = output_and_grads(inp, aggregation="ssc", top_k=top_k, **kw)
        assert_close(o, o_grm, 1e-12, f"ssc top_k={top_k} vs grm")
        for name, gr in g_grm.items():
            assert_close(g[name], gr, 1e-10, f"grad {name}, ssc top_k={top_k} vs grm")
    o1 = inp.run(aggregation="ssc", top_k=1, **kw)
    assert rel_err(o1, o_grm) > 1e-4  # routing to fewer caches changes the output


@pytest.mark.parametrize(
    "seg", [dict(segment_size=8), dict(segments=[7, 20, 3, 7]), dict(segments="log")]
)
@pytest.mark.parametrize("with_s0", [True, False])
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_none_continuous_equals_linear_memory(rule, with_s0, seg):
    inp = make(rule, 37, seed=4, with_s0=with_s0)
    o = inp.run(aggregation="none", init="continuous", chunk_size=16, **seg)
    o_lin, _ = inp.linear(chunk_size=16)
    assert_close(o, o_lin, 1e-12, "o")


@pytest.mark.parametrize("seg", [dict(segment_size=8), dict(segments=[7, 20, 3, 7])])
@pytest.mark.parametrize("with_s0", [True, False])
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_none_independent_is_linear_memory_per_segment(rule, with_s0, seg):
    inp = make(rule, 37, seed=5, with_s0=with_s0)
    o = inp.run(aggregation="none", init="independent", chunk_size=16, **seg)
    bounds = [0, *itertools.accumulate(segment_lengths(37, **seg))]
    for a, b in itertools.pairwise(bounds):
        o_seg, _ = inp.part(a, b).linear(chunk_size=16)
        assert_close(o[:, a:b], o_seg, 1e-12, f"segment {a}:{b}")
    # continuing the memory across segments gives another output (the check is not vacuous)
    o_lin, _ = inp.linear(chunk_size=16)
    assert rel_err(o[:, 8:], o_lin[:, 8:]) > 1e-3


# --------------------------------------------------------------------------------------------
# 3. causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_future_tokens_do_not_change_past_outputs(rule, aggregation, init):
    T = 45
    inp, other = make(rule, T, seed=6), make(rule, T, seed=7)
    for seg in (dict(segment_size=8), dict(segments=[7, 20, 3, 15])):
        kw = dict(aggregation=aggregation, init=init, chunk_size=16, top_k=2, **seg)
        o = inp.run(**kw)
        # t0 inside a segment, at a segment start, and right after one
        for t0 in (19, 27, 31, 40):
            o_mix = mix(inp, other, t0).run(**kw)
            past, now = o_mix[:, :t0], o[:, :t0]
            assert torch.equal(past, now) or rel_err(past, now) < 1e-12, f"{seg}, t0={t0}"
            assert rel_err(o_mix[:, t0:], o[:, t0:]) > 1e-3


def _past_loss_run(named: dict, rule: str, t0: int, **kw):
    """o, the cache and the gradients of a random functional of the outputs before t0."""
    gates = {n: x for n, x in named.items() if n in RULE_GATES[rule]}
    o, cache = memory_caching(
        named["q"],
        named["k"],
        named["v"],
        named["u"],
        rule=rule,
        **gates,
        initial_state=named["initial_state"],
        output_cache=True,
        **kw,
    )
    w = torch.randn(o[:, :t0].shape, generator=torch.Generator().manual_seed(5), dtype=o.dtype)
    grads = torch.autograd.grad((o[:, :t0] * w).sum(), list(named.values()), allow_unused=True)
    return o.detach(), cache, dict(zip(named, grads, strict=True))


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_nan_in_future_tokens_does_not_reach_the_past(rule, aggregation, init):
    """NaN at tokens >= t0 of one input: the outputs before t0 and the gradients of a loss on
    them are those of the clean run, and the outputs from t0 on are NaN. t0 = 12 lies in the
    chunk [8, 16) after the segment end 10, whose cached state those tokens read."""
    T, t0 = 29, 12
    kw = dict(aggregation=aggregation, init=init, segment_size=5, chunk_size=8, top_k=2)
    inp = make(rule, T, seed=8, requires_grad=True)
    clean = inp.leaves()
    o, _, grads = _past_loss_run(clean, rule, t0, **kw)
    for poisoned in ("v", "k", "q", "u") if aggregation in GATED else ("v", "k", "q"):
        bad = {**clean, poisoned: nan_from(clean[poisoned], t0)}
        o_bad, cache, grads_bad = _past_loss_run(bad, rule, t0, **kw)
        assert_finite_and_equal(o_bad[:, :t0], o[:, :t0], f"{poisoned}: outputs before t0")
        assert torch.isnan(o_bad[:, t0:]).all(), poisoned
        for name, g in grads.items():
            if g is None:  # u when the aggregation does not read it
                assert grads_bad[name] is None
            else:
                assert_finite_and_equal(grads_bad[name], g, f"{poisoned}: grad {name}")
        # a corrupt memory stays corrupt: the cache a stream continues from is NaN
        corrupt = poisoned in ("k", "v")
        assert torch.isnan(cache.online_state).all() == corrupt, poisoned
        assert torch.isfinite(cache.online_state).all() != corrupt, poisoned


@pytest.mark.parametrize("aggregation", ["none", "grm"])
def test_nan_gates_do_not_reach_the_past(aggregation):
    """A NaN gate is a failed activation, carried causally like a NaN key or value."""
    T, t0 = 29, 12
    kw = dict(aggregation=aggregation, segment_size=5, chunk_size=8)
    clean = make("swla", T, seed=8, requires_grad=True).leaves()
    o, _, grads = _past_loss_run(clean, "swla", t0, **kw)
    for poisoned in RULE_GATES["swla"]:
        bad = {**clean, poisoned: nan_from(clean[poisoned], t0)}
        o_bad, _, grads_bad = _past_loss_run(bad, "swla", t0, **kw)
        assert_finite_and_equal(o_bad[:, :t0], o[:, :t0], f"{poisoned}: outputs before t0")
        assert torch.isnan(o_bad[:, t0:]).all()
        for name, g in grads.items():
            if g is not None:
                assert_finite_and_equal(grads_bad[name], g, f"{poisoned}: grad {name}")


def test_nan_in_a_prefill_makes_the_continued_stream_nan():
    inp = make("gated_delta", 20, seed=9)
    inp.v[:, 15] = float("nan")
    kw = dict(aggregation="grm", segment_size=4)
    o, cache = inp.part(0, 18).run(output_cache=True, **kw)
    assert torch.isfinite(o[:, :15]).all() and torch.isnan(o[:, 15:]).all()
    o2 = inp.part(18, 20).run(with_state=False, cache=cache, **kw)
    assert torch.isnan(o2).all()


# --------------------------------------------------------------------------------------------
# 4. streaming == parallel
# --------------------------------------------------------------------------------------------

STREAM_T = 40
STREAM_SEGMENTATIONS = {
    "size7": dict(segment_size=7),
    "list": dict(segments=[5, 17, 3, 1, 14]),
}


def stream(inp: Inputs, cuts, **kw):
    """Feed inp in pieces [0, c1), [c1, c2), ...; returns (concatenated outputs, final cache)."""
    outs, cache = [], None
    for a, b in itertools.pairwise([0, *cuts, inp.T]):
        part = inp.part(a, b)
        if cache is None:  # a new stream: takes the initial state
            o, cache = part.run(output_cache=True, **kw)
        else:  # a continued stream: its state comes from the cache
            o, cache = part.run(with_state=False, cache=cache, output_cache=True, **kw)
        assert cache.seen_tokens == b
        outs.append(o)
    return torch.cat(outs, dim=1), cache


def check_final_cache(cache, inp: Inputs, aggregation, init, lengths, chunk_size=16):
    assert isinstance(cache, MemoryCache)
    assert cache.seen_tokens == inp.T
    # finished segments are cached; the last one stays open (the plain RNN caches nothing)
    assert cache.num_cached == (0 if aggregation == "none" else len(lengths) - 1)
    assert cache.segment_tokens == lengths[-1]
    if init == "continuous":
        _, final = inp.linear(chunk_size=chunk_size)
    else:
        _, final = inp.part(inp.T - lengths[-1], inp.T).linear(chunk_size=chunk_size)
    assert cache.online_state.shape == final.shape
    assert_close(cache.online_state, final, 1e-10, "online state")


def random_cuts(rng: random.Random, T: int) -> list[int]:
    """2 to 7 increasing cut points in 1..T-1 (pieces of length 1 and across segments)."""
    return sorted(rng.sample(range(1, T), rng.randint(2, 7)))


@pytest.mark.parametrize("seg", list(STREAM_SEGMENTATIONS))
@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_streaming_equals_parallel(rule, aggregation, init, seg):
    T = STREAM_T
    seg_kw = STREAM_SEGMENTATIONS[seg]
    lengths = segment_lengths(T, **seg_kw)
    inp = make(rule, T, seed=9)
    kw = dict(aggregation=aggregation, init=init, top_k=2, chunk_size=4, **seg_kw)
    o_par, cache_par = inp.run(output_cache=True, **kw)
    assert_close(o_par, inp.run(**kw), 1e-14, "o with and without output_cache")
    check_final_cache(cache_par, inp, aggregation, init, lengths)

    # (a) prefill 13 tokens, then decode token by token
    o_dec, cache_dec = stream(inp, list(range(13, T)), **kw)
    assert_close(o_dec, o_par, 1e-10, "prefill + decode vs parallel")
    check_final_cache(cache_dec, inp, aggregation, init, lengths)

    # (b) arbitrary pieces
    rng = random.Random(f"{rule}-{aggregation}-{init}-{seg}")
    for _ in range(2):
        cuts = random_cuts(rng, T)
        o_str, cache_str = stream(inp, cuts, **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")
        check_final_cache(cache_str, inp, aggregation, init, lengths)


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", ["gated_delta", "swla"])
def test_streaming_log_segments_equals_parallel(rule, aggregation, init):
    T = 37  # [32, 4, 1]
    inp = make(rule, T, seed=10)
    kw = dict(aggregation=aggregation, init=init, top_k=1, chunk_size=8)
    o_par = inp.run(segments="log", **kw)
    kw["segments"] = log_segments(T)
    assert kw["segments"] == [32, 4, 1]
    o_dec, cache = stream(inp, list(range(20, T)), **kw)
    assert_close(o_dec, o_par, 1e-10, "prefill + decode vs parallel")
    check_final_cache(cache, inp, aggregation, init, [32, 4, 1], chunk_size=8)
    for cuts in ([32, 36], [5, 33], [31, 35]):
        o_str, cache = stream(inp, cuts, **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")
        check_final_cache(cache, inp, aggregation, init, [32, 4, 1], chunk_size=8)


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", ["gated_delta", "swla"])
def test_gradients_through_streaming_equal_parallel(rule, aggregation, init):
    T = 30
    inp = make(rule, T, seed=11, requires_grad=True)
    kw = dict(aggregation=aggregation, init=init, top_k=1, segment_size=4, chunk_size=4)
    named = inp.leaves()
    w = torch.randn(2, T, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g_par = torch.autograd.grad((inp.run(**kw) * w).sum(), list(named.values()), allow_unused=True)
    o, _ = stream(inp, [9, 17, 22, *range(23, T)], **kw)  # pieces, then decode steps
    g_str = torch.autograd.grad((o * w).sum(), list(named.values()), allow_unused=True)
    for name, gs, gp in zip(named, g_str, g_par, strict=True):
        if gp is None:
            assert gs is None or not gs.any(), f"grad {name}"
        else:
            assert_close(gs, gp, 1e-10, f"grad {name}")


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "residual"])
def test_cache_index_select_continues_the_selected_rows(aggregation):
    T, t = 30, 13
    inp = make("swla", T, seed=12, b=3)
    kw = dict(aggregation=aggregation, init="independent", segment_size=4, chunk_size=4)
    _, cache = inp.part(0, t).run(output_cache=True, **kw)
    rest = inp.part(t, T)
    o_all = rest.run(with_state=False, cache=cache, **kw)
    index = torch.tensor([2, 0])
    picked = Inputs(
        rest.rule,
        *(x[index] for x in (rest.q, rest.k, rest.v, rest.u)),
        {n: x[index] for n, x in rest.gates.items()},
        None,
    )
    o_pick = picked.run(with_state=False, cache=cache.index_select(index), **kw)
    assert_close(o_pick, o_all[index], 1e-12, "o of the selected rows")


# --------------------------------------------------------------------------------------------
# 5. property test
# --------------------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_fast_matches_reference_and_streaming_property(data):
    rule = data.draw(st.sampled_from(LINEAR_RULES), "rule")
    aggregation, init = data.draw(st.sampled_from(aggregation_inits(AGGREGATIONS)), "agg, init")
    T = data.draw(st.integers(1, 60), "T")
    if data.draw(st.booleans(), "constant segments"):
        seg = dict(segment_size=data.draw(st.integers(1, 20), "segment_size"))
    else:
        cuts = sorted(data.draw(st.sets(st.integers(1, T - 1)), "segment cuts")) if T > 1 else []
        seg = dict(segments=[b - a for a, b in itertools.pairwise([0, *cuts, T])])
    top_k = data.draw(st.integers(1, 4), "top_k")
    chunk_size = data.draw(st.integers(1, 16), "chunk_size")
    # Dk = 1 makes unit keys +-1, so ssc scores tie exactly: ties must break alike everywhere
    Dk, Dv = data.draw(st.integers(1, 6), "Dk"), data.draw(st.integers(1, 6), "Dv")
    seed = data.draw(st.integers(0, 2**16), "seed")
    inp = make(rule, T, Dk, Dv, seed=seed, b=1)
    kw = dict(aggregation=aggregation, init=init, top_k=top_k, **seg)

    o = inp.run(chunk_size=chunk_size, **kw)
    assert_close(o, inp.run(impl="reference", **kw), TOL64, "fast vs reference")

    stream_cuts = sorted(data.draw(st.sets(st.integers(1, T - 1)), "stream cuts")) if T > 1 else []
    o_str, cache = stream(inp, stream_cuts, chunk_size=chunk_size, **kw)
    assert_close(o_str, o, 1e-10, f"streaming cut at {stream_cuts} vs parallel")
    assert cache.seen_tokens == T


def test_ssc_ties_are_broken_the_same_way_everywhere():
    inp = make("decay", 40, 4, 3, seed=0, b=1)
    inp.k = inp.k.clone()
    inp.k[:, :32] = 0  # e.g. padding: the first 8 segments have summary 0
    kw = dict(aggregation="ssc", top_k=2, segment_size=4)
    o_par = inp.run(chunk_size=4, **kw)
    o_str, _ = stream(inp, list(range(5, 40)), chunk_size=4, **kw)
    assert_close(o_par, inp.run(impl="reference", **kw), TOL64, "fast vs reference")
    assert_close(o_str, o_par, 1e-10, "decode vs parallel")


# --------------------------------------------------------------------------------------------
# 6. bad input
# --------------------------------------------------------------------------------------------


def _good(aggregation="grm", T=6):
    inp = make("gated_delta", T, 4, 5, seed=0, b=2, h=3, dtype=torch.float32)
    return dict(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        u=inp.u,
        rule="gated_delta",
        **inp.gates,
        initial_state=inp.s0,
        aggregation=aggregation,
        segment_size=4,
    )


def _with(aggregation="grm", drop=(), **changes):
    kw = _good(aggregation)
    for name in drop:
        kw.pop(name)
    kw.update(changes)
    return kw


def arg(name: str) -> str:
    """A message that starts with the argument's name."""
    return r"^" + re.escape(name) + r"\b"


ONE_OF = r"\bsegment_size\b.*\bsegments\b"  # names both alternatives

BAD_INPUTS = {
    "top_k 0": (arg("top_k"), lambda: _with("ssc", top_k=0)),
    "top_k float": (arg("top_k"), lambda: _with("ssc", top_k=1.5)),
    "segment_size 0": (arg("segment_size"), lambda: _with(segment_size=0)),
    "segments not summing to T": (
        arg("segments"),
        lambda: _with(drop=["segment_size"], segments=[2, 3]),
    ),
    "segments too long": (arg("segments"), lambda: _with(drop=["segment_size"], segments=[4, 4])),
    "segments with a 0": (
        arg("segments"),
        lambda: _with(drop=["segment_size"], segments=[3, 0, 3]),
    ),
    "segments empty": (arg("segments"), lambda: _with(drop=["segment_size"], segments=[])),
    "segments unknown string": (
        arg("segments"),
        lambda: _with(drop=["segment_size"], segments="lin"),
    ),
    "segment_size and segments": (ONE_OF, lambda: _with(segments=[3, 3])),
    "neither segment_size nor segments": (ONE_OF, lambda: _with(drop=["segment_size"])),
    "unknown aggregation": (arg("aggregation"), lambda: _with(aggregation="attention")),
    "unknown init": (arg("init"), lambda: _with(init="random")),
    "unknown summary": (arg("summary"), lambda: _with(summary="max")),
    "u missing grm": (arg("u"), lambda: _with("grm", u=None)),
    "u missing soup": (arg("u"), lambda: _with("soup", u=None)),
    "u missing ssc": (arg("u"), lambda: _with("ssc", u=None)),
    "u missing loglinear": (arg("u"), lambda: _with("loglinear", u=None)),
    "loglinear with independent init": (
        arg("aggregation"),
        lambda: _with("loglinear", init="independent"),
    ),
    "u wrong shape": (arg("u"), lambda: _with(u=torch.randn(2, 6, 3, 5))),
    "u wrong rank": (arg("u"), lambda: _with(u=torch.randn(2, 6, 12))),
    "gate_scale 0": (arg("gate_scale"), lambda: _with(gate_scale=0.0)),
    "gate_scale negative": (arg("gate_scale"), lambda: _with(gate_scale=-0.5)),
    "gate_scale nan": (arg("gate_scale"), lambda: _with(gate_scale=float("nan"))),
    "initial_state wrong shape": (
        arg("initial_state"),
        lambda: _with(initial_state=torch.zeros(2, 3)),
    ),
    "reference with output_cache": (
        arg("impl"),
        lambda: _with(impl="reference", output_cache=True),
    ),
    "unknown impl": (arg("impl"), lambda: _with(impl="triton")),
    "chunk_size 0": (arg("chunk_size"), lambda: _with(chunk_size=0)),
    "g missing": (arg("g"), lambda: _with(g=None)),
    "no heads": (
        arg("q"),
        lambda: _with(
            q=torch.randn(2, 6, 0, 4), k=torch.randn(2, 6, 0, 4), v=torch.randn(2, 6, 0, 5)
        ),
    ),
    "Dk 0": (arg("q"), lambda: _with(q=torch.randn(2, 6, 3, 0), k=torch.randn(2, 6, 3, 0))),
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
def test_good_inputs_of_bad_input_table_run(aggregation):
    o = _call(_with(aggregation))
    assert o.shape == (2, 6, 3, 5)
    _, cache = _call(_with(aggregation, drop=["segment_size"], segments=[4, 4], output_cache=True))
    assert cache.seen_tokens == 6
    if aggregation not in GATED:  # u is ignored
        assert torch.equal(_call(_with(aggregation, u=None)), o)


def _continue(cache, aggregation="grm", b=2, T=3, dtype=torch.float32, **changes):
    inp = make("gated_delta", T, 4, 5, seed=1, b=b, h=3, dtype=dtype)
    kw = dict(rule="gated_delta", aggregation=aggregation, cache=cache)
    if "segments" not in changes:
        kw["segment_size"] = 4
    kw.update(changes)
    return memory_caching(inp.q, inp.k, inp.v, inp.u, **inp.gates, **kw)


@pytest.fixture
def grm_cache():
    _, cache = _call(_with("grm", output_cache=True))
    return cache


@pytest.mark.parametrize(
    "changes",
    [
        dict(aggregation="ssc"),
        dict(aggregation="none"),
        dict(b=1),
        dict(init="independent"),
        dict(segment_size=5),
        dict(summary="sum"),
        dict(gate_scale=0.3),
        dict(dtype=torch.float64),  # the cache holds float32 states
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_cache_of_another_configuration_is_rejected(grm_cache, changes):
    _continue(grm_cache)  # the same configuration continues
    with pytest.raises(ValueError, match=r"^cache\b"):
        _continue(grm_cache, **changes)


@pytest.mark.parametrize("T", [1, 3])
def test_cache_in_float32_continued_in_bfloat16_runs(grm_cache, T):
    # bf16 inputs compute in float32 (as under autocast): the same states
    o = _continue(grm_cache, T=T, dtype=torch.bfloat16)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_batch_gives_empty_outputs_and_cache(aggregation):
    inp = make("swla", 11, b=0, requires_grad=True)
    kw = dict(aggregation=aggregation, segment_size=4, chunk_size=4, top_k=2)
    o, cache = inp.run(output_cache=True, **kw)
    assert o.shape == (0, 11, H, 4)
    assert cache.seen_tokens == 11 and cache.config.batch_size == 0
    assert cache.online_state.shape == (0, H, 4, 5)
    assert cache.num_cached == (0 if aggregation == "none" else 2)
    o.sum().backward()
    assert all(x.grad is None or x.grad.shape == x.shape for x in inp.leaves().values())
    for a, b in ((11, 12), (12, 15)):  # a decode step, then a chunk
        part = make("swla", 15, b=0).part(a, b)
        o, cache = part.run(with_state=False, cache=cache, output_cache=True, **kw)
        assert o.shape == (0, b - a, H, 4) and cache.seen_tokens == b


def test_cache_must_be_a_memory_cache():
    with pytest.raises(ValueError, match=r"^cache\b"):
        _continue({"states": None})


def test_initial_state_with_cache_is_rejected(grm_cache):
    s0 = torch.zeros(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"^initial_state\b"):
        _continue(grm_cache, initial_state=s0)


def test_reference_takes_no_cache(grm_cache):
    with pytest.raises(ValueError, match=r"^impl\b"):
        _continue(grm_cache, impl="reference")


def test_stream_past_explicit_segments_is_rejected():
    plan = dict(drop=["segment_size"], segments=[4, 6])  # 10 tokens
    _, cache = _call(_with("grm", output_cache=True, **plan))  # 6 tokens: fine
    o, _ = _continue(cache, T=4, segments=[4, 6], output_cache=True)  # 10 tokens: fine
    assert o.shape == (2, 4, 3, 5)
    with pytest.raises(ValueError, match=r"^segments\b"):
        _continue(cache, T=5, segments=[4, 6])  # 11 tokens
    with pytest.raises(ValueError, match=r"^segments\b"):  # a new stream longer than the plan
        _call(_with("grm", output_cache=True, drop=["segment_size"], segments=[2, 3]))


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "residual", "none"])
def test_cache_nbytes(aggregation):
    T, Dk, Dv = 30, 4, 5
    inp = make("swla", T, Dk, Dv, seed=2, b=2, h=3)
    kw = dict(aggregation=aggregation, segment_size=4)
    _, cache = inp.part(0, 2).run(output_cache=True, **kw)
    history = []
    for t in range(2, T):
        _, cache = inp.part(t, t + 1).run(with_state=False, cache=cache, output_cache=True, **kw)
        total = sum(x.numel() * x.element_size() for x in cache_tensors(cache))
        assert cache.nbytes() == total
        history.append((cache.num_cached, cache.nbytes()))
    assert history[-1][0] == (0 if aggregation == "none" else 7)
    per_segment = 2 * 3 * (Dk * Dv + Dk) * 8  # one [Dv, Dk] state and one [Dk] summary per head
    (n0, bytes0) = history[0]
    for n, nbytes in history:
        assert nbytes == bytes0 + (n - n0) * per_segment, (n, nbytes)


def test_cache_does_not_keep_prefill_sized_buffers():
    inp = make("swla", 400, 8, 8, seed=3, b=1, dtype=torch.float32)
    _, cache = inp.run(output_cache=True, aggregation="grm", segment_size=64)
    pinned = []
    for f in dataclasses.fields(cache):
        x = getattr(cache, f.name)
        for t in x if isinstance(x, tuple) else (x,):
            if isinstance(t, torch.Tensor):
                own, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
                if held != own:
                    pinned.append(f"{f.name} {tuple(t.shape)}: {own} bytes, keeps {held} alive")
    assert not pinned, "; ".join(pinned)


# --------------------------------------------------------------------------------------------
# 7. bf16 autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "aggregation", "init"),
    [("gated_delta", a, i) for a, i in aggregation_inits(AGGREGATIONS)]
    + [(r, "grm", i) for r in LINEAR_RULES if r != "gated_delta" for i in INITS],
)
def test_autocast_bf16_with_fp32_inputs(rule, aggregation, init):
    inp = make(rule, 40, 24, 40, seed=13, dtype=torch.float32)
    kw = dict(aggregation=aggregation, init=init, segment_size=16, chunk_size=8)
    o_ref, cache_ref = inp.run(output_cache=True, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, cache = inp.run(output_cache=True, **kw)
    assert o.dtype == torch.float32
    assert_close(o, o_ref, 1e-5, "o")
    for x in cache_tensors(cache):
        assert x.dtype == torch.float32
    assert_close(cache.online_state, cache_ref.online_state, 1e-5, "online state")
    if aggregation != "none":
        assert cache.num_cached == 2


# --------------------------------------------------------------------------------------------
# 8. memory bound of the backward pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "residual"])
def test_backward_keeps_no_per_token_read_of_every_cache(aggregation):
    Bm, T, Hm, D, size = 1, 2048, 2, 16, 64
    N = T // size
    inp = make("gated_delta", T, D, D, seed=14, b=Bm, h=Hm, dtype=torch.float32)
    for x in inp.leaves().values():
        x.requires_grad_(True)
    largest = [0]

    def pack(x):
        largest[0] = max(largest[0], x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        o = inp.run(aggregation=aggregation, segment_size=size, top_k=2)
        o.square().sum().backward()
    assert largest[0] >= Bm * T * Hm * D  # the hook saw the inputs: it is not vacuous
    assert largest[0] < Bm * Hm * T * N * D, f"largest saved tensor has {largest[0]} elements"
    if aggregation != "residual":  # the gate queries were part of the graph
        assert inp.u.grad is not None and inp.u.grad.abs().sum() > 0
