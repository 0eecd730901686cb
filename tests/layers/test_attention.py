"""Tests of growmem.layers.Attention (Transformer++ softmax attention) and its KV cache.

Against a plain per-query reference (explicit softmax over the keys each query may see, RoPE
applied by rotating 2-D pairs, the optional short convolution as a per-token sum of taps) in
float64: full and windowed attention, with and without the convolution, streaming == parallel,
padding (real tokens' outputs equal the unpadded row's), cache values never change when a
cache is continued twice, beam reordering, the cache's size and bad input.
"""

from __future__ import annotations

import math

import pytest
import torch

from growmem.layers import Attention, AttentionLayerCache
from tests.helpers import assert_finite_and_equal, nan_from, rel_err
from tests.helpers import layer_past_loss as _past_loss_run

HIDDEN, HEADS = 24, 2  # head_dim 12
TOL = 1e-12


CONV = 3  # taps of the short convolution where a test turns it on


def make_layer(window=None, seed=0, conv_size=None) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(HIDDEN, HEADS, window=window, rope_theta=500.0, conv_size=conv_size)
    if conv_size is not None:  # nonzero bias: a zero state must differ from zero inputs
        torch.nn.init.normal_(layer.conv.bias)
    return layer.double()


def rotate(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """RoPE on one vector [H, D]: pair (i, i + D/2) rotated by pos · theta^(-2i/D)."""
    D = x.shape[-1]
    out = x.clone()
    for i in range(D // 2):
        angle = pos * theta ** (-2 * i / D)
        c, s = math.cos(angle), math.sin(angle)
        out[..., i] = x[..., i] * c - x[..., i + D // 2] * s
        out[..., i + D // 2] = x[..., i + D // 2] * c + x[..., i] * s
    return out


def short_conv(layer: Attention, u: torch.Tensor) -> torch.Tensor:
    """SiLU(bias + sum_j w_j u_{t - K + 1 + j}) per token of u [T, C], zeros before token 0."""
    w, b = layer.conv.weight[:, 0], layer.conv.bias  # [C, K], [C]
    K = w.shape[1]
    rows = []
    for t in range(u.shape[0]):
        acc = b.clone()
        for j in range(K):
            if t - K + 1 + j >= 0:
                acc = acc + w[:, j] * u[t - K + 1 + j]
        rows.append(torch.nn.functional.silu(acc))
    return torch.stack(rows)


def reference(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Per-query causal (windowed) softmax attention of one unpadded row x [T, hidden]."""
    T = x.shape[0]
    H, D = layer.num_heads, layer.head_dim
    qkv = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], -1)
    if layer.conv is not None:
        qkv = short_conv(layer, qkv)
    q, k, v = (t.reshape(T, H, D) for t in qkv.split(H * D, -1))
    q = torch.stack([rotate(q[t], t, layer.rope_theta) for t in range(T)])
    k = torch.stack([rotate(k[t], t, layer.rope_theta) for t in range(T)])
    outs = []
    for t in range(T):
        lo = 0 if layer.window is None else max(0, t - layer.window + 1)
        scores = torch.einsum("hd,shd->hs", q[t], k[lo : t + 1]) / math.sqrt(D)
        outs.append(torch.einsum("hs,shd->hd", scores.softmax(-1), v[lo : t + 1]).reshape(-1))
    return layer.o_proj(torch.stack(outs))


def inputs(B=2, T=19, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("conv", [None, CONV])
@pytest.mark.parametrize("window", [None, 1, 5])
def test_matches_reference(window, conv):
    layer, x = make_layer(window, conv_size=conv), inputs()
    o, _ = layer(x)
    for b in range(x.shape[0]):
        assert rel_err(o[b], reference(layer, x[b])) < TOL


@pytest.mark.parametrize("conv", [None, CONV])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("split", [1, 7, 18])
def test_streaming_equals_parallel(window, split, conv):
    layer, x = make_layer(window, conv_size=conv), inputs()
    full, _ = layer(x)
    o1, cache = layer(x[:, :split], use_cache=True)
    outs = [o1]
    for t in range(split, x.shape[1]):
        o, cache = layer(x[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), full) < TOL
    if window is not None:  # slots out of every window are dropped
        assert cache.keys.shape[2] <= window


@pytest.mark.parametrize("conv", [None, CONV])
def test_chunked_prefill_equals_parallel(conv):
    layer, x = make_layer(window=6, conv_size=conv), inputs(T=23)
    full, _ = layer(x)
    outs, cache = [], None
    for chunk in x.split(5, dim=1):
        o, cache = layer(chunk, cache=cache, use_cache=True)
        outs.append(o)
    assert rel_err(torch.cat(outs, 1), full) < TOL


@pytest.mark.parametrize("conv", [None, CONV])
@pytest.mark.parametrize("window", [None, 3])
def test_padding_leaves_real_tokens_unchanged(window, conv):
    """Left, right and interior padding: real tokens see the same keys at the same positions
    (and convolve the same real neighbours)."""
    layer, x = make_layer(window, conv_size=conv), inputs(B=3, T=15)
    mask = torch.ones(3, 15, dtype=torch.long)
    mask[0, :4] = 0  # left
    mask[1, 11:] = 0  # right
    mask[2, 5:8] = 0  # interior
    o, _ = layer(x, attention_mask=mask)
    for b in range(3):
        real = mask[b].bool()
        alone, _ = layer(x[b : b + 1, real])
        assert rel_err(o[b, real], alone[0]) < TOL
        assert o[b, ~real].abs().max() == 0


@pytest.mark.parametrize("conv", [None, CONV])
def test_decoding_after_left_padded_prefill(conv):
    layer, x = make_layer(window=4, conv_size=conv), inputs(B=2, T=16)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    _, cache = layer(x[:, :12], attention_mask=mask, use_cache=True)
    steps = [layer(x[:, 12:13], cache=cache, use_cache=True)]
    for t in range(13, 16):
        steps.append(layer(x[:, t : t + 1], cache=steps[-1][1], use_cache=True))
    decoded = torch.cat([s[0] for s in steps], 1)  # [2, 4, hidden]
    alone, _ = layer(x[0:1, 5:])
    assert rel_err(decoded[0], alone[0, -4:]) < TOL


@pytest.mark.parametrize("conv", [None, CONV])
def test_continuing_a_cache_twice_is_exact(conv):
    """Caches are values: appending to one never changes what another cache reads."""
    layer, x = make_layer(conv_size=conv), inputs(B=1, T=12)
    y = inputs(B=1, T=3, seed=7)
    _, cache = layer(x[:, :10], use_cache=True)
    a1, cache_a = layer(x[:, 10:11], cache=cache, use_cache=True)
    b1, _ = layer(y[:, :1], cache=cache, use_cache=True)  # the same slot, other token
    a2, _ = layer(x[:, 11:12], cache=cache_a, use_cache=True)
    full_a, _ = layer(x)
    full_b, _ = layer(torch.cat((x[:, :10], y[:, :1]), 1))
    assert rel_err(torch.cat((a1, a2), 1), full_a[:, 10:]) < TOL
    assert rel_err(b1, full_b[:, 10:]) < TOL


@pytest.mark.parametrize("conv", [None, CONV])
def test_reorder_and_nbytes(conv):
    layer, x = make_layer(conv_size=conv), inputs(B=3, T=9)
    _, cache = layer(x[:, :8], use_cache=True)
    assert isinstance(cache, AttentionLayerCache)
    assert cache.nbytes() == layer.state_size(8, batch_size=3, dtype=torch.float64)
    beams = torch.tensor([2, 2, 0, 1])
    o, _ = layer(x[beams, 8:9], cache=cache.reorder(beams), use_cache=True)
    full, _ = layer(x[beams])
    assert rel_err(o, full[:, 8:9]) < TOL


@pytest.mark.parametrize("conv", [None, CONV])
def test_gradients_flow_through_the_cache_path(conv):
    layer, x = make_layer(window=3, conv_size=conv), inputs(B=1, T=8)
    x.requires_grad_(True)
    o1, cache = layer(x[:, :5], use_cache=True)
    o2, _ = layer(x[:, 5:], cache=cache, use_cache=True)
    torch.cat((o1, o2), 1).sum().backward()
    g_stream = x.grad.clone()
    x.grad = None
    layer(x)[0].sum().backward()
    assert rel_err(g_stream, x.grad) < TOL


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 7}, "head_dim must be even"),
        ({"window": 0}, "window"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rope_theta": math.inf}, "^rope_theta"),
        ({"rope_theta": "1e4"}, "^rope_theta"),
        ({"conv_size": 0}, "^conv_size"),
        ({"conv_size": 2.5}, "^conv_size"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Attention(HIDDEN, HEADS, **kwargs)


def test_bad_call_arguments():
    layer, x = make_layer(), inputs(B=2, T=5)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(x[..., :5])
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 4))
    _, cache = layer(x, use_cache=True)
    with pytest.raises(ValueError, match="batch size"):
        layer(x[:1], cache=cache)
    with pytest.raises(ValueError, match="another configuration"):
        make_layer(window=2)(x, cache=cache)
    with pytest.raises(ValueError, match=r"^cache\b.*conv_size"):
        make_layer(conv_size=CONV)(x, cache=cache)
    with pytest.raises(ValueError, match=r"^cache\b.*rope_theta"):
        Attention(HIDDEN, HEADS, rope_theta=1e4).double()(x, cache=cache)
    with pytest.raises(ValueError, match=r"^cache\b.*float64"):  # cache in float32
        make_layer()(x, cache=make_layer().float()(x.float(), use_cache=True)[1])


def test_empty_batch_gives_empty_outputs_and_cache():
    layer, cache = make_layer(window=3), None
    for T in (5, 1, 3):  # a prefill, a decode step, a chunk
        o, cache = layer(
            inputs(B=0, T=T), attention_mask=torch.ones(0, T), cache=cache, use_cache=True
        )
        assert o.shape == (0, T, HIDDEN) and cache.batch_size == 0


# --------------------------------------------------------------------------------------------
# NaN in the future never reaches the past
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [None, CONV])
@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "padded"])
@pytest.mark.parametrize("window", [None, 4])
def test_nan_in_future_tokens_does_not_reach_the_past(window, padded, conv):
    t0 = 11
    layer, x = make_layer(window, conv_size=conv), inputs(B=2, T=19)
    mask = None
    if padded:  # left padding of row 0, which holds NaN: it must never be read either
        mask = torch.ones(2, 19, dtype=torch.long)
        mask[0, :3] = 0
    o, grad = _past_loss_run(layer, x, t0, mask)
    x_bad = nan_from(x, t0)
    if padded:
        x_bad[0, :3] = float("nan")
    o_bad, grad_bad = _past_loss_run(layer, x_bad, t0, mask)
    assert_finite_and_equal(o_bad[:, :t0], o[:, :t0], "outputs before t0")
    assert torch.isnan(o_bad[:, t0:]).all()
    assert_finite_and_equal(grad_bad[:, :t0], grad[:, :t0], "d/dx before t0")


def test_nan_token_reaches_only_the_queries_that_attend_it():
    """Streamed with a cache: a NaN at token 4 with a window of 3 spoils tokens 4 to 6 only."""
    layer, x = make_layer(window=3), inputs(B=1, T=12)
    o_clean, _ = layer(x)
    x_bad = nan_from(x, 4, 5)
    o, cache = layer(x_bad[:, :6], use_cache=True)
    outs = [o]
    for a, b in ((6, 7), (7, 9), (9, 12)):  # a decode step, then chunks
        o, cache = layer(x_bad[:, a:b], cache=cache, use_cache=True)
        outs.append(o)
    o = torch.cat(outs, 1)
    spoiled = torch.zeros(12, dtype=torch.bool)
    spoiled[4:7] = True
    assert torch.isnan(o[0, spoiled]).all()
    assert_finite_and_equal(o[:, ~spoiled], o_clean[:, ~spoiled], "other outputs", 1e-10)
