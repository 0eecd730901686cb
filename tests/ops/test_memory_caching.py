"""Tests of growmem.ops.memory_caching over every memory backend and every aggregation.

Every test runs on the matrix memories (linear, decay, delta, gated_delta, swla) and on the MLP
memories (dla, titans) unless it checks something only one of them has. The fast path
(impl="chunk") is checked against the per-token reference (impl="reference") in float64:
outputs and every gradient. Then the identities of docs/design.md §3, causality (NaN included),
streaming == parallel, the cache (contents, size, batch rows), bad input, autocast, bounds on
what the backward keeps, the deprecated keyword form and a third, test-only backend.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from growmem.ops import (
    Caching,
    DeepMemory,
    DeepState,
    MatrixMemory,
    MemoryCache,
    deep_memory,
    linear_memory,
    log_segments,
    memory_caching,
    memory_spec,
)
from growmem.ops.aggregations import AGGREGATIONS
from growmem.ops.aggregations import aggregation as declared
from growmem.ops.caching import backend as backend_module
from growmem.ops.caching.backend import MemoryBackend, Scanned, backend_for
from growmem.ops.caching.select import log_bucket_bounds, log_buckets
from growmem.ops.checks import LINEAR_RULES, check_gates
from growmem.ops.deep import DEEP_RULES
from growmem.ops.linear.naive import linear_step
from growmem.ops.spec import DEFAULT_GATE_NORM, GATE_NORMS, INITS
from tests.helpers import (
    OpInputs,
    aggregation_inits,
    arg,
    assert_close,
    assert_grads_close,
    call_op,
    make_gate_inputs,
    make_op_inputs,
    outputs_and_grads,
    poison_entries,
    rel_err,
    stream,
)

RULES = LINEAR_RULES + DEEP_RULES
AGG_INITS = aggregation_inits(AGGREGATIONS)
GATED = tuple(a for a in AGGREGATIONS if declared(a).gated)
B, H = 2, 2
TOL64 = 1e-9
MEMORY_KNOBS = ("chunk_size", "mini_batch", "norm", "max_grad_norm", "eps", "decay_to")
CACHING_KNOBS = ("aggregation", "segment_size", "segments", "top_k", "init", "summary")
GATE_KNOBS = ("gate_scale", "gate_norm", "detach_summaries")  # Caching's gate settings
# make()'s arguments for the gate inputs (temperature, online_bias, summary_keys)
GATE_INPUT_ARGS = ("temperature", "online_bias", "summary_keys")


def deep(rule: str) -> bool:
    return rule in DEEP_RULES


def make(rule: str, T: int, **kw) -> OpInputs:
    """Random inputs (float64 unless told; a deep memory's q unit-norm, as its layer makes it)."""
    kw.setdefault("normalize_q", deep(rule))
    return make_op_inputs(rule, T, **kw)


def run(inp: OpInputs, *, with_state: bool = True, **kw):
    """memory_caching on ``inp``: the knobs in ``kw`` go to the memory object, to ``Caching``
    or to the op itself (deep memories clamp their inner gradients at 1 unless told)."""
    knobs = {n: kw.pop(n) for n in MEMORY_KNOBS if n in kw}
    if deep(inp.rule):
        knobs.setdefault("max_grad_norm", 1.0)
        knobs.pop("chunk_size", None)
    else:
        knobs = {n: x for n, x in knobs.items() if n == "chunk_size"}
    caching = Caching(**{n: kw.pop(n) for n in (*CACHING_KNOBS, *GATE_KNOBS) if n in kw})
    return memory_caching(
        inp.q,
        inp.k,
        inp.v,
        inp.u,
        memory=memory_spec(inp.rule, **knobs),
        caching=caching,
        gates=inp.all_gates,
        init_weights=inp.init_weights,
        initial_state=inp.initial_state if with_state else None,
        **kw,
    )


def plain(inp: OpInputs, state="own", **knobs):
    """The memory without caching, linear_memory or deep_memory: (o, final state)."""
    initial = inp.initial_state if state == "own" else state
    if deep(inp.rule):
        knobs.setdefault("max_grad_norm", 1.0)
        return deep_memory(
            inp.q, inp.k, inp.v, rule=inp.rule, **inp.gates, init_weights=inp.init_weights,
            initial_state=initial, **knobs,
        )  # fmt: skip
    return linear_memory(inp.q, inp.k, inp.v, rule=inp.rule, **inp.gates, initial_state=initial)


def stream_run(inp: OpInputs, cuts, check=None, **kw):
    """inp fed in pieces cut at ``cuts``: the first call passes the initial state, later ones
    the cache; ``check(cache, seen)`` after every call. Returns (o, the final cache)."""

    def call(a, b, cache):
        part = inp.part(a, b)
        if cache is None:  # a new stream: takes the initial state
            o, cache = run(part, output_cache=True, **kw)
        else:  # a continued stream: its state comes from the cache
            o, cache = run(part, with_state=False, cache=cache, output_cache=True, **kw)
        assert isinstance(cache, MemoryCache) and cache.seen_tokens == b
        assert o.shape == (*part.q.shape[:3], part.v.shape[-1])
        if check is not None:
            check(cache, b)
        return o, cache

    return stream(call, cuts, inp.T)


def segment_lengths(T: int, segment_size=None, segments=None, **_) -> list[int]:
    """The segment lengths a plan gives T tokens."""
    if segments == "log":
        return log_segments(T)
    if segments is not None:
        return list(segments)
    return [segment_size] * (T // segment_size) + ([T % segment_size] if T % segment_size else [])


def check_fast_vs_reference(inp: OpInputs, **kw):
    """Fast path == reference: the output and every gradient, float64."""
    o_f, g_f = outputs_and_grads(lambda: run(inp, **kw), inp.leaves())
    o_r, g_r = outputs_and_grads(lambda: run(inp, impl="reference", **kw), inp.leaves())
    assert o_f.shape == (*inp.q.shape[:3], inp.v.shape[-1]) and o_f.dtype == torch.float64
    assert torch.isfinite(o_r).all()
    assert_close(o_f, o_r, TOL64, "o")
    assert set(g_r) == set(inp.leaves())
    assert_grads_close(g_f, g_r, TOL64, "fast vs reference:")
    for name in ("q", "k", "v"):  # the comparisons above are not vacuous
        assert g_r[name].abs().sum() > 0, f"reference gradient of {name} is zero"
    agg = kw.get("aggregation", "grm")
    if declared(agg).gated and len(segment_lengths(inp.T, **kw)) > 1:  # the gates matter
        assert g_r["u"] is not None and g_r["u"].abs().sum() > 0
        for name in inp.gate_inputs:  # and so do their own inputs (but stopped summaries)
            if name == "summary_keys" and kw.get("detach_summaries"):
                assert g_r[name] is None, "a gradient through detached summaries"
            else:
                assert g_r[name] is not None and g_r[name].abs().sum() > 0, name
    if not declared(agg).gated:
        assert g_r["u"] is None
        assert all(g_r[name] is None for name in inp.gate_inputs)


# --------------------------------------------------------------------------------------------
# 1. fast path vs per-token reference, float64, outputs + gradients
# --------------------------------------------------------------------------------------------

# Matrix memories: segments never align with chunks (size 8 in chunks of 16; 7, 20, 3, 20 in
# chunks of 4). MLP memories: size 8 / mini_batch 4 keeps every segment's grid deep_memory's;
# [7, 12, 10] / 3 restarts the grid mid-way (mini-batches 3 3 1 | 3 3 3 3 | 3 3 3 1).
LAYOUTS = {
    "matrix": [
        dict(T=37, segment_size=8, chunk_size=16),
        dict(T=50, segments=[7, 20, 3, 20], chunk_size=4),
    ],
    "deep": [
        dict(T=29, segment_size=8, mini_batch=4),
        dict(T=29, segments=[7, 12, 10], mini_batch=3),
    ],
}


def layout(rule: str, i: int) -> dict:
    return dict(LAYOUTS["deep" if deep(rule) else "matrix"][i])


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize(("aggregation", "init"), AGG_INITS)
@pytest.mark.parametrize("rule", RULES)
def test_fast_matches_reference(rule, aggregation, init, i):
    kw = layout(rule, i)
    T = kw.pop("T")
    seed = 17 * RULES.index(rule) + 3 * AGGREGATIONS.index(aggregation) + T + i
    inp = make(rule, T, seed=seed, requires_grad=True)
    check_fast_vs_reference(inp, aggregation=aggregation, init=init, **kw)


def _case(rule, agg, init, T, dims=None, with_state=True, normalize_q=None, **kw):
    name = f"{rule}-{agg}-{init}-T{T}-" + "-".join(
        f"{k}{v}".replace(" ", "") for k, v in kw.items()
    )
    name += (f"-D{dims}" if dims else "") + ("" if with_state else "-no_state")
    name += "" if normalize_q is None else f"-normalize_q{normalize_q}"
    extra = dict(with_state=with_state, **{n: kw.pop(n) for n in GATE_INPUT_ARGS if n in kw})
    if dims is not None:
        extra.update(dk=dims[0], dv=dims[1])
    if normalize_q is not None:
        extra.update(normalize_q=normalize_q)
    return pytest.param(rule, agg, init, T, extra, kw, id=name)


D_ODD = (24, 40)
EXTRA_CASES = [
    # --- matrix memories
    # odd head dims
    _case("gated_delta", "grm", "continuous", 63, D_ODD, segment_size=16, chunk_size=4),
    _case("swla", "ssc", "independent", 63, D_ODD, segment_size=8, chunk_size=16),
    _case("delta", "residual", "continuous", 63, D_ODD, segments=[5, 30, 1, 27], chunk_size=16),
    _case("decay", "soup", "independent", 37, D_ODD, segments="log", chunk_size=4),
    # logarithmic segments: 37 -> [32, 4, 1], 63 -> [32, 16, 8, 4, 2, 1]
    _case("gated_delta", "grm", "continuous", 37, segments="log", chunk_size=16),
    _case("swla", "ssc", "independent", 63, segments="log", chunk_size=4),
    _case("linear", "mean", "independent", 63, segments="log", chunk_size=16),
    _case("delta", "residual", "continuous", 37, segments="log", chunk_size=4),
    _case("decay", "ssc", "continuous", 63, segments="log", chunk_size=16),
    # summary = sum; gate_scale
    _case("gated_delta", "grm", "continuous", 37, summary="sum", segment_size=8, chunk_size=16),
    _case("swla", "ssc", "independent", 37, summary="sum", segment_size=8, chunk_size=4),
    _case("linear", "soup", "continuous", 37, summary="sum", segments=[7, 20, 3, 7]),
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
    _case("gated_delta", "grm", "independent", 37, None, False, segment_size=8, chunk_size=4),
    _case("swla", "residual", "continuous", 37, None, False, segment_size=8, chunk_size=16),
    _case("delta", "ssc", "independent", 37, None, False, segments=[7, 20, 3, 7]),
    # --- MLP memories
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
    # odd head dims (Dv = Dk for an MLP memory)
    _case("titans", "grm", "continuous", 29, (24, 24), segment_size=8, mini_batch=4),
    _case("dla", "ssc", "independent", 29, (24, 24), segments=[7, 12, 10], mini_batch=3),
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
    # q not normalised
    _case("titans", "soup", "continuous", 29, normalize_q=False, segment_size=8, mini_batch=4),
    _case("dla", "grm", "independent", 29, normalize_q=False, segments=[7, 12, 10], mini_batch=3),
    _case(
        "titans", "ssc", "continuous", 29, normalize_q=False, top_k=1, segment_size=8, mini_batch=3
    ),
    # no clamp of the inner gradients
    _case("titans", "soup", "continuous", 29, max_grad_norm=None, segment_size=8, mini_batch=4),
    _case("dla", "grm", "independent", 29, max_grad_norm=None, segments=[7, 12, 10], mini_batch=3),
    # no initial state
    _case("titans", "soup", "independent", 29, None, False, segments=[7, 12, 10], mini_batch=3),
    _case("dla", "grm", "continuous", 29, None, False, segment_size=8, mini_batch=4),
    _case("titans", "ssc", "independent", 29, None, False, segment_size=8, mini_batch=3),
    _case("dla", "mean", "independent", 29, None, False, segments=[7, 12, 10], mini_batch=3),
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
            ("ssc", "continuous", {}),
            ("mean", "independent", {"norm": False}),
        ]
    ),
]


