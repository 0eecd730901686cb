"""torch.compile of the models, and the hot path without host reads it relies on
(docs/design.md §2.3): no graph break in a training forward or a decode step, compiled equals
eager, and the debug switch of the value checks."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from growmem import linear_memory, memory_caching
from growmem.models import CACHE_FIELD, GrowMemForCausalLM
from growmem.ops import checks
from growmem.ops.caching import SegmentPlan, matrix
from growmem.ops.checks import debug_checks, set_debug_checks, value_checks_enabled
from growmem.ops.spec import Caching, MatrixMemory
from tests.helpers import growmem_config, make_inputs, make_u

AGGREGATIONS = ("none", "residual", "grm", "ssc")
VOCAB = 32
# Graph breaks of one training forward (with the loss) and of one decode step with the cache
# of a 1-layer gated_delta model, counted as below (before the hot path lost its host reads:
# none 15 and 10, residual 20 and 10, grm 21 and 11, ssc 30 and 11).
GRAPH_BREAKS = {agg: {"train": 0, "decode": 0} for agg in AGGREGATIONS}
# Graphs a compiled 1-layer model (segment_size 4) has built after each decode step of tokens
# 3..16 (docs/design.md §2.3): the first step (the cache's counters still static); a segment
# closing (before tokens 4, 8, 12, 16) and a step inside a segment, each once while no segment
# is cached (N = 0, here the closing only: the first step was the rest of that segment), once
# with N = 1 (dynamo specialises sizes 0 and 1) and once for every N >= 2 (N dynamic); no
# memory ("none") caches nothing, so N stays 0. Before the cache's counters could be dynamic:
# one graph per step, until dynamo's recompile limit (8) sent the rest of the decode to eager.
DECODE_GRAPHS = {
    "none": [1, 2] + [3] * 12,
    "grm": [1, 2, 3, 3, 3, 4, 5, 5, 5] + [6] * 5,
    "ssc": [1, 2, 3, 3, 3, 4, 5, 5, 5] + [6] * 5,
}


def tiny_model(aggregation: str, device) -> GrowMemForCausalLM:
    torch.manual_seed(0)
    extra = {"top_k": 2} if aggregation == "ssc" else {}
    config = growmem_config(
        "gated_delta",
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_heads=2,
        aggregation=aggregation,
        segment_size=4,
        **extra,
    )
    return GrowMemForCausalLM(config).to(device)


def ids_on(device, T: int = 13) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1)).to(device)


def prefilled(model, ids):
    """The cache after ``ids`` (no gradient), to continue with a decode step."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True).past_key_values


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_compiled_model_matches_eager_without_graph_breaks(aggregation, device):
    """A training step (loss, logits, every gradient) and a decode step from a cache: the
    compiled model equals the eager one, and the graphs traced count the graph breaks."""
    model = tiny_model(aggregation, device)
    ids = ids_on(device)
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    results = []
    for run in (model, compiled):
        model.zero_grad()
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.logits.detach(), grads))
    breaks = {"train": counter.frame_count - 1}
    (logits, grads), (logits_c, grads_c) = results
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)

    model.eval()
    dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        step = [
            run(input_ids=ids[:, :1], cache=prefilled(model, ids), use_cache=True).logits
            for run in (model, compiled)
        ]
    breaks["decode"] = counter.frame_count - 1
    torch.testing.assert_close(step[1], step[0], rtol=1e-5, atol=1e-6)
    dynamo.reset()
    assert breaks == GRAPH_BREAKS[aggregation]


@pytest.mark.parametrize("aggregation", DECODE_GRAPHS)
def test_compiled_decode_builds_a_bounded_set_of_graphs(aggregation, device):
    """Decoding token by token with a compiled model: logits equal eager's at every step, and
    the graphs stop growing once a segment has closed with N >= 2 cached segments (the last
    segment, its closing included, compiles nothing new)."""
    model = tiny_model(aggregation, device).eval()  # segment_size 4
    ids = ids_on(device, T=3)
    dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    caches = {run: prefilled(model, ids) for run in (model, compiled)}  # 3 tokens, N = 0
    token = ids[:, -1:]
    graphs = []
    with torch.no_grad():
        for _ in range(14):  # tokens 3..16: segments close before tokens 4, 8, 12 and 16
            out = {run: run(input_ids=token, cache=caches[run], use_cache=True) for run in caches}
            torch.testing.assert_close(
                out[compiled].logits, out[model].logits, rtol=1e-5, atol=1e-6
            )
            caches = {run: getattr(out[run], CACHE_FIELD) for run in caches}
            token = out[model].logits[:, -1:].argmax(-1)
            graphs.append(counter.frame_count)
    dynamo.reset()
    assert graphs == DECODE_GRAPHS[aggregation]


