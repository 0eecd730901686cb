"""RMSNorm and GatedRMSNorm: computed in fp32 for fp32 and lower precisions, in float64 for float64
inputs (a float64 model is float64 throughout), output in the input's dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growmem.layers import GatedRMSNorm, RMSNorm
from tests.helpers import rel_err


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x and gate [3, 5, 24] in ``dtype`` and a scale [24] far from 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64) * 3
    gate = torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)
    weight = 1 + torch.rand(24, generator=gen, dtype=torch.float64)
    return x.to(dtype), gate.to(dtype), weight


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype):
    """x / sqrt(mean(x²) + eps) · weight, computed in ``dtype``."""
    x, weight = x.to(dtype), weight.to(dtype)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def make_norm(cls, weight: torch.Tensor, eps: float = 1e-5):
    norm = cls(24, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


@pytest.mark.parametrize("cls", [RMSNorm, GatedRMSNorm])
def test_float64_is_computed_in_float64(cls):
    x, gate, weight = inputs(torch.float64)
    norm = make_norm(cls, weight).double()
    expected = reference(x, norm.weight, 1e-5, torch.float64)
    if cls is GatedRMSNorm:
        out, expected = norm(x, gate), expected * F.silu(gate)
    else:
        out = norm(x)
    assert out.dtype == torch.float64
    assert rel_err(out, expected) < 1e-15  # fp32 arithmetic would give about 1e-7


def test_float64_input_with_a_float32_scale_is_computed_in_float64():
    x, _, weight = inputs(torch.float64)
    norm = make_norm(RMSNorm, weight)  # float32 parameters
    expected = reference(x, norm.weight.double(), 1e-5, torch.float64)
    assert rel_err(norm(x), expected) < 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lower_precisions_are_computed_in_fp32(dtype):
    x, _, weight = inputs(dtype)
    norm = make_norm(RMSNorm, weight)
    out = norm(x)
    assert out.dtype == dtype
    # bitwise: the fp32 computation rounded once to the input's dtype
    assert torch.equal(out, reference(x, norm.weight, 1e-5, torch.float32).to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(x), out)