# The gates' options (docs/design.md §3.2), alone and together, on both backends and every
# gated aggregation, with up to 9 caches (loglinear: buckets of 8 and 1).
GATE_OPTIONS = [
    dict(gate_norm="none"),  # the cases without gate options have the default geometry
    dict(gate_norm="centered"),
    dict(gate_norm="centered", summary="sum"),
    dict(detach_summaries=True),
    dict(temperature="token", online_bias="token"),
    dict(summary_keys=True, detach_summaries=True),
    dict(gate_norm="l2", gate_scale=1.0, temperature="head", online_bias="head", summary_keys=True),
    dict(gate_norm="centered", temperature="head", online_bias="head", summary_keys=True),
]


def _gate_cases() -> list:
    """Each of GATE_OPTIONS with each gated aggregation, on a matrix and an MLP memory (two
    rules of each, alternating), the inits alternating too."""
    cases = []
    for j, options in enumerate(GATE_OPTIONS):
        for a, agg in enumerate(GATED):
            for rule, T, shift in (("gated_delta", 37, 0), ("titans", 29, 1)):
                rule = {"gated_delta": "delta", "titans": "dla"}[rule] if j % 2 else rule
                init = "continuous" if agg == "loglinear" else INITS[(j + a + shift) % 2]
                knobs = dict(segment_size=4, chunk_size=8, mini_batch=3)
                cases.append(_case(rule, agg, init, T, **knobs, **options))
    return cases


GATE_CASES = _gate_cases()


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "T", "extra", "kw"), EXTRA_CASES + GATE_CASES
)
def test_fast_matches_reference_more(rule, aggregation, init, T, extra, kw):
    inp = make(rule, T, seed=T + 7, requires_grad=True, **extra)
    check_fast_vs_reference(inp, aggregation=aggregation, init=init, **kw)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", ["gated_delta", "titans"])
def test_float32_fast_matches_float64_reference(rule, aggregation, device):
    dims = dict(dk=24, dv=40) if rule == "gated_delta" else dict(dk=8, dh=32)
    inp = make(rule, 40, seed=8, **dims)
    kw = dict(aggregation=aggregation, segments=[11, 16, 13], mini_batch=4)
    o_r = run(inp, impl="reference", **kw)
    o = run(inp.to(torch.float32, device), chunk_size=16, **kw)  # (CUDA when present)
    assert o.dtype == torch.float32 and o.device.type == device.type
    assert_close(o.cpu(), o_r, 1e-4, "o")


@pytest.mark.parametrize(("aggregation", "init"), AGG_INITS)
def test_chunk_size_does_not_change_results(aggregation, init):
    inp = make("swla", 45, seed=4)
    kw = dict(aggregation=aggregation, init=init, segments=[10, 3, 20, 12])
    results = [run(inp, chunk_size=c, **kw) for c in (1, 5, 7, 64)]
    for o in results[:-1]:
        assert_close(o, results[-1], 1e-12, "o")


# --------------------------------------------------------------------------------------------
# 2. identities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seg", [dict(segment_size=29), dict(segment_size=64), dict(segments=[29])])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_one_segment_every_aggregation_equals_none(rule, init, seg):
    inp = make(rule, 29, seed=1)
    kw = dict(init=init, chunk_size=8, mini_batch=4)
    base = run(inp, aggregation="none", **kw, **seg)
    others = [a for a, i in aggregation_inits(AGGREGATIONS[1:]) if i == init]
    for agg in others:
        assert_close(run(inp, aggregation=agg, **kw, **seg), base, 1e-12, f"{agg}, one segment")
    # two segments: the aggregations are no longer the plain memory (the check is not vacuous)
    for agg in others:
        assert rel_err(run(inp, aggregation=agg, segment_size=16, **kw), base) > 1e-3, agg


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_soup_is_grm_exactly_when_reads_are_linear_in_the_memory(rule, init):
    """Memory Soup mixes the memories' parameters, GRM their reads: on a matrix memory (read
    S q, linear in S) the two are one model, on an MLP memory two different ones."""
    inp = make(rule, 29, seed=2)
    kw = dict(init=init, segments=[7, 12, 1, 9], chunk_size=8, mini_batch=3)
    grm, soup = (run(inp, aggregation=a, **kw) for a in ("grm", "soup"))
    grm_r, soup_r = (run(inp, aggregation=a, impl="reference", **kw) for a in ("grm", "soup"))
    assert_close(soup, soup_r, TOL64, "soup vs reference")
    if backend_for(memory_spec(rule)).linear:
        assert_close(soup, grm, 1e-12, "soup vs grm (fast path)")
        # the reference mixes the parameters: the identity itself, not a shared kernel
        assert_close(soup_r, grm_r, 1e-12, "soup vs grm (reference)")
    else:
        assert rel_err(soup, grm) > 1e-3 and rel_err(soup_r, grm_r) > 1e-3
        # tokens of the first segment see no cache: there the two agree
        assert_close(soup[:, :7], grm[:, :7], 1e-12, "first segment")
    assert rel_err(grm, run(inp, aggregation="mean", **kw)) > 1e-3  # the gates matter


def test_soup_equals_grm_when_all_memories_are_equal():
    """With all-equal cached and online weights (eta = 0, continuous: every memory is the
    initial MLP) the parameter mix is that MLP, so soup = grm = none on MLP memories too."""
    inp = make("dla", 29, seed=3, with_state=False)
    inp.gates["eta"] = torch.zeros_like(inp.gates["eta"])
    kw = dict(init="continuous", segment_size=8, mini_batch=4)
    none = run(inp, aggregation="none", **kw)
    assert_close(run(inp, aggregation="soup", **kw), none, 1e-12, "soup")
    assert_close(run(inp, aggregation="grm", **kw), none, 1e-12, "grm")


def test_log_buckets_are_the_binary_decomposition():
    n = torch.arange(71)
    start, end, valid = log_buckets(n, 7)
    for i in range(71):
        present = zip(start[i].tolist(), end[i].tolist(), valid[i].tolist(), strict=True)
        slots = sorted((a, b) for a, b, ok in present if ok)
        assert slots == log_bucket_bounds(i), i
    assert log_bucket_bounds(11) == [(0, 8), (8, 10), (10, 11)]
    assert log_bucket_bounds(0) == []


@pytest.mark.parametrize("rule", RULES)
def test_loglinear_is_grm_while_a_token_sees_one_cache(rule):
    inp = make(rule, 30, seed=14, requires_grad=True)
    kw = dict(segments=[13, 17], chunk_size=8, mini_batch=4)
    o_grm, g_grm = outputs_and_grads(lambda: run(inp, aggregation="grm", **kw), inp.leaves())
    o_log, g_log = outputs_and_grads(lambda: run(inp, aggregation="loglinear", **kw), inp.leaves())
    assert_close(o_log, o_grm, 1e-12, "o")
    assert_grads_close(g_log, g_grm, 1e-12)
    # with two caches the buckets merge them: no longer grm (the check is not vacuous)
    kw = dict(segments=[10, 10, 10], chunk_size=8, mini_batch=4)
    assert (
        rel_err(run(inp, aggregation="loglinear", **kw), run(inp, aggregation="grm", **kw)) > 1e-3
    )


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_ssc_with_top_k_at_least_segments_equals_grm(rule, init):
    inp = make(rule, 37, seed=3, requires_grad=True)
    kw = dict(init=init, segment_size=8, chunk_size=16, mini_batch=4)  # 5 segments, 4 cached
    o_grm, g_grm = outputs_and_grads(lambda: run(inp, aggregation="grm", **kw), inp.leaves())
    for top_k in (4, 5, 9):
        o, g = outputs_and_grads(
            lambda top_k=top_k: run(inp, aggregation="ssc", top_k=top_k, **kw), inp.leaves()
        )
        assert_close(o, o_grm, 1e-12, f"ssc top_k={top_k} vs grm")
        assert_grads_close(g, g_grm, 1e-10, f"ssc top_k={top_k} vs grm:")
    o1 = run(inp, aggregation="ssc", top_k=1, **kw)
    assert rel_err(o1, o_grm) > 1e-4  # routing to fewer caches changes the output


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", RULES)
def test_mean_is_residual_over_segment_count(rule, init):
    inp = make(rule, 29, seed=4)
    kw = dict(init=init, segments=[7, 12, 10], chunk_size=8, mini_batch=3)
    res, mean = (run(inp, aggregation=a, **kw) for a in ("residual", "mean"))
    count = torch.tensor([1] * 7 + [2] * 12 + [3] * 10, dtype=res.dtype)[None, :, None, None]
    assert_close(mean * count, res, 1e-12, "mean * (cached + 1) vs residual")
    assert rel_err(mean, res) > 1e-2


