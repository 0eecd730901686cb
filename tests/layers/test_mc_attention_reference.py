"""MemoryCachingAttention against a float64 re-implementation from its own weights.

tests/reference.py rebuilds q, k, v, u, every gate and the output gate from the layer's
parameters by the formulas of docs/design.md (a per-token loop for the short convolution), runs
the per-token op references and applies the gated output norm and o_proj. Every (rule,
aggregation) pair is compared at 1e-10 in float64: parallel unpadded, parallel with left,
right and middle padding (real tokens equal the row's reference, padding outputs 0), and
streamed (a prefill, then pieces of 1-3 tokens) with and without padding. The init, summary,
the gates' options (scale, geometry, temperature, online bias, summaries' source), the output
norm's eps and the deep options rotate over the pairs; every parameter gets a random value
(an init that happens to be symmetric, such as zero biases, could hide a wrong formula). Sizes
are odd: 37 tokens, segments of 5, head dim 5, width 11 (the heads' total 10 differs from it).
Logarithmic and explicit segment lengths are compared too, and the gradients of every
parameter with all the gate options set.
"""

from __future__ import annotations

import pytest
import torch

from growmem.layers import MemoryCachingAttention, MemoryConfig
from growmem.layers.config import SUMMARY_SOURCES
from growmem.ops.caching import AGGREGATIONS
from growmem.ops.checks import LINEAR_RULES
from growmem.ops.deep import DEEP_RULES
from growmem.ops.spec import GATE_NORMS
from tests.helpers import memory_config, outputs_and_grads, rel_err, stream_layer
from tests.reference import memory_layer_reference

RULES = LINEAR_RULES + DEEP_RULES
HIDDEN, HEADS, HEAD_DIM = 11, 2, 5
T, SEG = 37, 5
TOL = 1e-10
# real tokens of 4 rows of T slots: none, left, right and middle padding (row r's real tokens
# are the first n of its unpadded sequence, so the unpadded reference covers them)
SPANS = [[(0, T)], [(6, T)], [(0, 25)], [(0, 4), (9, 20), (30, 35)]]
PIECES = [22, 1, 2, 3, 1, 3, 2, 3]  # a prefill, then decoding steps of 1-3 tokens (sums to T)
# (init, summary) rotated over the pairs so that each aggregation and each rule meets several
INIT_SUMMARY = [
    ("continuous", "mean"),
    ("independent", "sum"),
    ("continuous", "sum"),
    ("independent", "mean"),
]


