"""Tests of growmem.layers.MemoryCachingAttention (and its ShortConvolution).

In float64 with small dims: shapes, streaming == parallel, causality, padding (outputs at
real tokens equal the unpadded row's, pads give 0, decoding after a padded prefill), the
cache's size, beam reordering, gradients, bf16 autocast and bad input. Then the short conv.
"""

from __future__ import annotations

import pytest
import torch

from growmem.layers import (
    MemoryCachingAttention,
    MemoryCachingLayerCache,
    MemoryConfig,
    RowGroup,
    ShortConvolution,
)
from growmem.ops.caching import AGGREGATIONS
from growmem.ops.checks import LINEAR_RULES
from growmem.ops.deep import DEEP_RULES
from tests.helpers import (
    aggregation_inits,
    assert_finite_and_equal,
    memory_config,
    nan_from,
    rel_err,
)
from tests.helpers import layer_past_loss as _past_loss_run
from tests.helpers import stream_layer as stream

ALL_RULES = LINEAR_RULES + DEEP_RULES

HIDDEN, HEADS, SEG = 32, 2, 8
T_FULL = 37
TOL = 1e-10


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def make_layer(
    rule: str = "gated_delta",
    aggregation: str = "grm",
    init: str = "continuous",
    *,
    head_dim: int = 12,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    **settings,
) -> MemoryCachingAttention:
    """A small layer with segments of 8 (``settings``: more MemoryConfig settings, flat, as
    ``tests.helpers.memory_config`` takes them); chunk_size 16 so that T = 37 spans several
    chunks of the scans, and for the deep rules mini-batches of 3 (not dividing the segments
    of 8: the grid restarts)."""
    torch.manual_seed(seed)
    settings.setdefault(
        "chunk_size" if rule in LINEAR_RULES else "mini_batch", 16 if rule in LINEAR_RULES else 3
    )
    if "segments" not in settings:
        settings.setdefault("segment_size", SEG)
    config = memory_config(rule, aggregation=aggregation, init=init, **settings)
    layer = MemoryCachingAttention(HIDDEN, HEADS, config, head_dim=head_dim)
    if layer.uses_u:  # gates far from uniform, so a wrong gate shows
        inner = layer.num_heads * layer.head_dim
        with torch.no_grad():
            layer.in_proj.weight[3 * inner : 4 * inner].mul_(4.0)  # the u rows
    return layer.to(dtype)


def randx(B: int, T: int, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)


def alone(layer, x_row: torch.Tensor) -> torch.Tensor:
    """The layer over one row's tokens [n, hidden], no padding: [n, hidden]."""
    o, _ = layer(x_row[None])
    return o[0]


def check_groups(cache: MemoryCachingLayerCache) -> None:
    """Every batch row belongs to exactly one group."""
    assert isinstance(cache, MemoryCachingLayerCache)
    rows = torch.cat([g.rows.cpu() for g in cache.groups])
    assert sorted(rows.tolist()) == list(range(cache.batch_size))


def row_state(cache: MemoryCachingLayerCache, r: int):
    """(seen_tokens, segment_tokens) and the state tensors of batch row r."""
    for group in cache.groups:
        hit = (group.rows == r).nonzero().flatten()
        if len(hit):
            sub = group.index_select(hit)
            mem = sub.memory
            tensors = [] if sub.conv is None else [sub.conv]
            if mem is None:
                return None, tensors
            tensors += mem.tensors()
            return (mem.seen_tokens, mem.segment_tokens), tensors
    raise AssertionError(f"row {r} is in no group")


def assert_same_row_state(cache_a, ra, cache_b, rb):
    counts_a, ta = row_state(cache_a, ra)
    counts_b, tb = row_state(cache_b, rb)
    assert counts_a == counts_b
    assert len(ta) == len(tb)
    for a, b in zip(ta, tb, strict=True):
        assert a.shape == b.shape
        assert torch.equal(a, b)


def mask_from_lengths(T, spans):
    """[B, T] long mask with ones on the given half-open spans per row."""
    m = torch.zeros(len(spans), T, dtype=torch.long)
    for r, row in enumerate(spans):
        for a, b in row:
            m[r, a:b] = 1
    return m


# Real-token spans of 3 rows of 37 tokens.
LAYOUTS = {
    "left": [[(5, 37)], [(0, 37)], [(20, 37)]],
    "right": [[(0, 34)], [(0, 37)], [(0, 25)]],
    "middle": [[(0, 7), (15, 37)], [(2, 30)], [(0, 37)]],
}