# Segmentations of 29 tokens; for an MLP memory, lengths that are multiples of mini_batch keep
# deep_memory's mini-batch grid.
PLAIN_SEGMENTATIONS = {
    "matrix": [dict(segment_size=8), dict(segments=[7, 20, 2]), dict(segments="log")],
    "deep": [
        dict(segment_size=8, mini_batch=4),
        dict(segment_size=12, mini_batch=4),
        dict(segment_size=8, mini_batch=8),
        dict(segments=[8, 4, 12, 5], mini_batch=4),
        dict(segments="log", mini_batch=4),
        dict(segments=[7, 12, 10], mini_batch=1),
    ],
}
PLAIN_CASES = [
    pytest.param(rule, seg, id=f"{rule}-" + "-".join(f"{k}{v}" for k, v in seg.items()))
    for rule in RULES
    for seg in PLAIN_SEGMENTATIONS["deep" if deep(rule) else "matrix"]
]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize(("rule", "seg"), PLAIN_CASES)
def test_none_continuous_equals_the_plain_memory(rule, seg, with_state):
    """Aggregation none with init continuous is the memory without caching (linear_memory,
    deep_memory): outputs and gradients."""
    inp = make(rule, 29, seed=5, with_state=with_state, requires_grad=True)
    kw = dict(seg)
    mb = {"mini_batch": kw.pop("mini_batch")} if deep(rule) else {}
    o, g = outputs_and_grads(
        lambda: run(inp, aggregation="none", init="continuous", **kw, **mb), inp.leaves()
    )
    o_plain, g_plain = outputs_and_grads(lambda: plain(inp, **mb)[0], inp.leaves())
    assert_close(o, o_plain, 1e-12, "o")
    assert_grads_close(g, g_plain, 1e-10)


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_none_independent_is_the_plain_memory_per_segment(rule, with_state, i):
    kw = layout(rule, i)
    T = kw.pop("T")
    inp = make(rule, T, seed=7, with_state=with_state)
    mb = {"mini_batch": kw["mini_batch"]} if deep(rule) else {}
    o = run(inp, aggregation="none", init="independent", **kw)
    bounds = [0, *itertools.accumulate(segment_lengths(T, **kw))]
    for a, b in itertools.pairwise(bounds):
        o_seg, _ = plain(inp.part(a, b), **mb)
        assert_close(o[:, a:b], o_seg, 1e-12, f"segment {a}:{b}")
    o_cont = run(inp, aggregation="none", init="continuous", **kw)
    assert rel_err(o[:, 8:], o_cont[:, 8:]) > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("rule", DEEP_RULES)
def test_mini_batch_grid_restarts_at_segment_starts(rule):
    """With segments [6, 23] and mini_batch 4 the grid is 4 2 | 4 4 4 4 4 3: the second segment
    is deep_memory from the first one's final weights, not deep_memory's grid 4 4 4 ..."""
    inp = make(rule, 29, seed=6)
    o = run(inp, aggregation="none", init="continuous", segments=[6, 23], mini_batch=4)
    o1, s1 = plain(inp.part(0, 6), mini_batch=4)
    o2, _ = plain(inp.part(6, 29), state=s1, mini_batch=4)
    assert_close(o, torch.cat([o1, o2], 1), 1e-12, "o")
    o_deep, _ = plain(inp, mini_batch=4)
    assert_close(o[:, :4], o_deep[:, :4], 1e-12, "first mini-batch")
    assert rel_err(o[:, 6:], o_deep[:, 6:]) > 1e-4  # another grid, another model


def segment_states(inp: OpInputs, init: str, lengths: list[int], **knobs) -> list:
    """The final state of every segment, from the plain memory: run segment by segment (each
    from the initial state, or for init="continuous" an MLP memory from the previous one's, its
    grid restarting), or for a continuous matrix memory over every token up to the segment's
    end (swla's write of the previous token crosses segment ends)."""
    states, state, start = [], inp.initial_state, 0
    for n in lengths:
        if init == "continuous" and not deep(inp.rule):
            _, state = plain(inp.part(0, start + n))
        else:
            first = inp.initial_state if init == "independent" else state
            _, state = plain(inp.part(start, start + n), state=first, **knobs)
        states.append(state)
        start += n
    return states


def cached_memory(cache: MemoryCache, i: int) -> list[torch.Tensor]:
    """The i-th cached memory as the plain op's state: [S] or [W1, W2], [B, H, ...] each."""
    if isinstance(cache.cached, DeepState):
        return [cache.cached.W1[:, :, i], cache.cached.W2[:, :, i]]
    return [cache.cached.states[:, :, i].transpose(-1, -2)]


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("rule", ["gated_delta", "swla", "dla", "titans"])
def test_cache_holds_segment_end_memories_and_summaries(rule, init, i):
    kw = layout(rule, i)
    T = kw.pop("T")
    inp = make(rule, T, seed=8)
    lengths = segment_lengths(T, **kw)
    knobs = {"mini_batch": kw["mini_batch"]} if deep(rule) else {}
    expected = segment_states(inp, init, lengths, **knobs)
    for summary in ("mean", "sum"):
        _, cache = run(inp, aggregation="grm", init=init, summary=summary, output_cache=True, **kw)
        N = len(lengths) - 1
        assert cache.num_cached == N
        for n in range(N):
            want = expected[n][:2] if deep(rule) else [expected[n]]
            for j, (got, ref) in enumerate(zip(cached_memory(cache, n), want, strict=True)):
                assert_close(got, ref, 1e-12, f"cached memory {n}, part {j}")
        last = cache.online.last if deep(rule) else (cache.online.state,)
        want = expected[-1] if deep(rule) else (expected[-1],)
        for j, (got, ref) in enumerate(zip(last, want, strict=True)):
            assert (got is None) == (ref is None), f"online memory, part {j}"
            if got is not None:
                assert_close(got, ref, 1e-12, f"online memory, part {j}")
        bounds = [0, *itertools.accumulate(lengths)]
        for n, (a, b) in enumerate(itertools.pairwise(bounds[:-1])):
            c = inp.k[:, a:b].sum(1) / (b - a if summary == "mean" else 1)  # [B, H, Dk]
            assert_close(cache.summaries[:, :, n], c, 1e-12, f"summary {n}")
        if rule == "swla":  # the last key and value, which the next token's write reads
            assert torch.equal(cache.online.prev_kv[0], inp.k[:, -1])


# --------------------------------------------------------------------------------------------
# 3. causality
# --------------------------------------------------------------------------------------------


# per kind: (T, segmentations, the first changed token t0: inside a segment (and a chunk or
# mini-batch), at segment starts, right after one)
CAUSAL_LAYOUTS = {
    "matrix": (
        45,
        [dict(segment_size=8, chunk_size=16), dict(segments=[7, 20, 3, 15], chunk_size=16)],
        (19, 27, 31, 40),
    ),
    "deep": (29, LAYOUTS["deep"], (5, 7, 8, 13, 16, 17, 19, 22, 27)),
}


# every gate option together (the gate inputs per token, so the future ones differ too)
ALL_GATES = dict(temperature="token", online_bias="token", summary_keys=True)
CAUSAL_CASES = [
    *((rule, agg, init, {}) for rule in RULES for agg, init in AGG_INITS),
    *(
        (rule, agg, "continuous", dict(ALL_GATES, gate_norm=norm))
        for rule in ("gated_delta", "titans")
        for agg in GATED
        for norm in GATE_NORMS
    ),
]


@pytest.mark.parametrize(("rule", "aggregation", "init", "options"), CAUSAL_CASES)
def test_future_tokens_do_not_change_past_outputs(rule, aggregation, init, options):
    T, layouts, starts = CAUSAL_LAYOUTS["deep" if deep(rule) else "matrix"]
    gate_inputs = {n: options[n] for n in GATE_INPUT_ARGS if n in options}
    inp, other = make(rule, T, seed=9, **gate_inputs), make(rule, T, seed=10, **gate_inputs)
    knobs = {n: x for n, x in options.items() if n not in GATE_INPUT_ARGS}
    for seg in layouts:
        kw = dict(seg, aggregation=aggregation, init=init, top_k=1, **knobs)
        kw.pop("T", None)
        o = run(inp, **kw)
        for t0 in starts:
            o_mix = run(inp.spliced(other, t0), **kw)
            past, now = o_mix[:, :t0], o[:, :t0]
            assert torch.equal(past, now) or rel_err(past, now) < 1e-12, f"{kw}, t0={t0}"
            assert rel_err(o_mix[:, t0:], o[:, t0:]) > 1e-3


@pytest.mark.parametrize("gate_norm", ["none", "centered"])
@pytest.mark.parametrize("aggregation", GATED)
@pytest.mark.parametrize("rule", ["gated_delta", "titans"])
def test_gate_queries_of_one_token_change_only_its_output(rule, aggregation, gate_norm):
    """u, and the temperature and online bias, weigh one token's reads only."""
    inp = make(rule, 29, seed=11, temperature="token", online_bias="token")
    kw = dict(aggregation=aggregation, segments=[7, 12, 10], mini_batch=3, chunk_size=8, top_k=1)
    kw.update(gate_norm=gate_norm)
    o = run(inp, **kw)
    s = 20
    keep = [t for t in range(29) if t != s]
    for name in ("u", "temperature", "online_bias"):
        changed = inp.gate_inputs.get(name, inp.u).clone()
        changed[:, s] = -3.0 * changed[:, s] + (1.0 if name == "online_bias" else 0.0)
        if name == "u":
            o2 = run(dataclasses.replace(inp, u=changed), **kw)
        else:
            o2 = run(dataclasses.replace(inp, gate_inputs={**inp.gate_inputs, name: changed}), **kw)
        # (ssc groups tokens by selected cache: other tokens may see round-off only)
        past = o2[:, keep]
        assert torch.equal(past, o[:, keep]) or rel_err(past, o[:, keep]) < 1e-14, name
        assert rel_err(o2[:, s], o[:, s]) > 1e-3, name


HEAD = 1  # the head that receives the non-finite entries
# (T, the token s made non-finite, segmentation): matrix memories: s in the chunk [8, 16)
# after the segment end 10, whose cached state those tokens read; MLP memories: s after two
# cached segments, inside an open mini-batch
NAN_LAYOUTS = {
    "matrix": (29, 12, dict(segment_size=5, chunk_size=8)),
    "deep": (13, 9, dict(segment_size=4, mini_batch=2)),
}


