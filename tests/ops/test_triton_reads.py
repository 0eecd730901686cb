"""The Triton reads of cached matrix memories (growmem/ops/caching/triton_reads.py), run by the
Triton interpreter on CPU in float32 at odd sizes: outputs and every gradient against the
PyTorch reads (reads.py), and ``memory_caching(impl="triton")`` against impl="chunk" and the
per-token reference (grm, soup, ssc, loglinear on gated_delta), parallel and streaming; then
the impl choice (dispatch, errors, the layer's knob).

The suite installs triton (``make test``); without it the module is skipped, which strict
skips (GROWMEM_STRICT_SKIPS=1, as in CI) turn into a failure.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

pytest.importorskip("triton")

from growmem.layers import MemoryCachingAttention
from growmem.models import GrowMemConfig
from growmem.ops import Caching, memory_caching, memory_spec
from growmem.ops.caching import read_impl
from growmem.ops.caching.reads import mixed_read, sparse_read
from tests.helpers import (
    arg,
    assert_close,
    assert_grads_close,
    layer_past_loss,
    make_op_inputs,
    memory_config,
    outputs_and_grads,
    stream,
)

KERNELS = "growmem.ops.caching.triton_reads"
# float32 throughout: the kernels sum in float32 in another order than torch's matmuls (the
# largest relative errors measured: 1.5e-7 for the reads, 5e-7 end to end)
TOL = 1e-6
TOL_END_TO_END = 5e-6


@pytest.fixture(autouse=True, scope="module")
def kernels():
    """TRITON_INTERPRET=1 for this module's tests only (the interpreter reads it when the
    kernels are defined and when they run), and the kernels module imported under it; a
    module imported before (kernels compiled for a GPU) comes back afterwards."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    patch.delitem(sys.modules, KERNELS, raising=False)
    patch.setitem(sys.modules, KERNELS, importlib.import_module(KERNELS))
    yield sys.modules[KERNELS]
    patch.undo()


def _leaf(gen, *shape):
    return torch.randn(*shape, generator=gen).requires_grad_()


# (B, H, T, N, Dk, Dv, spans): odd sizes; tokens before the first cache; a count skipped (2 ->
# 4); one cache; none; a decode step; heads wider than one block (Dk > 16, Dv > 64)
DENSE_CASES = {
    "odd": (2, 3, 37, 5, 7, 9, [(0, 6, 0), (6, 15, 1), (15, 23, 2), (23, 31, 4), (31, 37, 5)]),
    "one cache": (1, 2, 11, 1, 3, 5, [(0, 4, 0), (4, 11, 1)]),
    "no cache": (2, 1, 9, 0, 5, 3, [(0, 9, 0)]),
    "decode": (2, 3, 1, 4, 7, 9, [(0, 1, 4)]),
    "wide": (1, 1, 20, 3, 17, 70, [(0, 5, 1), (5, 20, 3)]),
    "counts not sorted": (1, 2, 21, 3, 5, 4, [(0, 7, 3), (7, 12, 1), (12, 21, 2)]),
}


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_read_matches_torch(kernels, case):
    B, H, T, N, Dk, Dv, spans = DENSE_CASES[case]
    gen = torch.Generator().manual_seed(0)
    named = {"Q": _leaf(gen, B, H, T, Dk), "St": _leaf(gen, B, H, N, Dk, Dv)}
    named["W"] = _leaf(gen, B, H, T, N)
    o_t, g_t = outputs_and_grads(lambda: mixed_read(*named.values(), spans), named)
    o, g = outputs_and_grads(lambda: kernels.triton_mixed_read(*named.values(), spans), named)
    assert_close(o, o_t, TOL, f"{case}: output")
    assert_grads_close(g, g_t, TOL, case)
    if N:  # a token reads only the caches it sees: no gradient reaches the others' weights
        n_tok, _ = kernels.span_counts(spans, T, N, "cpu")
        unseen = torch.arange(N)[None, :] >= n_tok[:, None].long()  # [T, N]
        assert not g["W"][:, :, unseen].any(), f"{case}: gradient of an unseen cache's weight"