@pytest.mark.parametrize(
    "plan, graphs",
    [(SegmentPlan(size=4), 2 + 1), (SegmentPlan(lengths=(3, 4, 5, 6, 7)), 2 + 4)],
)
def test_segment_plan_reads_a_dynamic_position_without_specialising(plan, graphs):
    """A decode step asks the plan about its position, a dynamic int under torch.compile: the
    steps inside a segment share a graph (plus the first, its position still static), and so
    do the closings of a constant plan; explicit lengths compare with each start (a graph per
    start). Before: a graph per position."""

    def step(x, p):
        (piece,) = plan.pieces(p, 1)  # one token: one piece
        if plan.is_start(p):  # a branch, as where a segment closes
            return x + piece[1] + 1
        return x + piece[1]

    x = torch.zeros(())
    dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(step, backend=counter)
    for p in range(1, 26):
        assert compiled(x, p) == 1 + plan.is_start(p)
    dynamo.reset()
    assert counter.frame_count == graphs


def test_value_checks_switch():
    x = torch.zeros(3)
    assert value_checks_enabled(x)  # eager, CPU: reading values is free
    with debug_checks(False):
        assert not value_checks_enabled(x)
        with debug_checks(True):
            assert value_checks_enabled(x)
        assert not value_checks_enabled(x)
    assert value_checks_enabled(x)
    with pytest.raises(ValueError, match="enabled must be True or False"):
        set_debug_checks("yes")

    def probe(x):
        return x + value_checks_enabled(x)

    assert probe(x).tolist() == [1.0] * 3
    assert torch.compile(probe, backend="eager", fullgraph=True)(x).tolist() == [0.0] * 3
    dynamo.reset()
    with debug_checks(True):  # forced: the checks run while compiling too
        assert torch.compile(probe, backend="eager")(x).tolist() == [1.0] * 3
    dynamo.reset()


def test_debug_checks_environment_variable(monkeypatch):
    for raw, expected in (("1", True), ("0", False), ("", None)):
        monkeypatch.setenv("GROWMEM_DEBUG_CHECKS", raw)
        assert checks._env_debug_checks() is expected
    monkeypatch.setenv("GROWMEM_DEBUG_CHECKS", "yes")
    with pytest.raises(ValueError, match="GROWMEM_DEBUG_CHECKS must be 0, 1 or unset"):
        checks._env_debug_checks()


def test_checks_off_read_no_values_and_keep_nan_causal():
    q, k, v, gates, _ = make_inputs("gated_delta", 2, 17, 2, 4, 3, seed=0)
    run = dict(rule="gated_delta", **gates, chunk_size=4)
    o_on, s_on = linear_memory(q, k, v, **run)
    with debug_checks(False):  # the guarded path, on finite inputs: the same numbers
        o_off, s_off = linear_memory(q, k, v, **run)
        assert torch.equal(o_on, o_off) and torch.equal(s_on, s_off)
        # a NaN still only reaches the outputs from its token on (ops/nonfinite.py)
        k = k.clone()
        k[:, 9] = float("nan")
        o_nan, _ = linear_memory(q, k, v, **run)
        assert torch.equal(o_nan[:, :9], o_on[:, :9]) and o_nan[:, 9:].isnan().all()
        # a value check is skipped: here the vocab range (the embedding fails instead)
        model = tiny_model("none", "cpu")
        with pytest.raises(IndexError):
            model(input_ids=torch.full((1, 3), VOCAB))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(input_ids=torch.full((1, 3), VOCAB))


def test_dense_routed_read_equals_routing(device, monkeypatch):
    """ssc without host reads (compiling, accelerators) reads every cache with the routing's
    weights scattered: equal to the per-token reference, outputs and gradients (float64)."""
    B, T, H, D = 2, 37, 2, 5
    q, k, v, gates, _ = make_inputs("gated_delta", B, T, H, D, D, seed=3)
    named = {"q": q, "k": k, "v": v, "u": make_u(B, T, H, D, seed=4), **gates}
    named = {n: x.detach().to(device).requires_grad_() for n, x in named.items()}
    caching = Caching(aggregation="ssc", segment_size=8, top_k=2)

    def run(impl):
        gates = {"g": named["g"], "beta": named["beta"]}
        o = memory_caching(
            named["q"], named["k"], named["v"], named["u"], memory=MatrixMemory("gated_delta"),
            caching=caching, gates=gates, impl=impl,
        )  # fmt: skip
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=o.dtype)
        return o, torch.autograd.grad((o * w.to(device)).sum(), list(named.values()))

    calls = []
    monkeypatch.setattr(matrix, "host_reads_free", lambda *x: calls.append(1) or False)
    o, grads = run("chunk")
    assert calls  # the dense path ran
    o_ref, grads_ref = run("reference")
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)
    for name, g, g_ref in zip(named, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=name)