def earlier_grads(inp: OpInputs, s: int, **kw):
    """The output, the cache (chunk path) and the gradients of every input of a loss on the
    outputs before token s."""
    out = run(inp, output_cache=kw.get("impl") != "reference", **kw)
    o, cache = out if isinstance(out, tuple) else (out, None)
    w = torch.randn(o[:, :s].shape, generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    named = inp.leaves()
    grads = torch.autograd.grad((o[:, :s] * w).sum(), list(named.values()), allow_unused=True)
    return o.detach(), cache, dict(zip(named, grads, strict=True))


def role(name: str, gated: bool) -> str:
    """What an input does to the outputs: "read" (q, and for the gated aggregations u, the
    temperature and the online bias: its token's output), "write" (k, v, the rule's gates, and
    for the gated aggregations the summary keys: every output from its token on) or "unread"
    (the gate inputs of an ungated aggregation)."""
    if name == "q" or (gated and name in ("u", "temperature", "online_bias")):
        return "read"
    if name in ("u", *GATE_INPUT_ARGS):
        return "write" if gated and name == "summary_keys" else "unread"
    return "write"


def check_poisoned_outputs(o, o_c, names, s, what, gated: bool):
    """Row i holds a NaN in input names[i] at token s, head HEAD: earlier outputs and the other
    heads are those of the clean run o_c; a write makes the head's outputs NaN from s on, a
    read only at s (``role``)."""
    T = o.shape[1]
    # (ssc routes the tokens of all rows and heads together, by the caches they select: a
    # changed selection elsewhere may change the round-off of a token's read)
    assert_close(o[:, :s], o_c[:, :s], 1e-14, f"{what}: an earlier output changed")
    others = [h for h in range(o.shape[2]) if h != HEAD]
    assert_close(o[:, :, others], o_c[:, :, others], 1e-14, f"{what}: another head changed")
    for row, name in enumerate(names):
        if role(name, gated) == "unread":  # nothing changes
            assert_close(o[row], o_c[row], 1e-14, f"{what}: an unread {name} changed the output")
        elif role(name, gated) == "read":  # only their own output
            assert o[row, s, HEAD].isnan().all(), f"{what}: NaN {name} not in its output"
            keep = [t for t in range(T) if t != s]
            assert_close(o[row, keep, HEAD], o_c[row, keep, HEAD], 1e-14, f"{what}: {name}")
        else:
            assert o[row, s:, HEAD].isnan().all(), f"{what}: after a NaN {name}, a finite output"


@pytest.mark.parametrize(("aggregation", "init"), AGG_INITS)
@pytest.mark.parametrize("rule", RULES)
def test_non_finite_input_reaches_no_earlier_output(rule, aggregation, init):
    """A NaN at token s (after cached segments) in any input leaves the earlier outputs and the
    gradients of a loss on them as in the clean run, and the other heads untouched (batch row
    i is poisoned in input i), on both paths; a write leaves the stream's memory NaN."""
    T, s, seg = NAN_LAYOUTS["deep" if deep(rule) else "matrix"]
    kw = dict(aggregation=aggregation, init=init, top_k=1, **seg)
    names = ["q", "k", "v", "u", *make(rule, 1).gates, *GATE_INPUT_ARGS]
    gated = declared(aggregation).gated
    for impl in ("chunk", "reference"):
        clean = make(rule, T, seed=71, b=len(names), requires_grad=True, **ALL_GATES)
        o_c, _, grads_c = earlier_grads(clean, s, impl=impl, **kw)
        o, cache, grads = earlier_grads(poison_entries(clean, names, s, HEAD), s, impl=impl, **kw)
        check_poisoned_outputs(o, o_c, names, s, impl, gated)
        for n, grad in grads.items():
            if grad is None:
                assert grads_c[n] is None
                continue
            assert torch.isfinite(grad).all(), f"{impl}: gradient of {n} is not finite"
            assert_close(grad, grads_c[n], 1e-12, f"{impl}: gradient of {n}")
        if cache is not None:  # the memory of a row with a non-finite write stays NaN
            state = cache.online.last.W1 if deep(rule) else cache.online.state
            corrupt = state[:, HEAD].isnan().flatten(1).all(1)  # [rows]
            assert corrupt.tolist() == [role(n, gated) == "write" for n in names]
            assert torch.isfinite(state[:, 1 - HEAD]).all()


# per kind: (the token s made non-finite, where the stream is cut): a matrix memory's NaN
# token before, at and after the cut; an MLP memory's (mini-batches of 2, segments of 4) the
# first or the second of its mini-batch, left pending by the first call or not, and (s = 11)
# in a second call that recomputes a pending token and closes the segment [8, 12)
NAN_STREAMS = {
    "matrix": [(12, 12), (12, 13), (12, 14), (12, 20)],
    "deep": [(8, 8), (8, 9), (8, 10), (9, 9), (9, 10), (9, 11), (11, 9)],
}


@pytest.mark.parametrize("aggregation", ["none", "grm", "soup", "ssc", "residual"])
@pytest.mark.parametrize("rule", ["gated_delta", "swla", "titans"])
def test_non_finite_write_poisons_the_stream(rule, aggregation):
    """A stream cut around a NaN continues as the parallel run does: NaN outputs after a NaN
    write in that row and head, and as the clean stream everywhere else; the stream's memory
    and the cached memories of the segments that end after the write are NaN there (an MLP
    memory's pending tokens are kept as given), the earlier ones those of the clean stream."""
    T, _, seg = NAN_LAYOUTS["deep" if deep(rule) else "matrix"]
    names = ["k", "q", "u", *make(rule, 1).gates]
    writes = [role(n, declared(aggregation).gated) == "write" for n in names]
    kw = dict(aggregation=aggregation, top_k=1, **seg)
    clean = make(rule, T, seed=73, b=len(names))
    for s, cut in NAN_STREAMS["deep" if deep(rule) else "matrix"]:
        what = f"NaN at {s}, cut at {cut}"
        o_c, cache_c = stream_run(clean, [cut], **kw)
        o, cache = stream_run(poison_entries(clean, names, s, HEAD), [cut], **kw)
        check_poisoned_outputs(o, o_c, names, s, what, declared(aggregation).gated)
        state = cache.online.last.W1 if deep(rule) else cache.online.state
        assert state[:, HEAD].isnan().flatten(1).all(1).tolist() == writes, what
        assert torch.isfinite(state[:, 1 - HEAD]).all(), what
        for i in range(cache.num_cached):  # segment i ends after token (i + 1) * size - 1
            after = (i + 1) * seg["segment_size"] > s
            for x, x_c in zip(cached_memory(cache, i), cached_memory(cache_c, i), strict=True):
                for row, bad in enumerate(writes):
                    if bad and after:
                        assert x[row, HEAD].isnan().all(), f"{what}: cached {i}, row {row}"
                    else:
                        assert_close(x[row], x_c[row], 1e-12, f"{what}: cached {i}, row {row}")


@pytest.mark.parametrize("aggregation", GATED)
@pytest.mark.parametrize("rule", ["gated_delta", "titans"])
def test_every_gate_option_changes_the_outputs(rule, aggregation):
    """Each gate option set alone changes the outputs, so an option the code dropped would
    show; detach_summaries changes the gradients only: of the summary keys (none) and of the
    keys (through the memories only)."""
    inp = make(rule, 29, seed=23, requires_grad=True, **ALL_GATES)
    plain_inp = dataclasses.replace(inp, gate_inputs={})
    kw = dict(aggregation=aggregation, segment_size=4, chunk_size=8, mini_batch=3, top_k=1)
    kw.update(gate_norm="none")  # against the scaled dot product: every option changes it
    o = run(plain_inp, **kw)
    for name, value in [("gate_norm", "l2"), ("gate_norm", "centered"), ("gate_scale", 1.0)]:
        assert rel_err(run(plain_inp, **{**kw, name: value}), o) > 1e-3, (name, value)
    for name in GATE_INPUT_ARGS:
        one = dataclasses.replace(inp, gate_inputs={name: inp.gate_inputs[name]})
        assert rel_err(run(one, **kw), o) > 1e-3, name
    for summarised in (plain_inp, dataclasses.replace(inp, gate_inputs={
        "summary_keys": inp.gate_inputs["summary_keys"]})):  # fmt: skip
        leaves = summarised.leaves()
        o_a, g_a = outputs_and_grads(lambda x=summarised: run(x, **kw), leaves)
        o_d, g_d = outputs_and_grads(
            lambda x=summarised: run(x, detach_summaries=True, **kw), leaves
        )
        assert torch.equal(o_d, o_a)
        if summarised.gate_inputs:  # the summary keys reach nothing else
            assert g_d["summary_keys"] is None and g_a["summary_keys"].abs().sum() > 0
        else:  # the memories still train the keys
            assert rel_err(g_d["k"], g_a["k"]) > 1e-3 and g_d["k"].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# 4. streaming == parallel
# --------------------------------------------------------------------------------------------


def check_counters(rule: str, kw: dict):
    """A ``check`` for stream_run: after ``seen`` tokens the finished segments are cached (the
    one holding the last token stays open), and an MLP memory keeps the tokens after the last
    mini-batch boundary of the open segment pending."""

    mini_batch = kw["mini_batch"] if deep(rule) else None

    def check(cache: MemoryCache, seen: int):
        lengths = segment_lengths(10**4, **kw)
        starts = [s for s in itertools.accumulate([0, *lengths]) if s < seen]
        in_segment = seen - starts[-1]
        keeps = declared(kw["aggregation"]).keeps_segments
        assert cache.num_cached == (len(starts) - 1 if keeps else 0), seen
        assert cache.segment_tokens == in_segment, seen
        assert cache.pending_tokens == (in_segment % mini_batch if mini_batch else 0), seen

    return check


def assert_same_cache(a: MemoryCache, b: MemoryCache, tol: float, what: str):
    """Two caches hold the same state: counters and every tensor."""
    assert (a.num_cached, a.segment_tokens, a.seen_tokens, a.pending_tokens) == (
        b.num_cached,
        b.segment_tokens,
        b.seen_tokens,
        b.pending_tokens,
    ), what
    ta, tb = a.tensors(), b.tensors()
    assert len(ta) == len(tb), what
    for j, (x, y) in enumerate(zip(ta, tb, strict=True)):
        assert_close(x, y, tol, f"{what}: cache tensor {j}")


# per kind: segmentations with a prefill length (then token-by-token decoding) and cut sets
# ending exactly at segment ends, mid-chunk or mid-mini-batch, at mini-batch ends, and a few
# tokens apart (plus random ones)
STREAM_LAYOUTS = {
    "matrix": [
        (dict(segment_size=7, chunk_size=4), 13, [[7, 14, 28], [5, 16, 17]]),
        (dict(segments=[5, 17, 3, 1, 3], chunk_size=4), 13, [[5, 22, 25], [1, 2, 24, 27]]),
    ],
    "deep": [
        (
            dict(segment_size=8, mini_batch=4),
            13,
            [[8, 16, 24], [5, 14, 22], [4, 12, 20, 28], [1, 2, 3, 11, 26, 27], [7, 9, 15, 17]],
        ),
        (
            dict(segments=[7, 12, 10], mini_batch=3),
            11,
            [[7, 19], [5, 11, 20], [6, 7, 18, 19, 20], [1, 8, 17, 27, 28], [2, 4, 13, 23]],
        ),
    ],
}


# (rule, aggregation, init) of the matrix memories for the streaming tests beyond the main one
MATRIX_STREAMS = [(rule, a, i) for rule in ("gated_delta", "swla") for a, i in AGG_INITS]


def random_cuts(T: int, seed, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(1, T), rng.randint(1, 6))) for _ in range(n)]


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize(("aggregation", "init"), AGG_INITS)
@pytest.mark.parametrize("rule", RULES)
def test_streaming_equals_parallel(rule, aggregation, init, i):
    T = 29
    seg, prefill, cut_sets = STREAM_LAYOUTS["deep" if deep(rule) else "matrix"][i]
    inp = make(rule, T, seed=12 + AGGREGATIONS.index(aggregation))
    kw = dict(aggregation=aggregation, init=init, top_k=1, **seg)
    o_par, cache_par = run(inp, output_cache=True, **kw)
    assert_close(o_par, run(inp, **kw), 1e-14, "o with and without output_cache")
    check = check_counters(rule, kw)
    check(cache_par, T)
    seed = f"{rule}-{aggregation}-{init}-{i}"
    for cuts in [list(range(prefill, T)), *cut_sets, *random_cuts(T, seed, 2)]:
        o_str, cache = stream_run(inp, cuts, check=check, **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")
        assert_same_cache(cache, cache_par, 1e-10, f"cache of the stream cut at {cuts}")


@pytest.mark.parametrize(
    ("rule", "aggregation", "init"),
    [
        *MATRIX_STREAMS,
        ("titans", "soup", "continuous"),
        ("dla", "ssc", "independent"),
        ("titans", "grm", "independent"),
        ("dla", "mean", "continuous"),
        ("titans", "loglinear", "continuous"),
    ],
)
def test_streaming_log_segments_equals_parallel(rule, aggregation, init):
    T = 37  # [32, 4, 1]
    inp = make(rule, T, seed=13)
    kw = dict(aggregation=aggregation, init=init, top_k=2, chunk_size=8, mini_batch=3)
    o_par, cache_par = run(inp, segments="log", output_cache=True, **kw)
    kw["segments"] = log_segments(T)
    assert kw["segments"] == [32, 4, 1]
    for cuts in (list(range(20, T)), [32, 36], [5, 33], [31, 35], [10, 23, 27]):
        o_str, cache = stream_run(inp, cuts, check=check_counters(rule, kw), **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")
        assert_same_cache(cache, cache_par, 1e-10, f"cache of the stream cut at {cuts}")


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "options"),
    [
        *((*case, {}) for case in MATRIX_STREAMS),
        ("dla", "soup", "continuous", {}),
        ("titans", "ssc", "independent", {}),
        ("titans", "grm", "continuous", {}),
        ("titans", "soup", "independent", {}),
        ("dla", "residual", "independent", {}),
        # every gate option, on both backends and every gated aggregation
        *(
            (rule, agg, "continuous" if agg == "loglinear" else init, options)
            for rule, init in (("gated_delta", "independent"), ("titans", "continuous"))
            for agg in GATED
            for options in (
                dict(ALL_GATES, gate_norm="centered", summary="sum"),
                dict(ALL_GATES, gate_norm="l2", detach_summaries=True, temperature="head"),
            )
        ),
    ],
)
def test_gradients_through_streaming_equal_parallel(rule, aggregation, init, options):
    """A prefill in pieces, then decode steps: the outputs, the final cache and the gradients
    of every input equal the parallel run's."""
    T = 29
    gate_inputs = {n: options[n] for n in GATE_INPUT_ARGS if n in options}
    inp = make(rule, T, seed=15, requires_grad=True, **gate_inputs)
    kw = dict(aggregation=aggregation, init=init, top_k=1, segment_size=4, chunk_size=4)
    kw.update(mini_batch=3, **{n: x for n, x in options.items() if n not in GATE_INPUT_ARGS})
    cuts = [5, 11, 20, *range(21, T)]  # pieces, then decode steps
    o_par, g_par = outputs_and_grads(lambda: run(inp, **kw), inp.leaves(), w_seed=0)
    o_str, g_str = outputs_and_grads(lambda: stream_run(inp, cuts, **kw)[0], inp.leaves(), w_seed=0)
    assert_close(o_str, o_par, 1e-10, "streamed vs parallel: o")
    assert_grads_close(g_str, g_par, 1e-10, "streamed vs parallel:")
    with torch.no_grad():
        cache_par = run(inp, output_cache=True, **kw)[1]
        assert_same_cache(stream_run(inp, cuts, **kw)[1], cache_par, 1e-10, "the final cache")
    detached = "summary_keys" if options.get("detach_summaries") else None
    for name in ("q", "k", "v", *inp.gates, *(n for n in inp.gate_inputs if n != detached)):
        assert g_par[name].abs().sum() > 0, f"parallel gradient of {name} is zero"


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fast_matches_reference_and_streaming_property(data):
    rule = data.draw(st.sampled_from(RULES), "rule")
    agg, init = data.draw(st.sampled_from(AGG_INITS), "aggregation, init")
    T = data.draw(st.integers(1, 30 if deep(rule) else 60), "T")
    if data.draw(st.booleans(), "constant segments"):
        seg = dict(segment_size=data.draw(st.integers(1, 20), "segment_size"))
    else:
        cuts = sorted(data.draw(st.sets(st.integers(1, T - 1)), "segment cuts")) if T > 1 else []
        seg = dict(segments=[b - a for a, b in itertools.pairwise([0, *cuts, T])])
    top_k = data.draw(st.integers(1, 4), "top_k")
    knob = dict(mini_batch=data.draw(st.integers(1, 8), "mini_batch"))
    if not deep(rule):
        knob = dict(chunk_size=data.draw(st.integers(1, 16), "chunk_size"))
    # Dk = 1 makes unit keys +-1, so ssc scores tie exactly: ties must break alike everywhere
    Dk = data.draw(st.integers(1, 6), "Dk")
    Dv = Dk if deep(rule) else data.draw(st.integers(1, 6), "Dv")
    seed = data.draw(st.integers(0, 2**16), "seed")
    inp = make(rule, T, dk=Dk, dv=Dv, dh=3 * Dk, seed=seed, b=1)
    kw = dict(aggregation=agg, init=init, top_k=top_k, **seg, **knob)

    o = run(inp, **kw)
    assert_close(o, run(inp, impl="reference", **kw), TOL64, "fast vs reference")
    stream_cuts = sorted(data.draw(st.sets(st.integers(1, T - 1)), "stream cuts")) if T > 1 else []
    o_str, cache = stream_run(inp, stream_cuts, **kw)
    assert_close(o_str, o, 1e-10, f"streaming cut at {stream_cuts} vs parallel")
    assert cache.seen_tokens == T