# --------------------------------------------------------------------------------------------
# 1. shapes and dtype
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", ALL_RULES)
def test_shapes_and_dtype(rule, aggregation):
    layer = make_layer(rule, aggregation, head_dim=8)  # inner 16 != hidden 32
    x = randx(2, T_FULL)
    o, cache = layer(x)
    assert o.shape == (2, T_FULL, HIDDEN)
    assert o.dtype == torch.float64
    assert torch.isfinite(o).all()
    assert o.abs().sum() > 0
    assert cache is None
    o2, cache = layer(x, use_cache=True)
    assert torch.equal(o2, o)
    check_groups(cache)
    assert cache.batch_size == 2
    assert all(isinstance(g, RowGroup) for g in cache.groups)
    o3, cache3 = layer(x[:, :1], cache=cache)
    assert o3.shape == (2, 1, HIDDEN) and o3.dtype == torch.float64
    assert cache3 is None
    f32 = make_layer(rule, aggregation, dtype=torch.float32)
    o32, _ = f32(randx(2, 5, dtype=torch.float32))
    assert o32.dtype == torch.float32 and o32.shape == (2, 5, HIDDEN)


# --------------------------------------------------------------------------------------------
# 2. streaming == parallel
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_short_conv", [False, True], ids=["noconv", "conv"])
@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", ALL_RULES)
def test_streaming_equals_parallel(rule, aggregation, init, use_short_conv):
    layer = make_layer(rule, aggregation, init, use_short_conv=use_short_conv)
    x = randx(2, T_FULL)
    with torch.no_grad():
        full, _ = layer(x)
        for pieces in ([10, 1, 19, 7], [13] + [1] * 24):
            o, cache = stream(layer, x, pieces)
            assert rel_err(o, full) < TOL, pieces
            check_groups(cache)
            assert len(cache.groups) == 1
            assert cache.groups[0].memory.seen_tokens == T_FULL


@pytest.mark.parametrize(
    "kw",
    [
        dict(summary="sum", aggregation="ssc", top_k=1),
        dict(summary="sum", aggregation="grm", init="independent"),
        dict(conv_size=2, aggregation="ssc", top_k=3, rule="swla"),
        dict(conv_size=1, aggregation="residual", rule="decay"),
        dict(qk_norm=False, aggregation="mean", rule="linear"),
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_streaming_equals_parallel_other_options(kw):
    layer = make_layer(**kw)
    x = randx(2, T_FULL, seed=3)
    with torch.no_grad():
        full, _ = layer(x)
        o, _ = stream(layer, x, [3, 5, 1, 8, 1, 19])
    assert rel_err(o, full) < TOL


def test_cache_is_not_changed_by_continuing_it():
    """A cache can be continued twice (e.g. to compare two continuations)."""
    layer = make_layer("swla", "ssc")
    x = randx(2, 20)
    with torch.no_grad():
        _, cache = layer(x[:, :12], use_cache=True)
        a, _ = layer(x[:, 12:], cache=cache, use_cache=True)
        layer(randx(2, 8, seed=9), cache=cache, use_cache=True)
        b, _ = layer(x[:, 12:], cache=cache, use_cache=True)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# 3. causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", ALL_RULES)
def test_future_tokens_do_not_change_past_outputs(rule, aggregation, init):
    layer = make_layer(rule, aggregation, init)
    x = randx(2, T_FULL)
    with torch.no_grad():
        o, _ = layer(x)
        for t0 in (3, 16, 30):
            y = x.clone()
            y[:, t0:] = randx(2, T_FULL - t0, seed=t0)
            o2, _ = layer(y)
            assert (o2[:, :t0] - o[:, :t0]).abs().max() < 1e-12, t0
            assert (o2[:, t0] - o[:, t0]).abs().max() > 1e-6, t0  # the change is seen at t0


# --------------------------------------------------------------------------------------------
# 4. padding
# --------------------------------------------------------------------------------------------

PAD_CONFIGS = [
    *(("gated_delta", a, "continuous") for a in AGGREGATIONS),
    ("swla", "ssc", "continuous"),
    ("delta", "grm", "independent"),
    ("linear", "mean", "independent"),
    ("titans", "soup", "continuous"),
    ("dla", "ssc", "independent"),
]


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.int32, torch.bool])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("rule", "aggregation", "init"), PAD_CONFIGS)
def test_padded_rows_equal_rows_alone(rule, aggregation, init, layout, mask_dtype):
    layer = make_layer(rule, aggregation, init)
    x = randx(3, T_FULL)
    mask = mask_from_lengths(T_FULL, LAYOUTS[layout])
    with torch.no_grad():
        o, cache = layer(x, attention_mask=mask.to(mask_dtype), use_cache=True)
        real = mask.bool()
        assert torch.equal(o[~real], torch.zeros_like(o[~real]))  # pads are exactly 0
        for r in range(3):
            ref = alone(layer, x[r, real[r]])
            assert rel_err(o[r, real[r]], ref) < TOL, r
            assert row_state(cache, r)[0][0] == int(real[r].sum())
        o_none, _ = layer(x, attention_mask=mask.to(mask_dtype))
    assert torch.equal(o_none, o)
    check_groups(cache)