# (B, H, T, N, Dk, Dv, k, valid): odd sizes with empty slots (some tokens without any); every
# slot valid; a decode step (torch gathers there); one cache; heads wider than one block
ROUTED_CASES = {
    "odd": (2, 3, 37, 5, 7, 9, 3, "random"),
    "all valid": (2, 1, 13, 4, 5, 3, 2, None),
    "decode": (1, 2, 1, 6, 7, 9, 2, "random"),
    "one cache": (1, 1, 9, 1, 3, 5, 1, "random"),
    "wide": (1, 1, 18, 3, 20, 40, 2, "random"),
}


@pytest.mark.parametrize("case", ROUTED_CASES)
def test_routed_read_matches_torch(kernels, case):
    B, H, T, N, Dk, Dv, k, valid = ROUTED_CASES[case]
    gen = torch.Generator().manual_seed(1)
    named = {"Q": _leaf(gen, B, H, T, Dk), "St": _leaf(gen, B, H, N, Dk, Dv)}
    named["w"] = _leaf(gen, B, H, T, k)
    # distinct caches per token, as top-k selects them
    idx = torch.rand(B, H, T, N, generator=gen).argsort(-1)[..., :k]
    if valid is not None:
        valid = torch.rand(B, H, T, k, generator=gen) < 0.6
        if T > 2:
            valid[:, :, :2] = False  # tokens that see no cache yet
    args = (idx, named["w"], valid)
    o_t, g_t = outputs_and_grads(lambda: sparse_read(named["Q"], named["St"], *args), named)
    o, g = outputs_and_grads(
        lambda: kernels.triton_routed_read(named["Q"], named["St"], *args), named
    )
    assert_close(o, o_t, TOL, f"{case}: output")
    assert_grads_close(g, g_t, TOL, case)
    if valid is not None:
        assert not g["w"][~valid].any(), f"{case}: gradient of an empty slot's weight"