@pytest.mark.parametrize("rule", ["decay", "dla", "titans"])
def test_ssc_ties_are_broken_the_same_way_everywhere(rule):
    """Zero keys (e.g. padding) give the first segments equal summaries: the parallel path,
    the reference and decoding must pick the same caches."""
    inp = make(rule, 29, seed=21, b=1)
    inp.k = inp.k.clone()
    inp.k[:, :16] = 0
    kw = dict(aggregation="ssc", top_k=2, segment_size=4, mini_batch=2, chunk_size=4)
    o_par = run(inp, **kw)
    assert_close(o_par, run(inp, impl="reference", **kw), TOL64, "fast vs reference")
    o_str, _ = stream_run(inp, list(range(5, 29)), **kw)
    assert_close(o_str, o_par, 1e-10, "decode vs parallel")


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
def test_deep_streaming_equals_parallel_other_options(aggregation, options):
    inp = make("titans", 29, seed=19, normalize_q=False)
    kw = dict(aggregation=aggregation, top_k=1, **{**layout("titans", 1), **options})
    kw.pop("T")
    o_par = run(inp, **kw)
    check = check_counters("titans", kw)
    for cuts in (list(range(11, 29)), [5, 11, 20], [7, 19], [2, 9, 13, 25]):
        o_str, _ = stream_run(inp, cuts, check=check, **kw)
        assert_close(o_str, o_par, 1e-10, f"pieces cut at {cuts} vs parallel")


@pytest.mark.parametrize("rule", ["gated_delta", "titans"])
def test_streaming_from_one_token_calls_keeps_continuing(rule):
    """A stream of 1-token calls only, across several segments (an MLP memory's mini-batches
    never full at a call's end until a boundary)."""
    inp = make(rule, 29, seed=14)
    kw = dict(aggregation="soup", segment_size=5, mini_batch=3)
    o_par = run(inp, **kw)
    check = check_counters(rule, kw)
    o_str, cache = stream_run(inp, list(range(1, 29)), check=check, **kw)
    assert_close(o_str, o_par, 1e-10, "decode vs parallel")
    assert cache.num_cached == 5


@pytest.mark.parametrize(
    ("rule", "aggregation", "init", "index"),
    [
        ("swla", "grm", "independent", [2, 0]),
        ("swla", "ssc", "independent", [2, 0]),
        ("swla", "residual", "independent", [2, 0]),
        ("dla", "soup", "independent", [1, 0]),
        ("titans", "ssc", "continuous", [1, 0]),
        ("titans", "grm", "independent", [1, 0]),
        ("titans", "soup", "continuous", [1]),
    ],
)
def test_cache_index_select_continues_the_selected_rows(rule, aggregation, init, index):
    T, t = 29, 13  # 13 tokens: one cached segment (and for mini_batch 4 one token pending)
    inp = make(rule, T, seed=17, b=3)
    kw = dict(aggregation=aggregation, init=init, segment_size=8, mini_batch=4, chunk_size=4)
    kw.update(top_k=1)
    _, cache = run(inp.part(0, t), output_cache=True, **kw)
    assert cache.num_cached == 1 and cache.pending_tokens == (1 if deep(rule) else 0)
    index = torch.tensor(index)
    picked = cache.index_select(index)
    assert picked.num_cached == 1 and picked.pending_tokens == cache.pending_tokens
    assert picked.config.batch_size == len(index)
    rest = inp.part(t, T)
    o_rest = run(rest, with_state=False, cache=cache, **kw)
    o_pick = run(rest.rows(index), with_state=False, cache=picked, **kw)
    assert_close(o_pick, o_rest[index], 1e-12, "o of the selected rows")
    # the selected stream is the stream of the selected rows from the start
    assert_close(o_pick, run(inp.rows(index), **kw)[:, t:], 1e-10, "o vs the rows' own stream")
    if index.tolist()[0] != 0:  # and it is not the unselected one (the check is not vacuous)
        assert rel_err(o_pick, o_rest[: len(index)]) > 1e-3


