"""The cached-memory read Functions against plain autograd (float64) and finite differences."""

from __future__ import annotations

import pytest
import torch

from growmem.ops.caching.deep_reads import cached_mlp_read
from growmem.ops.deep import mixed
from growmem.ops.deep.mixed import mixed_linear_read
from growmem.ops.deep.mlp import mlp_forward


def _inputs(B=2, H=2, T=11, N=3, D=5, Dh=7, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return x.requires_grad_()

    return (
        randn(B, H, T, D),
        randn(B, H, N, D, Dh, scale=0.5),
        randn(B, H, N, Dh, D, scale=0.5),
        (torch.rand(B, H, T, N, generator=gen, dtype=torch.float64).requires_grad_()),
    )


def _autograd_read(q, W1, W2, w, spans, norm):
    out = torch.zeros_like(q)
    for a, b, n in spans:
        reads = [
            mlp_forward(q[:, :, a:b], W1[:, :, i], W2[:, :, i], norm, 1e-5)[0] for i in range(n)
        ]  # [B, H, L, D] each
        out[:, :, a:b] = sum(w[:, :, a:b, i, None] * r for i, r in enumerate(reads))
    return out


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("block", [1 << 21, 1])  # one block of caches, or one cache per block
def test_cached_mlp_read_matches_autograd(norm, block, monkeypatch):
    monkeypatch.setattr(mixed, "_BLOCK_ELEMENTS", block)
    x = _inputs()
    spans = [(0, 4, 1), (4, 9, 3), (9, 11, 2)]
    results = []
    for fn in (cached_mlp_read, _autograd_read):
        for t in x:
            t.grad = None
        o = fn(*x, spans, norm, 1e-5) if fn is cached_mlp_read else fn(*x, spans, norm)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum().backward()
        results.append([o.detach()] + [t.grad.clone() for t in x])
    for name, a, b in zip(["o", "q", "W1", "W2", "w"], *results, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, name


def test_cached_mlp_read_gradcheck():
    x = _inputs(B=1, H=1, T=5, N=2, D=3, Dh=4, seed=1)
    spans = [(0, 2, 1), (2, 5, 2)]
    assert torch.autograd.gradcheck(
        lambda *t: cached_mlp_read(*t, spans, True, 1e-5), x, atol=1e-7, rtol=1e-6
    )


@pytest.mark.parametrize("block", [1 << 21, 1])
def test_mixed_linear_read_matches_autograd(block, monkeypatch):
    monkeypatch.setattr(mixed, "_BLOCK_ELEMENTS", block)
    _, W, _, w = _inputs()  # W [B, H, N, D, Dh]: maps from Dh to D
    x = torch.randn(*w.shape[:3], W.shape[-1], dtype=W.dtype, requires_grad=True)
    spans = [(0, 4, 1), (4, 9, 3), (9, 11, 2)]

    def autograd_read(x, W, w, spans):
        out = torch.zeros(*x.shape[:-1], W.shape[-2], dtype=x.dtype)
        for a, b, n in spans:
            for i in range(n):
                out[:, :, a:b] += w[:, :, a:b, i, None] * (x[:, :, a:b] @ W[:, :, i].mT)
        return out

    results = []
    for fn in (mixed_linear_read, autograd_read):
        for t in (x, W, w):
            t.grad = None
        o = fn(x, W, w, spans)
        (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum().backward()
        results.append([o.detach(), x.grad.clone(), W.grad.clone(), w.grad.clone()])
    for name, a, b in zip(["o", "x", "W", "w"], *results, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-12, name


def test_mixed_linear_read_gradcheck():
    _, W1, _, w = _inputs(B=1, H=1, T=5, N=2, D=3, Dh=4, seed=2)
    spans = [(0, 2, 1), (2, 5, 2)]
    x = torch.randn(1, 1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: mixed_linear_read(*t, spans), (x, W1, w), atol=1e-7, rtol=1e-6
    )
