"""The deep scan's autograd Function (hand-written backward) against the same loop under
plain autograd, in float64, and a finite-difference gradcheck on a tiny case."""

from __future__ import annotations

import pytest
import torch

from growmem.ops.deep.chunk import MiniBatchLayout, deep_scan, online_read
from growmem.ops.deep.mlp import start_state
from growmem.ops.deep.scan import ScanFunction


def _inputs(rule, B=2, T=37, H=2, D=8, Dh=16, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    k = torch.nn.functional.normalize(randn(B, T, H, D), dim=-1)
    x = {
        "q": randn(B, T, H, D),
        "k": k,
        "v": randn(B, T, H, D),
        "eta": rand(B, T, H) * 0.5,
        "g": -rand(B, T, H) * 0.2 if rule == "titans" else None,
        "beta": rand(B, T, H) if rule == "titans" else None,
        "W1": randn(H, D, Dh) * 0.3,
        "W2": randn(H, Dh, D) * 0.3,
    }
    return {n: None if t is None else t.requires_grad_() for n, t in x.items()}


def _run(x, rule, lengths, fused, norm, max_grad_norm, resets=(), end_batches=()):
    """Outputs of a scan + read, and a scalar touching every output of the scan."""
    reset = None
    if resets:  # a reset state that depends on the learned weights differently from init
        reset = start_state(
            (x["W1"] * 1.1, x["W2"] * 0.9), None, rule, x["q"].shape[0], x["q"].dtype
        )
    scan = deep_scan(
        x["q"],
        x["k"],
        x["v"],
        rule=rule,
        eta=x["eta"],
        g=x["g"],
        beta=x["beta"],
        init_weights=(x["W1"], x["W2"]),
        layout=MiniBatchLayout.build(lengths, x["q"].device),
        end_batches=end_batches,
        resets=resets,
        reset_state=reset,
        norm=norm,
        max_grad_norm=max_grad_norm,
        fused=fused,
    )
    o = online_read(scan, norm)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for group in (scan.kept or (), scan.final):
        for s in group:
            if s is not None:
                loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return o, loss


@pytest.mark.parametrize("rule", ["titans", "dla"])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("resets", [(), (3,)])
def test_fused_scan_matches_autograd_loop(rule, norm, max_grad_norm, resets):
    x = _inputs(rule)
    lengths = [8, 8, 5, 8, 8]  # a short mini-batch in the middle (padding)
    results = []
    for fused in (True, False):
        for t in x.values():
            if t is not None:
                t.grad = None
        o, loss = _run(x, rule, lengths, fused, norm, max_grad_norm, resets, end_batches=(1, 4))
        loss.backward()
        results.append([o.detach()] + [t.grad.clone() for t in x.values() if t is not None])
    names = ["o"] + [n for n, t in x.items() if t is not None]
    for name, a, b in zip(names, *results, strict=True):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("rule", ["titans", "dla"])
def test_fused_scan_gradcheck(rule):
    """Finite differences through the whole scan (second-order terms of the inner gradient)."""
    x = _inputs(rule, B=1, T=7, H=1, D=3, Dh=4, seed=3)
    names = [n for n, t in x.items() if t is not None]

    def fn(*tensors):
        y = dict(zip(names, tensors, strict=True))
        y = {n: y.get(n) for n in x}
        o, loss = _run(y, rule, [3, 3, 1], True, True, 0.8, end_batches=(1,))
        return o, loss

    assert torch.autograd.gradcheck(fn, tuple(x[n] for n in names), atol=1e-7, rtol=1e-6)


def test_scan_function_is_used_by_default():
    x = _inputs("titans", T=9)
    o, _ = _run(x, "titans", [4, 4, 1], True, True, None)
    seen, stack = set(), [o.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    assert any(type(f).__name__ == f"{ScanFunction.__name__}Backward" for f in seen)