# --------------------------------------------------------------------------------------------
# 5. bad input
# --------------------------------------------------------------------------------------------


def _good(rule="gated_delta", aggregation="grm", T=6) -> dict:
    """A valid call (the base of every bad-input case): B 2, T 6, H 3, Dk 4 (Dv 5 for a
    matrix memory), segments of 4."""
    inp = make(rule, T, b=2, h=3, dk=4, dv=5, dh=16, dtype=torch.float32, with_state=False)
    knobs = dict(mini_batch=2, max_grad_norm=1.0) if deep(rule) else {}
    return dict(
        q=inp.q,
        k=inp.k,
        v=inp.v,
        u=inp.u,
        memory=memory_spec(rule, **knobs),
        caching=Caching(aggregation, segment_size=4),
        gates=inp.gates,
        init_weights=inp.init_weights,
    )


def _with(rule="gated_delta", aggregation="grm", *, drop=(), gates=None, caching=None, **changes):
    """The base call with the given changes: ``gates`` updates the gate dict (None values
    remove a gate), ``caching`` the Caching's settings."""
    kw = _good(rule, aggregation)
    for name in drop:
        kw.pop(name)
    if gates is not None:
        kw["gates"] = {n: x for n, x in {**kw["gates"], **gates}.items() if x is not None}
    if caching is not None:
        kw["caching"] = dataclasses.replace(kw["caching"], **caching)
    kw.update(changes)
    return kw


def _call(kwargs):
    return call_op(memory_caching, kwargs)


def _state(rule="titans", b=2, h=3, d=4, dh=16):
    W1, W2 = torch.zeros(b, h, d, dh), torch.zeros(b, h, dh, d)
    if rule == "titans":
        return DeepState(W1, W2, torch.zeros_like(W1), torch.zeros_like(W2))
    return DeepState(W1, W2)


def _segments(**changes):  # a caching of explicit segments
    return dict(caching=dict(segment_size=None, **changes))


def _knobs(rule="titans", **knobs):  # the base call with another memory object
    return _with(rule) | {"memory": memory_spec(rule, **knobs)}