def options(rule: str, aggregation: str, **overrides) -> dict:
    """Every setting of the layer (flat, as ``tests.helpers.memory_config`` takes them, plus
    num_heads and norm_eps), non-default where it matters, for one pair."""
    i = RULES.index(rule) + AGGREGATIONS.index(aggregation)
    init, summary = INIT_SUMMARY[i % 4]
    if aggregation == "loglinear":  # it reads buckets through the memory at their end
        init = "continuous"
    opts = dict(
        rule=rule,
        aggregation=aggregation,
        num_heads=HEADS,
        norm_eps=1e-5,
        segment_size=SEG,
        top_k=2,
        init=init,
        summary=summary,
        gate_scale=(None, 0.9)[i // 3 % 2],  # None: 1/sqrt(head_dim)
        gate_norm=GATE_NORMS[i % 3],
        gate_temperature=(None, 2.0)[i % 2],
        gate_online_bias=(None, 1.5)[i // 2 % 2],
        summary_source=SUMMARY_SOURCES[i // 3 % 2],
        o_norm_eps=(None, 1e-3)[i // 2 % 2],  # None: norm_eps
        use_short_conv=True,
        conv_size=3 + i % 2,
        qk_norm=True,
    )
    if rule in DEEP_RULES:
        opts.update(
            eta_max=0.7,
            mini_batch=3,  # does not divide the segments: the grid restarts at each
            max_grad_norm=(0.8, None)[i % 2],
            norm=i % 4 != 0,  # off only with the clamp: unclamped it may diverge
            eps=(1e-5, 1e-3)[i % 3 == 0],
            decay_to=("init", "zero")[i // 2 % 2] if rule == "titans" else "init",
        )
    else:
        opts.update(chunk_size=8)  # the scans span several chunks
    return {**opts, **overrides}


def make_layer(opts: dict, seed: int = 0) -> MemoryCachingAttention:
    """The layer in float64 with every parameter drawn at random."""
    layer = MemoryCachingAttention(
        HIDDEN, opts["num_heads"], config(opts), head_dim=HEAD_DIM, norm_eps=opts["norm_eps"]
    ).double()
    gen = torch.Generator().manual_seed(seed)
    # std of each parameter; means: A_log ~ 0 (A ~ 1), dt_bias ~ -1 (dt ~ 0.3), norm weight ~ 1,
    # the gates' temperature ~ e (sharp gates also where the logits are cosines)
    stds = {"A_log": 0.5, "dt_bias": 0.5, "o_norm.weight": 0.4, "conv.bias": 0.3}
    means = {"dt_bias": -1.0, "o_norm.weight": 1.0, "gate_log_temperature": 1.0}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            std = stds.get(name, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.5)
            p.copy_(means.get(name, 0.0) + std * noise)
        if layer.uses_u:  # gate queries large enough that the gates are far from uniform
            inner = layer.num_heads * layer.head_dim
            layer.in_proj.weight[3 * inner : 4 * inner].mul_(3.0)
    return layer


def config(opts: dict) -> MemoryConfig:
    """The MemoryConfig of ``opts``."""
    return memory_config(**{k: v for k, v in opts.items() if k not in ("num_heads", "norm_eps")})


def reference(
    layer: MemoryCachingAttention, opts: dict, x: torch.Tensor, params: dict | None = None
) -> torch.Tensor:
    """The reference from the layer's parameters (``params``, default its state_dict) and the
    settings it was built with."""
    return memory_layer_reference(
        layer.state_dict() if params is None else params,
        x,
        config=config(opts),
        num_heads=opts["num_heads"],
        head_dim=HEAD_DIM,
        norm_eps=opts["norm_eps"],
    )


def padded_inputs(x: torch.Tensor):
    """Row r of x with its first n real tokens placed on SPANS[r] (padding slots hold other
    random values): (padded x, mask [B, T] long, expected outputs given the reference)."""
    B = len(SPANS)
    mask = torch.zeros(B, T, dtype=torch.long)
    for r, spans in enumerate(SPANS):
        for a, b in spans:
            mask[r, a:b] = 1
    gen = torch.Generator().manual_seed(99)
    padded = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    real = mask.bool()
    for r in range(B):
        padded[r, real[r]] = x[r, : int(real[r].sum())]

    def expected(ref: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(ref)
        for r in range(B):
            out[r, real[r]] = ref[r, : int(real[r].sum())]
        return out

    return padded, mask, expected


def check_against_reference(opts: dict, stream_unpadded: bool = True) -> None:
    """The layer built with ``opts`` equals its reference: parallel and streamed, padded and
    (streamed only when ``stream_unpadded``) unpadded."""
    layer = make_layer(opts)
    x = torch.randn(len(SPANS), T, HIDDEN, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        ref = reference(layer, opts, x)
        assert torch.isfinite(ref).all()
        assert rel_err(layer(x)[0], ref) < TOL, "parallel"
        padded, mask, expected = padded_inputs(x)
        out = layer(padded, attention_mask=mask)[0]
        assert rel_err(out, expected(ref)) < TOL, "parallel, padded"
        assert torch.all(out[mask == 0] == 0)
        if stream_unpadded:
            assert rel_err(stream_layer(layer, x, PIECES)[0], ref) < TOL, "streamed"
        out, _ = stream_layer(layer, padded, PIECES, mask=mask)
        assert rel_err(out, expected(ref)) < TOL, "streamed, padded"
        assert torch.all(out[mask == 0] == 0)


PAIRS = [(r, a) for r in RULES for a in AGGREGATIONS]


@pytest.mark.parametrize(("rule", "aggregation"), PAIRS)
def test_layer_equals_reference(rule, aggregation):
    # the unpadded stream (one row group) on every other pair: the padded one covers the rest
    odd = PAIRS.index((rule, aggregation)) % 2 == 1
    check_against_reference(options(rule, aggregation), stream_unpadded=odd)


# every gate option at once: the summaries' source, a temperature, an online bias, a geometry
ALL_GATES = dict(summary_source="gate_keys", gate_temperature=3.0, gate_online_bias=2.0)


@pytest.mark.parametrize(
    ("rule", "aggregation", "overrides"),
    [
        ("gated_delta", "grm", dict(use_short_conv=False)),
        ("decay", "residual", dict(qk_norm=False)),
        ("titans", "ssc", dict(use_short_conv=False, qk_norm=False, top_k=1)),
        ("swla", "soup", dict(num_heads=3, top_k=3, conv_size=1)),
        ("gated_delta", "ssc", dict(ALL_GATES, gate_norm="centered", o_norm_eps=0.1)),
        ("delta", "loglinear", dict(ALL_GATES, gate_norm="l2", gate_scale=1.0)),
        ("dla", "soup", dict(ALL_GATES, gate_norm="centered", detach_summaries=True)),
        ("titans", "grm", dict(ALL_GATES, gate_norm="l2", summary="sum")),
        ("gated_delta", "mean", dict(ALL_GATES, gate_norm="l2")),  # ungated: all ignored
    ],
)
def test_layer_equals_reference_other_options(rule, aggregation, overrides):
    check_against_reference(options(rule, aggregation, **overrides))


@pytest.mark.parametrize(
    ("rule", "aggregation", "gate_norm"),
    [("gated_delta", "ssc", "centered"), ("titans", "soup", "l2"), ("swla", "loglinear", "l2")],
)
def test_layer_gradients_equal_reference(rule, aggregation, gate_norm):
    """With every gate option set, the gradients of every parameter (the temperature, the
    online bias and the summary keys' projection included) and of the input equal those of
    the reference, parallel and streamed."""
    opts = options(rule, aggregation, gate_norm=gate_norm, **ALL_GATES)
    layer = make_layer(opts)
    x = torch.randn(2, T, HIDDEN, generator=torch.Generator().manual_seed(1)).double()
    x.requires_grad_()
    named = {"x": x, **dict(layer.named_parameters())}
    assert {"gate_log_temperature", "gate_online_bias", "s_proj.weight"} <= set(named)
    params = {**dict(layer.named_buffers()), **dict(layer.named_parameters())}
    _, expected = outputs_and_grads(lambda: reference(layer, opts, x, params), named)
    _, parallel = outputs_and_grads(lambda: layer(x)[0], named)
    _, streamed = outputs_and_grads(lambda: stream_layer(layer, x, PIECES)[0], named)
    for name, grad in expected.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert rel_err(parallel[name], grad) < TOL, f"parallel: {name}"
        assert rel_err(streamed[name], grad) < TOL, f"streamed: {name}"


LAYER_GATE_OPTIONS = [
    dict(gate_temperature=3.0),
    dict(gate_online_bias=2.0),
    dict(summary_source="gate_keys"),
    dict(o_norm_eps=0.5),
    dict(gate_norm="l2"),
    dict(gate_norm="centered"),
    dict(gate_scale=1.0),
]


@pytest.mark.parametrize("option", LAYER_GATE_OPTIONS, ids=lambda o: "-".join(map(str, o.items())))
@pytest.mark.parametrize(("rule", "aggregation"), [("gated_delta", "grm"), ("titans", "ssc")])
def test_each_layer_option_changes_the_outputs(rule, aggregation, option):
    """The layer with one option set and otherwise the same weights (its new parameters at
    their initial values) differs from the layer without it: an option that the forward
    dropped would show."""
    base_opts = options(rule, aggregation, gate_norm="none", gate_temperature=None,
                        gate_online_bias=None, summary_source="keys", o_norm_eps=None,
                        gate_scale=None)  # fmt: skip
    base = make_layer(base_opts)
    layer = MemoryCachingAttention(
        HIDDEN, HEADS, config({**base_opts, **option}), head_dim=HEAD_DIM, norm_eps=1e-5
    ).double()
    missing, unexpected = layer.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"gate_log_temperature", "gate_online_bias",
                                               "s_proj.weight"}  # fmt: skip
    x = torch.randn(2, T, HIDDEN, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        assert rel_err(layer(x)[0], base(x)[0]) > 1e-3


@pytest.mark.parametrize(
    ("rule", "segments"),
    [("gated_delta", "log"), ("titans", "log"), ("swla", [9, 1, 16, 11]), ("dla", [5, 32])],
)
@pytest.mark.parametrize("aggregation", ["grm", "ssc", "loglinear"])
def test_layer_equals_reference_with_segments(rule, segments, aggregation):
    """Logarithmic and explicit segments reach the op: parallel over all T tokens, and streamed
    when the lengths are explicit (they cover the stream; "log" follows a call's length)."""
    opts = options(rule, aggregation, segment_size=None, segments=segments)
    layer = make_layer(opts)
    x = torch.randn(2, T, HIDDEN, generator=torch.Generator().manual_seed(1)).double()
    with torch.no_grad():
        ref = reference(layer, opts, x)
        assert rel_err(layer(x)[0], ref) < TOL, "parallel"
        constant = reference(layer, {**opts, "segment_size": SEG, "segments": None}, x)
        assert rel_err(ref, constant) > 1e-3  # the segmentation changes the outputs
        if segments != "log":
            assert rel_err(stream_layer(layer, x, PIECES)[0], ref) < TOL, "streamed"
