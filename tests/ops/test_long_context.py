"""Long-context numerics of every memory rule and aggregation, at the layer level.

A MemoryCachingAttention with its defaults (tiny width, so that 8k tokens take a fraction of a
second) runs forward and backward in float64, in float32 and under bf16 autocast; outputs and
gradients (of the input and of every parameter) must be finite, and float32 and bf16 must stay
within a stated tolerance of float64:

- float32: relative error 1e-5 for outputs and 1e-4 for gradients. Unit round-off is 6e-8; a
  recurrence that forgets rounding errors keeps the error at the level of a few tokens'
  arithmetic, whatever the length (measured here: 2e-7 to 9e-7 for outputs, 4e-7 to 4e-6 for
  gradients, over every case below), so the bounds leave a margin of 10-25x. A recurrence that
  amplifies rounding errors fails them: with titans' decay pulling toward zero (the default
  before decay_to), the 8k case reached 3.7e-4 on the outputs and 0.95 on the gradients (whose
  norm was 1.5e3, against 12 now), the 1024-token grm case 1.6e-4 on the gradients.
- bf16 autocast: relative error 0.05 for outputs (0.25 with ssc) and 0.5 for gradients. The
  projections run in bf16 (unit round-off 4e-3; the memories themselves stay fp32), which
  gives ~1e-2 on the outputs and up to ~0.1 on the gradients (measured: at most 1.1e-2 and
  9.2e-2); ssc's top-k choice of caches flips for some tokens under that noise, each flip a
  different cached memory read (measured: 9.9e-2 on the outputs).

One 8k-token case per rule with the layer's default aggregation (grm over segments of 256);
every aggregation with every rule on 1024 tokens in segments of 64 (16 segments).
"""

from __future__ import annotations

import math

import pytest
import torch

from growmem.layers.mc_attention import MemoryCachingAttention
from growmem.ops.aggregations import AGGREGATIONS
from growmem.ops.checks import LINEAR_RULES
from growmem.ops.deep import DEEP_RULES
from tests.helpers import memory_config, rel_err

RULES = LINEAR_RULES + DEEP_RULES
HIDDEN, HEADS = 16, 2
FP32_OUTPUT_TOL, FP32_GRAD_TOL = 1e-5, 1e-4
BF16_OUTPUT_TOL, BF16_SSC_OUTPUT_TOL, BF16_GRAD_TOL = 0.05, 0.25, 0.5


def run_layer(layer: MemoryCachingAttention, x, weights, dtype, autocast: bool = False):
    """Output [1, T, HIDDEN] and the gradient of a fixed random linear function of it with
    respect to the input and every parameter (one flat vector), both in float64."""
    layer.to(dtype).zero_grad()
    x = x.detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o, _ = layer(x)
    # scaled so the gradient's size does not grow with T
    loss = (o.double() * weights).sum() / math.sqrt(x.shape[1])
    loss.backward()
    grads = [x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    return o.detach().double(), torch.cat([g.flatten().double() for g in grads])


def check_long_context(T: int, rule: str, **settings):
    torch.manual_seed(0)
    layer = MemoryCachingAttention(HIDDEN, HEADS, memory_config(rule, **settings))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, HIDDEN, generator=gen, dtype=torch.float64)
    weights = torch.randn(1, T, HIDDEN, generator=gen, dtype=torch.float64)
    o64, g64 = run_layer(layer, x, weights, torch.float64)
    o32, g32 = run_layer(layer, x, weights, torch.float32)
    o16, g16 = run_layer(layer, x, weights, torch.float32, autocast=True)
    for name, t in (("o64", o64), ("g64", g64), ("o32", o32), ("g32", g32)):
        assert torch.isfinite(t).all(), f"{name} is not finite"
    assert torch.isfinite(o16).all() and torch.isfinite(g16).all(), "bf16 autocast"
    assert g64.abs().sum() > 0
    ssc = layer.config.caching.aggregation == "ssc"
    bf16_output_tol = BF16_SSC_OUTPUT_TOL if ssc else BF16_OUTPUT_TOL
    checks = [
        ("fp32 output", o32, o64, FP32_OUTPUT_TOL),
        ("fp32 gradients", g32, g64, FP32_GRAD_TOL),
        ("bf16 autocast output", o16, o64, bf16_output_tol),
        ("bf16 autocast gradients", g16, g64, BF16_GRAD_TOL),
    ]
    for what, a, b, tol in checks:
        err = rel_err(a, b)
        assert err < tol, f"{what} vs float64: relative error {err:.2e} >= {tol:.0e}"


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_at_8k_tokens(rule):
    check_long_context(8192, rule=rule)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("rule", RULES)
def test_every_aggregation(rule, aggregation):
    check_long_context(1024, rule=rule, aggregation=aggregation, segment_size=64)


def test_layer_passes_decay_to_and_checks_it():
    """The layer's decay_to reaches the memory ("zero": the previous recurrence, another
    function), and a bad value is a ValueError naming it."""
    x = torch.randn(1, 300, HIDDEN, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for decay_to in ("init", "zero"):
        torch.manual_seed(0)
        layer = MemoryCachingAttention(HIDDEN, HEADS, memory_config("titans", decay_to=decay_to))
        assert layer.config.memory.decay_to == decay_to
        outputs[decay_to] = layer(x)[0]
    assert rel_err(outputs["zero"], outputs["init"]) > 1e-3
    with pytest.raises(ValueError, match=r"^decay_to\b"):
        memory_config("titans", decay_to="none")