BAD_INPUTS = {
    # the caching choices and the memory's knobs, checked where their objects are built
    **{
        f"{name} {value!r}": (
            arg(name),
            lambda name=name, value=value: _with(
                caching={name: value, **({"segment_size": None} if name == "segments" else {})}
            ),
        )
        for name, value in [
            ("top_k", 0),
            ("top_k", 1.5),
            ("segment_size", 0),
            ("segments", []),
            ("segments", "lin"),
            ("aggregation", "attention"),
            ("init", "random"),
            ("summary", "max"),
            ("gate_scale", 0.0),
            ("gate_scale", -0.5),
            ("gate_scale", float("nan")),
            ("gate_norm", "cosine"),
            ("gate_norm", None),
            ("detach_summaries", "yes"),
            ("detach_summaries", 1),
        ]
    },
    **{
        f"{name} {value!r} ({rule})": (
            arg(name),
            lambda rule=rule, name=name, value=value: _knobs(rule, **{name: value}),
        )
        for rule, name, value in [
            ("gated_delta", "chunk_size", 0),
            ("titans", "mini_batch", 0),
            ("titans", "mini_batch", 2.0),
            ("titans", "max_grad_norm", 0.0),
            ("titans", "max_grad_norm", -1.0),
            ("titans", "eps", 0.0),
            ("titans", "eps", -1.0),
            ("titans", "eps", float("nan")),
            ("titans", "eps", "small"),
            ("titans", "eps", None),
            ("titans", "decay_to", "half"),
        ]
    },
    "segments not summing to T": (arg("segments"), lambda: _with(**_segments(segments=[2, 3]))),
    "segments too long": (arg("segments"), lambda: _with(**_segments(segments=[4, 4]))),
    "segments with a 0": (arg("segments"), lambda: _with(**_segments(segments=[3, 0, 3]))),
    "segment_size and segments": (
        r"\bsegment_size\b.*\bsegments\b",
        lambda: _with(caching=dict(segments=[3, 3])),
    ),
    "loglinear with independent init": (
        arg("aggregation"),
        lambda: _with(aggregation="loglinear", caching=dict(init="independent")),
    ),
    "caching not a Caching": (arg("caching"), lambda: _with(caching=None) | {"caching": "grm"}),
    # gate queries
    **{
        f"u missing {a}": (arg("u"), lambda a=a: _with(aggregation=a, u=None))
        for a in ("grm", "soup", "ssc", "loglinear")
    },
    "u missing soup (titans)": (arg("u"), lambda: _with("titans", "soup", u=None)),
    "u wrong shape": (arg("u"), lambda: _with(u=torch.randn(2, 6, 3, 5))),
    "u wrong rank": (arg("u"), lambda: _with(u=torch.randn(2, 6, 12))),
    # the gate inputs
    **{
        f"{name} {what}": (arg(name), lambda name=name, value=value: _with(gates={name: value}))
        for name, what, value in [
            ("temperature", "of other heads", torch.ones(2)),
            ("temperature", "per batch row", torch.ones(2, 3)),
            ("temperature", "of another length", torch.ones(2, 5, 3)),
            ("temperature", "of integers", torch.ones(3, dtype=torch.long)),
            ("online_bias", "of rank 4", torch.ones(2, 6, 3, 1)),
            ("online_bias", "a number", 4.0),
            ("summary_keys", "of another Dk", torch.randn(2, 6, 3, 5)),
            ("summary_keys", "of rank 3", torch.randn(2, 6, 12)),
            ("summary_keys", "per head", torch.randn(3, 4)),
            ("tau", "(no such input)", torch.ones(3)),
        ]
    },
    # q, k, v
    "no heads": (
        arg("q"),
        lambda: _with(
            q=torch.randn(2, 6, 0, 4), k=torch.randn(2, 6, 0, 4), v=torch.randn(2, 6, 0, 5)
        ),
    ),
    "Dk 0": (arg("q"), lambda: _with(q=torch.randn(2, 6, 3, 0), k=torch.randn(2, 6, 3, 0))),
    "Dk != Dv (deep)": (arg("v"), lambda: _with("titans", v=torch.randn(2, 6, 3, 5))),
    # the memory and its gates
    "memory not a memory object": (arg("memory"), lambda: _with(memory="gated_delta")),
    "unknown rule": (arg("rule"), lambda: _with(memory=None) | {"memory": DeepMemory("mlp")}),
    "gates not a dict": (
        arg("gates"),
        lambda: _with(gates=None) | {"gates": [torch.rand(2, 6, 3)]},
    ),
    "g missing": (arg("g"), lambda: _with(gates=dict(g=None))),
    "g wrong shape": (arg("g"), lambda: _with(gates=dict(g=-torch.rand(2, 6, 2)))),
    "eta given to a matrix rule": (arg("eta"), lambda: _with(gates=dict(eta=torch.rand(2, 6, 3)))),
    "init_weights given to a matrix rule": (
        arg("init_weights"),
        lambda: _with(init_weights=_good("titans")["init_weights"]),
    ),
    "initial_state wrong shape": (
        arg("initial_state"),
        lambda: _with(initial_state=torch.zeros(2, 3)),
    ),
    "eta missing (titans)": (arg("eta"), lambda: _with("titans", gates=dict(eta=None))),
    "eta missing (dla)": (arg("eta"), lambda: _with("dla", gates=dict(eta=None))),
    "eta wrong shape": (arg("eta"), lambda: _with("titans", gates=dict(eta=torch.rand(2, 6, 2)))),
    "eta wrong rank": (arg("eta"), lambda: _with("titans", gates=dict(eta=torch.rand(2, 6, 3, 1)))),
    "eta negative": (arg("eta"), lambda: _with("titans", gates=dict(eta=-torch.rand(2, 6, 3)))),
    "beta above 1 (titans)": (
        arg("beta"),
        lambda: _with("titans", gates=dict(beta=1.5 * torch.ones(2, 6, 3))),
    ),
    "g missing (titans)": (arg("g"), lambda: _with("titans", gates=dict(g=None))),
    "beta missing (titans)": (arg("beta"), lambda: _with("titans", gates=dict(beta=None))),
    "g given to dla": (arg("g"), lambda: _with("dla", gates=dict(g=-torch.rand(2, 6, 3)))),
    "lam given to titans": (
        arg("lam"),
        lambda: _with("titans", gates=dict(lam=torch.rand(2, 6, 3))),
    ),
    "lam given to dla": (arg("lam"), lambda: _with("dla", gates=dict(lam=torch.rand(2, 6, 3)))),
    "beta given to dla": (arg("beta"), lambda: _with("dla", gates=dict(beta=torch.rand(2, 6, 3)))),
    "init_weights missing": (arg("init_weights"), lambda: _with("titans", drop=["init_weights"])),
    "init_weights not a pair": (
        arg("init_weights"),
        lambda: _with("titans", init_weights=(torch.zeros(3, 4, 16),)),
    ),
    "init_weights W1 wrong shape": (
        arg("init_weights"),
        lambda: _with("titans", init_weights=(torch.zeros(3, 5, 16), torch.zeros(3, 16, 4))),
    ),
    "init_weights W2 wrong shape": (
        arg("init_weights"),
        lambda: _with("titans", init_weights=(torch.zeros(3, 4, 16), torch.zeros(3, 12, 4))),
    ),
    "init_weights wrong heads": (
        arg("init_weights"),
        lambda: _with("titans", init_weights=(torch.zeros(2, 4, 16), torch.zeros(2, 16, 4))),
    ),
    "init_weights per batch": (
        arg("init_weights"),
        lambda: _with("titans", init_weights=(torch.zeros(2, 3, 4, 16), torch.zeros(2, 3, 16, 4))),
    ),
    "initial_state a tensor (deep)": (
        arg("initial_state"),
        lambda: _with("titans", initial_state=torch.zeros(2, 3, 4, 4)),
    ),
    "initial_state a tuple (deep)": (
        arg("initial_state"),
        lambda: _with("titans", initial_state=tuple(_state())),
    ),
    "initial_state wrong shape (deep)": (
        arg("initial_state"),
        lambda: _with("titans", initial_state=_state(dh=8)),
    ),
    "initial_state wrong batch (deep)": (
        arg("initial_state"),
        lambda: _with("titans", initial_state=_state(b=1)),
    ),
    "initial_state without momentum (titans)": (
        arg("initial_state"),
        lambda: _with("titans", initial_state=_state("dla")),
    ),
    "initial_state with momentum (dla)": (
        arg("initial_state"),
        lambda: _with("dla", initial_state=_state("titans")),
    ),
    # the op's own arguments
    "reference with output_cache": (
        arg("impl"),
        lambda: _with(impl="reference", output_cache=True),
    ),
    "unknown impl": (arg("impl"), lambda: _with(impl="cuda")),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_an_error_naming_the_argument(case):
    pattern, make_kwargs = BAD_INPUTS[case]
    with pytest.raises((ValueError, TypeError), match=pattern):
        _call(make_kwargs())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", ["gated_delta", "dla", "titans"])
def test_good_inputs_of_bad_input_table_run(rule, aggregation):
    """The table's base calls are valid: each case breaks one thing."""
    o = _call(_with(rule, aggregation))
    assert o.shape == (2, 6, 3, 4 if deep(rule) else 5) and torch.isfinite(o).all()
    _, cache = _call(_with(rule, aggregation, output_cache=True, **_segments(segments=[4, 4])))
    assert cache.seen_tokens == 6
    if deep(rule):
        o2 = _call(_with(rule, aggregation, initial_state=_state(rule)))
        assert o2.shape == o.shape
    inputs = make_gate_inputs((2, 6, 3, 4), 0, torch.float32, False, "head", "token", True)
    o3 = _call(_with(rule, aggregation, gates=inputs))
    if not declared(aggregation).gated:  # u and the gate inputs are ignored
        assert torch.equal(_call(_with(rule, aggregation, u=None)), o)
        assert torch.equal(o3, o)
    else:
        assert o3.shape == o.shape and torch.isfinite(o3).all()


def _continue(
    cache, rule="gated_delta", T=3, dtype=torch.float32, b=2, summary_keys=False, **changes
):  # fmt: skip
    """T more tokens of the base call's configuration (with ``changes``, and summary keys
    when told) after ``cache``."""
    inp = make(rule, T, seed=1, b=b, h=3, dk=4, dv=5, dh=16, dtype=dtype, with_state=False,
               summary_keys=summary_keys)  # fmt: skip
    kw = _good(rule)
    kw.update(q=inp.q, k=inp.k, v=inp.v, u=inp.u, gates=inp.all_gates, cache=cache)
    kw.update(changes)
    return _call(kw)


@pytest.fixture(params=["gated_delta", "titans"])
def base_cache(request):
    _, cache = _call(_with(request.param, output_cache=True))
    return request.param, cache


# a gate geometry other than the default one
OTHER_GATE_NORM = next(n for n in GATE_NORMS if n != DEFAULT_GATE_NORM)
CHANGES = {
    "gated_delta": [
        dict(caching=Caching("ssc", segment_size=4)),
        dict(caching=Caching("none", segment_size=4)),
        dict(b=1),
        dict(caching=Caching(segment_size=4, init="independent")),
        dict(caching=Caching(segment_size=5)),
        dict(caching=Caching(segment_size=4, summary="sum")),
        dict(caching=Caching(segment_size=4, gate_scale=0.3)),
        dict(caching=Caching(segment_size=4, gate_norm=OTHER_GATE_NORM)),
        dict(caching=Caching(segment_size=4, detach_summaries=True)),
        dict(summary_keys=True),  # the cache's summaries are of k
        dict(dtype=torch.float64),  # the cache holds float32 states
        dict(rule="delta"),
    ],
    "titans": [
        dict(memory=DeepMemory("titans", mini_batch=3, max_grad_norm=1.0)),
        dict(memory=DeepMemory("titans", mini_batch=1, max_grad_norm=1.0)),
        dict(memory=DeepMemory("titans", mini_batch=2, norm=False, max_grad_norm=1.0)),
        dict(memory=DeepMemory("titans", mini_batch=2, max_grad_norm=0.5)),
        dict(memory=DeepMemory("titans", mini_batch=2, max_grad_norm=None)),
        dict(memory=DeepMemory("titans", mini_batch=2, max_grad_norm=1.0, eps=1e-6)),
        dict(caching=Caching("soup", segment_size=4)),
        dict(caching=Caching(segment_size=4, init="independent")),
        dict(rule="dla", memory=DeepMemory("dla", mini_batch=2, max_grad_norm=1.0)),
        dict(init_weights=(torch.zeros(3, 4, 8), torch.zeros(3, 8, 4))),  # another hidden size
    ],
}


@pytest.mark.parametrize(
    ("rule", "j"), [(rule, j) for rule, changes in CHANGES.items() for j in range(len(changes))]
)
def test_cache_of_another_configuration_is_rejected(rule, j):
    _, cache = _call(_with(rule, output_cache=True))
    _continue(cache, rule)  # the same configuration continues
    changes = dict(CHANGES[rule][j])
    with pytest.raises(ValueError, match=r"^cache\b"):
        _continue(cache, changes.pop("rule", rule), **changes)


@pytest.mark.parametrize("T", [1, 3])
def test_cache_in_float32_continued_in_bfloat16_runs(base_cache, T):
    # bf16 inputs compute in float32 (as under autocast): the same states
    rule, cache = base_cache
    o = _continue(cache, rule, T=T, dtype=torch.bfloat16)
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()


def test_cache_must_be_a_memory_cache():
    with pytest.raises(ValueError, match=r"^cache\b"):
        _continue({"states": None})


def test_initial_state_with_cache_is_rejected(base_cache):
    rule, cache = base_cache
    state = _state() if deep(rule) else torch.zeros(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"^initial_state\b"):
        _continue(cache, rule, initial_state=state)


def test_reference_takes_no_cache(base_cache):
    rule, cache = base_cache
    with pytest.raises(ValueError, match=r"^impl\b"):
        _continue(cache, rule, impl="reference")


def test_stream_past_explicit_segments_is_rejected():
    plan = _segments(segments=[4, 6])  # 10 tokens
    _, cache = _call(_with(output_cache=True, **plan))  # 6 tokens: fine
    caching = Caching(segments=[4, 6])
    o, _ = _continue(cache, T=4, caching=caching, output_cache=True)  # 10 tokens: fine
    assert o.shape == (2, 4, 3, 5)
    with pytest.raises(ValueError, match=r"^segments\b"):
        _continue(cache, T=5, caching=caching)  # 11 tokens
    with pytest.raises(ValueError, match=r"^segments\b"):  # a new stream longer than the plan
        _call(_with(output_cache=True, **_segments(segments=[2, 3])))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", ["swla", "dla", "titans"])
def test_empty_batch_gives_empty_outputs_and_cache(rule, aggregation):
    inp = make(rule, 15, b=0, requires_grad=True)
    kw = dict(aggregation=aggregation, segment_size=4, chunk_size=4, mini_batch=2, top_k=2)
    o, cache = run(inp.part(0, 11), output_cache=True, **kw)
    assert o.shape == (0, 11, H, inp.v.shape[-1])
    assert cache.seen_tokens == 11 and cache.config.batch_size == 0
    assert cache.num_cached == (0 if aggregation == "none" else 2)
    o.sum().backward()
    assert all(x.grad is None or x.grad.shape == x.shape for x in inp.leaves().values())
    for a, b in ((11, 12), (12, 15)):  # a decode step, then a chunk
        o, cache = run(inp.part(a, b), with_state=False, cache=cache, output_cache=True, **kw)
        assert o.shape == (0, b - a, H, inp.v.shape[-1]) and cache.seen_tokens == b
    assert run(inp, impl="reference", **kw).shape == (0, 15, H, inp.v.shape[-1])


# --------------------------------------------------------------------------------------------
# 6. the cache's size and what it keeps alive
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize(
    ("rule", "aggregation"),
    [
        *(("swla", a) for a in ("grm", "ssc", "residual", "none")),
        *(("titans", a) for a in ("grm", "none")),
        ("dla", "soup"),
    ],
)
def test_cache_nbytes_grows_by_one_memory_per_segment(rule, aggregation, init):
    T, mb, Dk, Dv, Dh = 29, 4, 4, 5, 12
    inp = make(rule, T, seed=16, b=2, h=3, dk=Dk, dv=Dv, dh=Dh, with_state=False)
    Dv = Dk if deep(rule) else Dv
    kw = dict(aggregation=aggregation, init=init, segment_size=8, mini_batch=mb)
    _, cache = run(inp.part(0, 2), output_cache=True, **kw)
    history = []
    for t in range(2, T):
        _, cache = run(inp.part(t, t + 1), with_state=False, cache=cache, output_cache=True, **kw)
        assert cache.nbytes() == sum(x.numel() * x.element_size() for x in _unique(cache.tensors()))
        history.append((cache.num_cached, cache.pending_tokens, cache.nbytes()))
    assert history[-1][0] == (0 if aggregation == "none" else 3)
    # per head and batch row, float64: one memory and one key summary per cached segment
    memory = 2 * Dv * Dh if deep(rule) else Dk * Dv
    per_segment = 2 * 3 * (memory + Dk) * 8
    base = {}  # bytes with no cached segment, by number of pending tokens
    for n, pending, nbytes in history:
        base.setdefault(pending, nbytes - n * per_segment)
        assert nbytes == base[pending] + n * per_segment, (n, pending, nbytes, history)
    # the rest: the online memory and the open segment's key sum, and
    state = 2 * 3 * memory * (2 if rule == "titans" else 1) * 8
    key_sum = 2 * 3 * Dk * 8
    if not deep(rule):  # the sum of the cached memories, and swla's last key and value
        assert base == {0: state + key_sum + state + 2 * 3 * (Dk + Dv) * 8}, base
    else:  # with pending tokens the state after the last token and their k, v, eta[, g, beta]
        assert len(base) == mb and base[0] == state + key_sum, base
        per_pending = 2 * 3 * (2 * Dk + (3 if rule == "titans" else 1)) * 8
        for p in range(1, mb):
            assert base[p] == 2 * state + key_sum + p * per_pending, base


def _unique(tensors):
    return list({(t.data_ptr(), t.numel()): t for t in tensors}.values())


@pytest.mark.parametrize(
    ("rule", "aggregation"), [("swla", "grm"), ("titans", "grm"), ("titans", "none")]
)
def test_cache_does_not_keep_prefill_sized_buffers(rule, aggregation):
    inp = make(rule, 400, seed=3, b=1, dk=8, dv=8, dh=32, dtype=torch.float32)
    _, cache = run(inp, output_cache=True, aggregation=aggregation, segment_size=64, mini_batch=16)
    _, cache = run(inp.part(0, 7), with_state=False, cache=cache, output_cache=True,
                   aggregation=aggregation, segment_size=64, mini_batch=16)  # fmt: skip
    pinned = []
    for j, t in enumerate(cache.tensors()):
        own, held = t.numel() * t.element_size(), t.untyped_storage().nbytes()
        if held != own:
            pinned.append(f"tensor {j} {tuple(t.shape)}: {own} bytes, keeps {held} alive")
    assert not pinned, "; ".join(pinned)


def test_the_old_cache_fields_name_their_new_place(base_cache):
    _, cache = base_cache
    for name in ("states", "online_state", "state_sum", "last_state", "prev_kv"):
        with pytest.raises(AttributeError, match=rf"MemoryCache\.{name} is now MemoryCache\."):
            getattr(cache, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cache.nope  # noqa: B018


# --------------------------------------------------------------------------------------------
# 7. bf16 autocast, long sequences, what the backward keeps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "aggregation", "init"),
    [("gated_delta", a, i) for a, i in AGG_INITS]
    + [(r, "grm", i) for r in LINEAR_RULES if r != "gated_delta" for i in INITS]
    + [(r, a, "continuous") for r in DEEP_RULES for a in ("grm", "soup", "ssc", "mean")],
)
def test_autocast_bf16_with_fp32_inputs(rule, aggregation, init):
    """The scans and the cached reads run in fp32 under bf16 autocast, also when streaming."""
    inp = make(rule, 40, seed=13, dk=24 if not deep(rule) else 8, dv=40, dh=32, dtype=torch.float32)
    kw = dict(aggregation=aggregation, init=init, segments=[11, 16, 13], chunk_size=8, mini_batch=4)
    o_ref, cache_ref = run(inp, output_cache=True, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, cache = run(inp.part(0, 30), output_cache=True, **kw)
        o2, cache = run(inp.part(30, 40), with_state=False, cache=cache, output_cache=True, **kw)
    assert o.dtype == o2.dtype == torch.float32
    assert_close(torch.cat([o, o2], 1), o_ref, 1e-5, "o")
    assert all(x.dtype == torch.float32 for x in cache.tensors())
    assert_same_cache(cache, cache_ref, 1e-5, "cache")


@pytest.mark.parametrize("aggregation", ["grm", "soup"])
@pytest.mark.parametrize("rule", DEEP_RULES)
def test_long_sequence_is_finite(rule, aggregation):
    inp = make(rule, 2048, seed=18, b=1, h=1, dk=16, dh=64, dtype=torch.float32, with_state=False)
    o = run(inp, aggregation=aggregation, segment_size=256, mini_batch=64, max_grad_norm=1.0)
    assert o.dtype == torch.float32 and o.shape == (1, 2048, 1, 16)
    assert torch.isfinite(o).all()
    assert o.abs().max() < 1e3


def saved_for_backward(inp: OpInputs, **kw) -> tuple[int, int]:
    """(elements of the largest tensor, elements of all storages) the forward saves for the
    backward of memory_caching on ``inp``; runs the backward too."""
    largest, storages = [0], {}

    def pack(x):
        largest[0] = max(largest[0], x.numel())
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes() // x.itemsize
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        run(inp, **kw).square().sum().backward()
    return largest[0], sum(storages.values())


def _memory_inputs(rule: str, T: int) -> OpInputs:
    return make(rule, T, seed=22, b=1, h=2, dk=16, dv=16, dh=64, dtype=torch.float32,
                requires_grad=True, with_state=False)  # fmt: skip


@pytest.mark.parametrize("aggregation", ["grm", "soup", "ssc", "residual"])
@pytest.mark.parametrize("rule", ["gated_delta", "titans"])
def test_backward_keeps_no_per_token_read_of_every_cache(rule, aggregation):
    """The cached reads are recomputed in the backward (or routed for ssc): nothing of size
    [T, N, D] (a read of every cache by every token) is kept."""
    T, size, Hm, Dm = (1024, 64, 2, 16) if deep(rule) else (2048, 64, 2, 16)
    N = T // size
    inp = _memory_inputs(rule, T)
    largest, _ = saved_for_backward(inp, aggregation=aggregation, segment_size=size, mini_batch=16)
    assert largest >= T * Hm * Dm  # the hook saw the inputs: it is not vacuous
    assert largest < Hm * T * N * Dm, f"largest saved tensor has {largest} elements"
    if aggregation != "residual":  # the gate queries were part of the graph
        assert inp.u.grad is not None and inp.u.grad.abs().sum() > 0


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "residual", "soup"])
@pytest.mark.parametrize("rule", ["gated_delta", "titans"])
def test_backward_memory_grows_linearly_with_segment_count(rule, aggregation):
    """What the backward keeps beyond the plain memory (aggregation none) grows like the
    number of cached memories N, not N^2: doubling N at most about doubles it."""
    T = 512
    inp = _memory_inputs(rule, T)
    extra = {}
    for size in (16, 8):  # N = 32, 64
        _, base = saved_for_backward(inp, aggregation="none", segment_size=size, mini_batch=8)
        _, total = saved_for_backward(inp, aggregation=aggregation, segment_size=size, mini_batch=8)
        extra[T // size] = total - base
    assert extra[32] > 0
    assert extra[64] < 2.5 * extra[32], f"saved beyond the plain memory: {extra}"


# --------------------------------------------------------------------------------------------
# 8. the deprecated keyword form, and a third memory backend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["swla", "titans"])
def test_old_keyword_form_warns_and_computes_the_same(rule):
    """The keyword form computes what it did: it predates gate_norm, so its gates stay the
    scaled dot product (not today's default)."""
    inp = make(rule, 20, seed=30)
    kw = dict(aggregation="ssc", segment_size=6, top_k=1, chunk_size=4, mini_batch=3)
    new = run(inp, **kw, gate_norm="none")
    assert not torch.equal(run(inp, **kw), new)  # today's default gates differ
    knobs = dict(mini_batch=3, max_grad_norm=1.0) if deep(rule) else dict(chunk_size=4)
    with pytest.warns(FutureWarning, match=r"memory=MatrixMemory\(rule.*caching=Caching\("):
        old = memory_caching(
            inp.q, inp.k, inp.v, inp.u, rule=rule, **inp.gates, aggregation="ssc",
            segment_size=6, top_k=1, init_weights=inp.init_weights,
            initial_state=inp.initial_state, **knobs,
        )  # fmt: skip
    assert torch.equal(old, new)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^mini_batch\b"):
        memory_caching(inp.q, inp.k, inp.v, rule="linear", segment_size=6, mini_batch=3)
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['segment'\\]"):
        memory_caching(inp.q, inp.k, inp.v, rule="linear", segment=6)
    with pytest.raises(TypeError, match="not both"):
        memory_caching(inp.q, inp.k, inp.v, memory=MatrixMemory("linear"), segment_size=6)


@dataclasses.dataclass(frozen=True)
class LoopMemory:
    """A test-only memory: gated_delta's matrix memory computed by a plain loop over tokens,
    through a backend of its own that implements only the required operations."""

    rule: str = "gated_delta"
    gates: tuple[str, ...] = ("g", "beta")


class LoopBackend(MemoryBackend):
    """The memory S [B, H, Dv, Dk]; cached memories stacked as [B, H, N, Dv, Dk]. It keeps the
    defaults of append, pending, poison_online, read_sum and read_routed."""

    linear = True  # M(q) = S q

    def check(self, shape, gates, init_weights, initial_state):
        B, T, H = shape[:3]
        check_gates(self.memory.rule, B, T, H, **gates)
        return ()

    def start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device):
        if initial_state is None:
            return torch.zeros(B, H, Dv, Dk, dtype=dtype, device=device)
        return initial_state.to(dtype)

    def no_cached(self, B, H, Dk, Dv, sizes, dtype, device):
        return torch.zeros(B, H, 0, Dv, Dk, dtype=dtype, device=device)

    def segment_end(self, online):
        return online.unsqueeze(2), online

    def scan(self, x):
        S, outs, ends = x.online, [], []
        for p, (a, b) in enumerate(x.pieces):
            if p and x.reset is not None:
                S = x.reset
            for t in range(a, b):
                S = self.ref_step(S, t, x.k, x.v, x.gates, None)
                outs.append(self.ref_read(S, x.q[:, t]))
            ends.append(S)
        keep = x.keep and len(ends) > 1
        o = torch.stack(outs, 1)
        return Scanned(torch.stack(ends[:-1], 2) if keep else None, S, lambda mix: o)

    def read_dense(self, Q, cached, w, spans):
        out = Q.new_zeros(*Q.shape[:3], cached.shape[-2])
        for a, b, n in spans:
            reads = torch.einsum("bhnvk,bhtk->bhtnv", cached[:, :, :n], Q[:, :, a:b])
            out[:, :, a:b] = (w[:, :, a:b, :n, None] * reads).sum(3)
        return out

    def ref_start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device):
        return self.start(B, H, Dk, Dv, init_weights, initial_state, dtype, device)

    def ref_step(self, state, t, k, v, gates, count):
        step = {n: g[:, t] for n, g in gates.items()}
        return linear_step(self.memory.rule, state, k[:, t], v[:, t], None, None, **step)

    def ref_memory(self, state):
        return state

    def ref_read(self, memory, q_t):
        return torch.einsum("bhvk,bhk->bhv", memory, q_t)