@pytest.mark.parametrize("decode_mask", ["none", "ones_long", "ones_bool"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("rule", "aggregation", "init"),
    [
        ("gated_delta", "grm", "continuous"),
        ("swla", "ssc", "independent"),
        ("decay", "mean", "continuous"),
        ("delta", "none", "continuous"),
    ],
)
def test_decode_after_padded_prefill(rule, aggregation, init, layout, decode_mask):
    layer = make_layer(rule, aggregation, init)
    prompt, new = randx(3, 25), randx(3, 7, seed=2)
    mask = mask_from_lengths(37, LAYOUTS[layout])[:, 12:]  # 25 columns, padded as named
    real = mask.bool()
    with torch.no_grad():
        _, cache = layer(prompt, attention_mask=mask, use_cache=True)
        if layout != "left":
            assert len(cache.groups) == 3
        outs, start = [], 0
        for n in (1, 1, 1, 1, 3):
            m = {
                "none": None,
                "ones_long": torch.ones(3, n, dtype=torch.long),
                "ones_bool": torch.ones(3, n, dtype=torch.bool),
            }[decode_mask]
            o, cache = layer(
                new[:, start : start + n], attention_mask=m, cache=cache, use_cache=True
            )
            outs.append(o)
            start += n
        o = torch.cat(outs, 1)
        for r in range(3):
            ref = alone(layer, torch.cat([prompt[r, real[r]], new[r]]))[-7:]
            assert rel_err(o[r], ref) < TOL, r
    check_groups(cache)


@pytest.mark.parametrize("first_call", [False, True], ids=["after_prefill", "first_call"])
@pytest.mark.parametrize(("rule", "aggregation"), [("gated_delta", "grm"), ("swla", "ssc")])
def test_fully_padded_row_keeps_its_state(rule, aggregation, first_call):
    layer = make_layer(rule, aggregation)
    prompt, x2, x3 = randx(3, 11), randx(3, 4, seed=2), randx(3, 3, seed=3)
    pad = torch.ones(3, 4, dtype=torch.long)
    pad[1] = 0
    with torch.no_grad():
        if first_call:
            o2, cache2 = layer(x2, attention_mask=pad, use_cache=True)
            assert row_state(cache2, 1) == (None, [])  # nothing seen yet
        else:
            _, cache1 = layer(prompt, use_cache=True)
            o2, cache2 = layer(x2, attention_mask=pad, cache=cache1, use_cache=True)
            assert_same_row_state(cache2, 1, cache1, 1)
        assert torch.equal(o2[1], torch.zeros_like(o2[1]))
        check_groups(cache2)
        o3, cache3 = layer(x3, cache=cache2, use_cache=True)
        check_groups(cache3)
        for r in range(3):
            seen = [x2[r]] if first_call else [prompt[r], x2[r]]
            if r == 1:
                seen = [] if first_call else [prompt[r]]
            ref2 = alone(layer, torch.cat(seen))[-4:] if r != 1 else None
            ref3 = alone(layer, torch.cat([*seen, x3[r]]))[-3:]
            if ref2 is not None:
                assert rel_err(o2[r], ref2) < TOL, r
            assert rel_err(o3[r], ref3) < TOL, r


# --------------------------------------------------------------------------------------------
# 5. state_size
# --------------------------------------------------------------------------------------------

SIZE_CONFIGS = [
    dict(rule="gated_delta", aggregation="grm"),
    dict(rule="swla", aggregation="none"),
    dict(rule="swla", aggregation="ssc", init="independent"),
    dict(rule="linear", aggregation="mean", use_short_conv=False),
    dict(rule="delta", aggregation="residual", conv_size=2),
    dict(rule="decay", aggregation="none", use_short_conv=False),
    dict(rule="titans", aggregation="grm"),
    dict(rule="titans", aggregation="none", init="independent"),
    dict(rule="dla", aggregation="soup", mini_batch=4),
]


@pytest.mark.parametrize("T", [1, 8, 9, 37])
@pytest.mark.parametrize("kw", SIZE_CONFIGS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_state_size_equals_cache_nbytes(kw, T):
    layer = make_layer(**kw, dtype=torch.float32)
    with torch.no_grad():
        _, cache = layer(randx(1, T, dtype=torch.float32), use_cache=True)
        assert cache.nbytes() == layer.state_size(T)
        if T > 1:  # streamed: the same size
            _, streamed = stream(layer, randx(1, T, dtype=torch.float32), [1, T - 1])
            assert streamed.nbytes() == layer.state_size(T)
        _, cache3 = layer(randx(3, T, dtype=torch.float32), use_cache=True)
        assert cache3.nbytes() == layer.state_size(T, batch_size=3)
    assert layer.state_size(T, batch_size=3) == 3 * layer.state_size(T)


@pytest.mark.parametrize("T", [1, 8, 9, 37])
@pytest.mark.parametrize(
    "kw",
    [
        dict(rule="gated_delta", segments="log"),
        dict(rule="titans", segments="log", mini_batch=4),
        dict(rule="swla", segments=[3, 6, 12, 16]),
        dict(rule="dla", aggregation="ssc", segments=[3, 6, 12, 16], mini_batch=4),
    ],
    ids=lambda kw: "-".join(map(str, kw.values())),
)
def test_state_size_with_log_and_explicit_segments(kw, T):
    layer = make_layer(**kw, dtype=torch.float32)
    with torch.no_grad():
        _, cache = layer(randx(1, T, dtype=torch.float32), use_cache=True)
        assert cache.nbytes() == layer.state_size(T)
        if T > 1 and kw["segments"] != "log":  # "log" follows one call's length
            _, streamed = stream(layer, randx(1, T, dtype=torch.float32), [1, T - 1])
            assert streamed.nbytes() == layer.state_size(T)


def test_state_size_float64_and_padded_cache():
    layer = make_layer("swla", "grm")
    mask = mask_from_lengths(T_FULL, LAYOUTS["left"])
    with torch.no_grad():
        _, cache = layer(randx(3, T_FULL), use_cache=True)
        assert cache.nbytes() == layer.state_size(T_FULL, batch_size=3, dtype=torch.float64)
        _, padded = layer(randx(3, T_FULL), attention_mask=mask, use_cache=True)
    expected = sum(layer.state_size(int(n), dtype=torch.float64) for n in mask.sum(1))
    assert padded.nbytes() == expected


def test_aggregation_none_cache_does_not_grow():
    layer = make_layer("gated_delta", "none", dtype=torch.float32)
    grm = make_layer("gated_delta", "grm", dtype=torch.float32)
    x = randx(1, T_FULL, dtype=torch.float32)
    with torch.no_grad():
        assert layer(x[:, :2], use_cache=True)[1].nbytes() == layer(x, use_cache=True)[1].nbytes()
        assert grm(x[:, :2], use_cache=True)[1].nbytes() < grm(x, use_cache=True)[1].nbytes()


# --------------------------------------------------------------------------------------------
# 6. reorder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beam_idx", [[2, 0, 0], [1, 2, 0]], ids=["200", "120"])
@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "padded"])
@pytest.mark.parametrize(
    ("rule", "aggregation", "init"),
    [
        ("gated_delta", "grm", "continuous"),
        ("swla", "ssc", "independent"),
        ("delta", "mean", "continuous"),
    ],
)
def test_reorder_equals_batch_of_reordered_rows(rule, aggregation, init, padded, beam_idx):
    layer = make_layer(rule, aggregation, init)
    prompt, new = randx(3, 13), randx(3, 6, seed=2)
    # padded: rows of 13, 6 and 9 tokens, three groups
    mask = mask_from_lengths(13, [[(0, 13)], [(7, 13)], [(4, 13)]]) if padded else None
    idx = torch.tensor(beam_idx)
    with torch.no_grad():
        _, cache = layer(prompt, attention_mask=mask, use_cache=True)
        if padded:
            assert len(cache.groups) == 3
        before, _ = stream(layer, new, [1] * 6, cache=cache)
        reordered = cache.reorder(idx)
        check_groups(reordered)
        assert reordered.batch_size == 3
        for i, j in enumerate(beam_idx):
            assert_same_row_state(reordered, i, cache, j)
        o, _ = stream(layer, new, [1] * 6, cache=reordered)
        _, ref_cache = layer(
            prompt[idx], attention_mask=None if mask is None else mask[idx], use_cache=True
        )
        ref, _ = stream(layer, new, [1] * 6, cache=ref_cache)
        after, _ = stream(layer, new, [1] * 6, cache=cache)  # the original is untouched
    assert rel_err(o, ref) < TOL
    assert torch.equal(after, before)
    assert rel_err(o, before) > 1e-3  # the reordering matters