def _count_calls(patch, kernels) -> list[str]:
    """The names of the kernels' entry points, appended at each call."""
    calls = []
    for name in ("triton_mixed_read", "triton_routed_read"):
        fn = getattr(kernels, name)
        patch.setattr(kernels, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    return calls


# the kernels each aggregation reads with (residual: prefix sums, in torch)
READS = {
    "grm": "triton_mixed_read",
    "soup": "triton_mixed_read",
    "ssc": "triton_routed_read",
    "loglinear": "triton_routed_read",
    "residual": None,
}


def _caching(inp, aggregation, impl, **kw):
    return memory_caching(
        inp.q, inp.k, inp.v, inp.u,
        memory=memory_spec(inp.rule),
        caching=Caching(aggregation, segment_size=8, top_k=2),
        gates={**inp.gates, "temperature": torch.full((inp.q.shape[2],), 3.0)},
        init_weights=inp.init_weights,
        initial_state=None if kw.get("cache") else inp.initial_state, impl=impl, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("aggregation", READS)
def test_memory_caching_triton_matches_chunk_and_reference(kernels, monkeypatch, aggregation):
    """Outputs and the gradients of every input: 37 tokens in segments of 8 (4 cached).
    loglinear reads its buckets by the routed kernels; residual reads prefix sums in torch
    whatever impl is."""
    inp = make_op_inputs("gated_delta", 37, b=2, h=3, dk=7, dv=9, dtype=torch.float32,
                         requires_grad=True)  # fmt: skip
    calls = _count_calls(monkeypatch, kernels)
    results = {}
    for impl in ("triton", "chunk", "reference"):
        run = lambda impl=impl: _caching(inp, aggregation, impl)  # noqa: E731
        results[impl] = outputs_and_grads(run, inp.leaves())
        assert set(calls) == ({READS[aggregation]} - {None} if impl == "triton" else set())
        calls.clear()
    o, g = results["triton"]
    for other in ("chunk", "reference"):
        o_x, g_x = results[other]
        assert_close(o, o_x, TOL_END_TO_END, f"{aggregation}: triton vs {other}")
        assert_grads_close(g, g_x, TOL_END_TO_END, f"{aggregation}: triton vs {other}")


@pytest.mark.parametrize("aggregation", ["grm", "ssc"])
def test_streamed_triton_equals_parallel(aggregation):
    """Calls of 5, 1 (decode steps) and 11 tokens with impl="triton" give the parallel
    outputs."""
    inp = make_op_inputs("gated_delta", 27, b=1, h=2, dk=5, dv=3, dtype=torch.float32)
    full = _caching(inp, aggregation, "chunk")

    def call(a, b, cache):
        return _caching(inp.part(a, b), aggregation, "triton", cache=cache, output_cache=True)

    o, _ = stream(call, [5, 13, 14, 15, 16], 27)
    assert_close(o, full, TOL_END_TO_END, f"{aggregation}: streamed triton vs parallel chunk")


def test_layer_impl_reaches_the_op(kernels, monkeypatch):
    """MemoryConfig.impl: a layer with impl="triton" equals one with "chunk" (outputs and
    d/dx), and refuses the kernels on CPU outside the interpreter."""
    torch.manual_seed(0)
    layers = {
        impl: MemoryCachingAttention(
            24, 2, memory_config(impl=impl, aggregation="grm", segment_size=4)
        )
        for impl in ("chunk", "triton")
    }
    layers["triton"].load_state_dict(layers["chunk"].state_dict())
    x = torch.randn(2, 11, 24)
    calls = _count_calls(monkeypatch, kernels)
    o_c, g_c = layer_past_loss(layers["chunk"], x, 11)
    assert not calls
    o_t, g_t = layer_past_loss(layers["triton"], x, 11)
    assert calls == ["triton_mixed_read"]
    assert_close(o_t, o_c, TOL_END_TO_END, "layer output")
    assert_close(g_t, g_c, TOL_END_TO_END, "layer d/dx")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"^impl='triton' runs on CUDA"):
            layers["triton"](x)


def test_deep_memories_read_in_torch_whatever_impl(kernels, monkeypatch):
    """titans' cached memories are MLPs: impl="triton" reads them as impl="chunk" does."""
    inp = make_op_inputs("titans", 19, b=1, h=2, dk=4, dh=8, dtype=torch.float32)
    calls = _count_calls(monkeypatch, kernels)
    o = _caching(inp, "grm", "triton")
    assert not calls
    assert torch.equal(o, _caching(inp, "grm", "chunk"))


def _gated_delta_call(impl, dtype=torch.float32, device="cpu"):
    inp = make_op_inputs("gated_delta", 9, b=1, h=1, dk=3, dv=2, dtype=dtype)
    return lambda: _caching(inp, "grm", impl)


def test_impl_choice():
    """auto reads with torch on CPU; explicit triton names what it needs when it cannot run;
    an unknown impl names the choices; a layer's impl is checked and is no cache setting."""
    cpu = torch.device("cpu")
    assert read_impl.resolve_reads("auto", torch.float32, cpu) == "torch"
    assert read_impl.resolve_reads("chunk", torch.float32, cpu) == "torch"
    assert read_impl.resolve_reads("triton", torch.float32, cpu) == "triton"  # interpreter
    with pytest.raises(ValueError, match=r"^impl='triton'.*float64"):
        _gated_delta_call("triton", torch.float64)()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match=r"^impl='triton' runs on CUDA"):
            _gated_delta_call("triton")()
        patch.setattr(read_impl, "triton_importable", lambda: False)
        with pytest.raises(ImportError, match=r"growmem\[triton\]"):
            _gated_delta_call("triton")()
    with pytest.raises(ValueError, match=r"^impl must be one of \['auto', 'chunk', 'triton'"):
        _gated_delta_call("torch")()
    with pytest.raises(ValueError, match=arg("impl")):
        memory_config(impl="reference")
    assert "impl" not in dict(memory_config(impl="triton").settings())
    # the model config carries it in its memory settings, through config.json too
    config = GrowMemConfig(memory={"rule": "gated_delta", "impl": "triton"})
    assert GrowMemConfig.from_dict(config.to_dict()).memory.impl == "triton"