@pytest.mark.parametrize(("aggregation", "init"), AGG_INITS)
def test_a_third_backend_needs_no_change_to_the_algorithm(monkeypatch, aggregation, init):
    """A memory with a backend of its own runs through the one algorithm: its fast path, its
    streams and its reference equal the matrix backend's on the same memory."""
    monkeypatch.setitem(backend_module._BACKENDS, LoopMemory, LoopBackend)
    inp = make("gated_delta", 23, seed=31, requires_grad=True)
    caching = Caching(aggregation, segments=[6, 1, 9, 7], init=init, top_k=2)

    def call(memory, part=inp, **kw):
        return memory_caching(
            part.q, part.k, part.v, part.u, memory=memory, caching=caching, gates=part.gates,
            **kw,
        )  # fmt: skip

    o_matrix, g_matrix = outputs_and_grads(
        lambda: call(MatrixMemory("gated_delta"), initial_state=inp.initial_state), inp.leaves()
    )
    o_loop, g_loop = outputs_and_grads(
        lambda: call(LoopMemory(), initial_state=inp.initial_state), inp.leaves()
    )
    assert_close(o_loop, o_matrix, 1e-12, "o")
    assert_grads_close(g_loop, g_matrix, 1e-10)
    o_ref = call(LoopMemory(), initial_state=inp.initial_state, impl="reference")
    assert_close(o_ref, o_matrix, 1e-12, "reference")

    def piece(a, b, cache):
        extra = dict(initial_state=inp.initial_state) if cache is None else dict(cache=cache)
        return call(LoopMemory(), inp.part(a, b), output_cache=True, **extra)

    for cuts in ([5, 6, 7, 15], list(range(9, 23))):
        o_str, cache = stream(piece, cuts, inp.T)
        assert_close(o_str, o_matrix, 1e-10, f"stream cut at {cuts}")
        assert cache.num_cached == (3 if declared(aggregation).keeps_segments else 0)