def test_reorder_can_expand_the_batch():
    """Prefill once per prompt, then expand each prompt to 2 beams."""
    layer = make_layer()
    prompt, new = randx(3, 13), randx(6, 4, seed=2)
    idx = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        _, cache = layer(prompt, use_cache=True)
        expanded = cache.reorder(idx)
        o, _ = stream(layer, new, [1] * 4, cache=expanded)
        _, ref_cache = layer(prompt[idx], use_cache=True)
        ref, _ = stream(layer, new, [1] * 4, cache=ref_cache)
    assert expanded.batch_size == 6
    assert rel_err(o, ref) < TOL
    listed = cache.reorder([0, 0, 1, 1, 2, 2])  # a plain list of rows works too
    assert listed.batch_size == 6 and len(listed.groups) == len(expanded.groups)


# --------------------------------------------------------------------------------------------
# 7. gradients and autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "padded"])
@pytest.mark.parametrize("rule", ALL_RULES)
def test_gradients_reach_every_parameter(rule, padded):
    layer = make_layer(rule, "grm")
    x = randx(2, T_FULL).requires_grad_(True)
    mask = mask_from_lengths(T_FULL, LAYOUTS["middle"][:2]) if padded else None
    o, _ = layer(x, attention_mask=mask)
    w = randx(2, T_FULL, seed=5)
    (o * w).sum().backward()
    names = [n for n, _ in layer.named_parameters()]
    assert {"in_proj.weight", "conv.weight", "o_proj.weight"} <= set(names)
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    if padded:  # pads neither output nor influence anything
        real = mask.bool()
        assert torch.equal(x.grad[~real], torch.zeros_like(x.grad[~real]))


@pytest.mark.parametrize(
    ("rule", "aggregation"),
    [("gated_delta", "grm"), ("swla", "ssc"), ("delta", "residual"), ("decay", "none")],
)
def test_autocast_bf16_forward_backward(rule, aggregation):
    layer = make_layer(rule, aggregation, dtype=torch.float32)
    x = randx(2, T_FULL, dtype=torch.float32).requires_grad_(True)
    with torch.no_grad():
        ref, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = layer(x)
    assert o.shape == ref.shape
    assert torch.isfinite(o).all()
    assert rel_err(o.float(), ref) < 0.05
    (o.float() * randx(2, T_FULL, seed=5, dtype=torch.float32)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_autocast_bf16_with_padding():
    layer = make_layer(dtype=torch.float32)
    x = randx(3, T_FULL, dtype=torch.float32)
    mask = mask_from_lengths(T_FULL, LAYOUTS["left"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = layer(x, attention_mask=mask)
    assert torch.isfinite(o).all()


# --------------------------------------------------------------------------------------------
# 8. bad input
# --------------------------------------------------------------------------------------------


def arg(name: str) -> str:
    return rf"\b{name}\b"


LAYER_ARGS = ("hidden_size", "num_heads", "head_dim", "norm_eps")


def build(**changes) -> MemoryCachingAttention:
    """A layer of HIDDEN, HEADS and segments of SEG with ``changes``: the layer's own
    arguments, and flat MemoryConfig settings (built first: bad ones fail there, once)."""
    layer_args = dict(hidden_size=HIDDEN, num_heads=HEADS)
    layer_args.update({k: changes.pop(k) for k in LAYER_ARGS if k in changes})
    config = memory_config(**{"segment_size": SEG, **changes})
    return MemoryCachingAttention(config=config, **layer_args)


BAD_INIT = {
    "unknown rule": (arg("rule"), dict(rule="lstm")),
    "unknown aggregation": (arg("aggregation"), dict(aggregation="max")),
    "unknown init": (arg("init"), dict(init="random")),
    "unknown summary": (arg("summary"), dict(summary="max")),
    "loglinear with independent init": (
        arg("aggregation"),
        dict(aggregation="loglinear", init="independent"),
    ),
    "hidden_size not divisible": (
        arg("hidden_size") + ".*" + arg("num_heads"),
        dict(hidden_size=30, num_heads=4),
    ),
    "segment_size 0": (arg("segment_size"), dict(segment_size=0)),
    "segment_size float": (arg("segment_size"), dict(segment_size=8.0)),
    "segment_size and segments": (arg("segment_size"), dict(segments="log")),
    "segments unknown": (arg("segments"), dict(segment_size=None, segments="linear")),
    "segments length 0": (arg("segments"), dict(segment_size=None, segments=[4, 0])),
    "gate_scale 0": (arg("gate_scale"), dict(gate_scale=0.0)),
    "top_k 0": (arg("top_k"), dict(top_k=0)),
    "num_heads 0": (arg("num_heads"), dict(num_heads=0)),
    "head_dim 0": (arg("head_dim"), dict(head_dim=0)),
    "chunk_size 0": (arg("chunk_size"), dict(chunk_size=0)),
    "conv_size 0": (arg("conv_size"), dict(conv_size=0)),
    "expansion 0": (arg("expansion"), dict(rule="titans", expansion=0)),
    "mini_batch 0": (arg("mini_batch"), dict(rule="dla", mini_batch=0)),
    "eta_max 0": (arg("eta_max"), dict(rule="titans", eta_max=0.0)),
    "eta_max negative": (arg("eta_max"), dict(rule="dla", eta_max=-0.1)),
    # a deep memory's knob on a matrix memory cannot be expressed
    "expansion on a matrix rule": (arg("expansion"), dict(expansion=4)),
    "mini_batch on a matrix rule": (arg("mini_batch"), dict(mini_batch=16)),
    "eta_max on a matrix rule": (arg("eta_max"), dict(eta_max=0.1)),
    "chunk_size on a deep rule": (arg("chunk_size"), dict(rule="titans", chunk_size=16)),
    "decay_to on dla": (arg("decay_to"), dict(rule="dla", decay_to="zero")),
    "eta_max inf": (arg("eta_max"), dict(rule="dla", eta_max=float("inf"))),
    "eta_max nan": (arg("eta_max"), dict(rule="titans", eta_max=float("nan"))),
    "max_grad_norm negative": (arg("max_grad_norm"), dict(rule="titans", max_grad_norm=-1.0)),
    "norm_eps 0": (arg("norm_eps"), dict(norm_eps=0.0)),
    "norm_eps negative": (arg("norm_eps"), dict(norm_eps=-1e-6)),
    "use_short_conv 'no'": (arg("use_short_conv"), dict(use_short_conv="no")),
    "qk_norm 0": (arg("qk_norm"), dict(qk_norm=0)),
    "norm 'yes'": (arg("norm"), dict(rule="titans", norm="yes")),
    # the gates
    "gate_norm unknown": (arg("gate_norm"), dict(gate_norm="cosine")),
    "detach_summaries 'yes'": (arg("detach_summaries"), dict(detach_summaries="yes")),
    "gate_temperature 0": (arg("gate_temperature"), dict(gate_temperature=0.0)),
    "gate_temperature negative": (arg("gate_temperature"), dict(gate_temperature=-1.0)),
    "gate_temperature nan": (arg("gate_temperature"), dict(gate_temperature=float("nan"))),
    "gate_online_bias inf": (arg("gate_online_bias"), dict(gate_online_bias=float("inf"))),
    "gate_online_bias '4'": (arg("gate_online_bias"), dict(gate_online_bias="4")),
    "gate_online_bias True": (arg("gate_online_bias"), dict(gate_online_bias=True)),
    "summary_source unknown": (arg("summary_source"), dict(summary_source="input")),
    "o_norm_eps 0": (arg("o_norm_eps"), dict(o_norm_eps=0.0)),
}


@pytest.mark.parametrize("case", list(BAD_INIT))
def test_bad_constructor_argument(case):
    pattern, changes = BAD_INIT[case]
    with pytest.raises(ValueError, match=pattern):
        build(**changes)


def test_config_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match="config must be a MemoryConfig, got dict"):
        MemoryCachingAttention(HIDDEN, HEADS, {"rule": "delta"})
    with pytest.raises(TypeError, match="memory must be a MatrixMemory or DeepMemory"):
        MemoryConfig(memory="delta")
    with pytest.raises(TypeError, match=r"unexpected arguments \['segment'\]"):
        MemoryCachingAttention(HIDDEN, HEADS, segment=8)


def test_good_constructor_arguments_run():
    build()
    build(rule="titans", max_grad_norm=None, eta_max=1)
    layer = build(hidden_size=30, num_heads=4, head_dim=8)
    assert layer.head_dim == 8
    o, _ = layer(torch.randn(1, 3, 30))
    assert o.shape == (1, 3, 30)


def _bad_forward_cases():
    x = randx(3, 6, dtype=torch.float32)
    ones = torch.ones(3, 6, dtype=torch.long)
    twos = ones.clone()
    twos[1, 2] = 2
    negative = ones.clone()
    negative[0, 0] = -1
    return {
        "hidden_states wrong last dim": (arg("hidden_states"), dict(hidden_states=x[..., :31])),
        "hidden_states rank 2": (arg("hidden_states"), dict(hidden_states=x[0])),
        "hidden_states rank 4": (arg("hidden_states"), dict(hidden_states=x[None])),
        "hidden_states no tokens": (arg("hidden_states"), dict(hidden_states=x[:, :0])),
        "attention_mask too long": (arg("attention_mask"), dict(attention_mask=ones[:, :5])),
        "attention_mask transposed": (arg("attention_mask"), dict(attention_mask=ones.T)),
        "attention_mask rank 1": (arg("attention_mask"), dict(attention_mask=ones[0])),
        "attention_mask rank 3": (arg("attention_mask"), dict(attention_mask=ones[..., None])),
        "attention_mask list": (arg("attention_mask"), dict(attention_mask=ones.tolist())),
        "attention_mask value 2": (arg("attention_mask"), dict(attention_mask=twos)),
        "attention_mask value -1": (arg("attention_mask"), dict(attention_mask=negative)),
        "cache of another batch size": (arg("cache"), dict(cache="batch2")),
        "cache of another type": (arg("cache"), dict(cache="op_cache")),
        "cache a dict": (arg("cache"), dict(cache={"groups": []})),
    }


BAD_FORWARD = list(_bad_forward_cases())


def _forward_kwargs(layer, changes):
    kw = dict(hidden_states=randx(3, 6, dtype=torch.float32), attention_mask=None, cache=None)
    kw.update(changes)
    if kw["cache"] == "batch2":
        kw["cache"] = layer(randx(2, 6, dtype=torch.float32), use_cache=True)[1]
    elif kw["cache"] == "op_cache":
        kw["cache"] = layer(randx(3, 6, dtype=torch.float32), use_cache=True)[1].groups[0].memory
    return kw


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_argument(case):
    layer = make_layer(dtype=torch.float32)
    pattern, changes = _bad_forward_cases()[case]
    kw = _forward_kwargs(layer, changes)
    with pytest.raises(ValueError, match=pattern):
        layer(**kw, use_cache=True)


@pytest.mark.parametrize(
    "changes",
    [
        dict(aggregation="ssc"),
        dict(init="independent"),
        dict(conv_size=2),
        dict(use_short_conv=False),
        dict(rule="delta"),
        dict(summary="sum"),
        dict(qk_norm=False),
        dict(head_dim=8),
        dict(dtype=torch.float64),  # the cache holds float32 states
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_cache_of_another_configuration_is_rejected(changes):
    layer = make_layer(dtype=torch.float32)
    other = make_layer(**{"dtype": torch.float32, **changes})
    x = randx(2, 10, dtype=torch.float32)
    _, cache = layer(x, use_cache=True)
    layer(x[:, :2], cache=cache)  # the layer that built it continues it
    with pytest.raises(ValueError, match=arg("cache")):
        other(x[:, :2].to(other.in_proj.weight.dtype), cache=cache)


def test_good_forward_arguments_run():
    layer = make_layer(dtype=torch.float32)
    _, cache = layer(**_forward_kwargs(layer, {}), use_cache=True)
    ones = torch.ones(3, 6, dtype=torch.long)
    o, _ = layer(**_forward_kwargs(layer, dict(attention_mask=ones, cache=cache)))
    assert o.shape == (3, 6, HIDDEN)
    o, _ = layer(**_forward_kwargs(layer, dict(attention_mask=ones.float())))
    assert o.shape == (3, 6, HIDDEN)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_empty_batch_gives_empty_outputs_and_cache(aggregation, masked):
    layer = make_layer("swla", aggregation)
    cache = None
    for T in (9, 1, 4):  # a prefill, a decode step, a chunk
        mask = torch.ones(0, T, dtype=torch.long) if masked else None
        o, cache = layer(randx(0, T), attention_mask=mask, cache=cache, use_cache=True)
        assert o.shape == (0, T, HIDDEN)
        assert cache.batch_size == 0 and cache.nbytes() == 0


# --------------------------------------------------------------------------------------------
# NaN in the future never reaches the past
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("aggregation", "init"), aggregation_inits(AGGREGATIONS))
@pytest.mark.parametrize("rule", LINEAR_RULES)
def test_nan_in_future_tokens_does_not_reach_the_past(rule, aggregation, init):
    """q, k, v, u and the output gate NaN from token t0 on (through the short conv; the
    decay and write gates stay finite, as NaN gates are rejected): the outputs before t0 and
    the gradients of a loss on them are those of the clean run. t0 = 27 follows the segment
    end 24 inside the chunk [16, 32)."""
    t0 = 27
    layer = make_layer(rule, aggregation, init)
    x = randx(2, T_FULL)
    o, grad = _past_loss_run(layer, x, t0)

    def poison(module, args, out):
        out = out.clone()
        out[:, t0:] = float("nan")
        return out

    handle = layer.in_proj.register_forward_hook(poison)
    try:
        o_bad, grad_bad = _past_loss_run(layer, x, t0)
    finally:
        handle.remove()
    assert_finite_and_equal(o_bad[:, :t0], o[:, :t0], "outputs before t0")
    assert torch.isnan(o_bad[:, t0:]).all()
    assert_finite_and_equal(grad_bad, grad, "d/dx")


@pytest.mark.parametrize("rule", ["linear", "delta", "swla"])
@pytest.mark.parametrize("aggregation", ["none", "grm", "ssc"])
def test_nan_hidden_states_do_not_reach_the_past_or_real_tokens(rule, aggregation):
    """NaN hidden states from t0 on (their gates NaN too), and NaN at padding."""
    t0 = 27
    layer = make_layer(rule, aggregation)
    x = randx(3, T_FULL)
    o, grad = _past_loss_run(layer, x, t0)
    o_bad, grad_bad = _past_loss_run(layer, nan_from(x, t0), t0)
    assert_finite_and_equal(o_bad[:, :t0], o[:, :t0], "outputs before t0")
    assert torch.isnan(o_bad[:, t0:]).all()
    assert_finite_and_equal(grad_bad[:, :t0], grad[:, :t0], "d/dx before t0")
    mask = mask_from_lengths(T_FULL, LAYOUTS["middle"])
    o, _ = layer(x, attention_mask=mask)
    o_bad, _ = layer(x.masked_fill(mask[..., None] == 0, float("nan")), attention_mask=mask)
    assert_finite_and_equal(o_bad, o, "outputs with NaN at the padding")


# --------------------------------------------------------------------------------------------
# ShortConvolution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4])
def test_short_conv_streaming_equals_one_shot(K):
    torch.manual_seed(0)
    conv = ShortConvolution(6, K).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    full, full_state = conv(x)
    assert full.shape == x.shape
    assert full_state.shape == (2, K - 1, 6)
    assert torch.equal(full_state, x[:, 13 - (K - 1) :])
    outs, state = [], None
    start = 0
    for n in (1, 1, 3, 2, 6):
        y, state = conv(x[:, start : start + n], state)
        assert state.shape == (2, K - 1, 6)
        outs.append(y)
        start += n
    assert rel_err(torch.cat(outs, 1), full) < 1e-13
    assert torch.equal(state, full_state)


@pytest.mark.parametrize("K", [1, 3, 4])
def test_short_conv_is_causal_with_window_k(K):
    torch.manual_seed(0)
    conv = ShortConvolution(5, K).double()
    x = torch.randn(1, 12, 5, dtype=torch.float64)
    y, _ = conv(x)
    for s in (0, 5, 11):
        x2 = x.clone()
        x2[:, s] += 1.0
        changed = ((conv(x2)[0] - y).abs().amax(-1) > 0)[0]
        expected = torch.zeros(12, dtype=torch.bool)
        expected[s : s + K] = True
        assert torch.equal(changed, expected), s


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("T", [6, 12])  # the shifted sum (T <= 8) and F.conv1d
def test_short_conv_nan_reaches_only_its_window(K, T):
    """A NaN input at (s, channel 2): outputs NaN exactly at s..s+K-1 of channel 2, all else
    and the gradients of a loss on the outputs before s as without it."""
    torch.manual_seed(0)
    conv = ShortConvolution(5, K).double()
    x = torch.randn(1, T, 5, dtype=torch.float64, requires_grad=True)
    s = 4
    x_bad = x.detach().clone()
    x_bad[0, s, 2] = float("nan")
    x_bad.requires_grad_()
    results, state0 = [], torch.randn(1, K - 1, 5, dtype=torch.float64)
    for inp in (x, x_bad):
        y, state = conv(inp, state0)
        (grad,) = torch.autograd.grad(y[:, :s].sum(), inp)
        results.append((y.detach(), state, grad))
    (y, state, grad), (y_bad, state_bad, grad_bad) = results
    expected = torch.zeros_like(y, dtype=torch.bool)
    expected[0, s : s + K, 2] = True
    assert torch.equal(torch.isnan(y_bad), expected)
    assert torch.equal(y_bad[~expected], y[~expected])
    assert torch.equal(grad_bad, grad)
    assert torch.equal(torch.isnan(state_bad).any(), torch.tensor(s >= T - (K - 1)))


def test_short_conv_state_is_the_previous_inputs():
    torch.manual_seed(0)
    conv = ShortConvolution(5, 4).double()
    x = torch.randn(1, 10, 5, dtype=torch.float64)
    full, _ = conv(x)
    y, _ = conv(x[:, 7:], x[:, 4:7])  # state: inputs 4..6 before input 7
    assert rel_err(y, full[:, 7:]) < 1e-13
    y0, _ = conv(x[:, 7:])  # zero state: differs
    assert rel_err(y0, full[:, 7:]) > 1e-3
    with pytest.raises(ValueError, match=arg("kernel_size")):
        ShortConvolution(5, 0)


def test_short_conv_state_does_not_keep_the_calls_inputs_alive():
    """The state a cache keeps after a long prefill is K - 1 inputs, not a view of the whole
    [B, K - 1 + T, D] buffer (which would hold the prompt's inputs in every layer and escape
    the cache's byte count)."""
    conv = ShortConvolution(5, 4)
    for B in (1, 2):  # with one row the slice of the last inputs is contiguous, still a view
        _, state = conv(torch.randn(B, 300, 5))
        assert state.shape == (B, 3, 5)
        assert state.untyped_storage().nbytes() == state.numel() * state.element_size()
