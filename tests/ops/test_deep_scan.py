"""The deep scan's autograd Function (hand-written backward) against the same loop under
plain autograd, in float64, and a finite-difference gradcheck on a tiny case."""

from __future__ import annotations

import pytest
import torch

from growmem.ops.deep.api import block_lengths, scan_block
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


# every (rule, decay_to) pair: dla has no decay
RULE_DECAYS = [("titans", "init"), ("titans", "zero"), ("dla", "init")]


def _run(
    x, rule, lengths, fused, norm, max_grad_norm, resets=(), end_batches=(), mini_batch=None,
    decay_to="init",
):  # fmt: skip
    """Outputs of a scan + read ([B, T, H, D]), and a scalar touching every output of the
    scan."""
    reset = None
    if resets:  # a reset state that depends on the learned weights differently from init
        reset = start_state(
            (x["W1"] * 1.1, x["W2"] * 0.9), None, rule, x["q"].shape[0], x["q"].dtype
        )
    layout = MiniBatchLayout.build(lengths, x["q"].device)
    scan = deep_scan(
        x["q"],
        x["k"],
        x["v"],
        rule=rule,
        eta=x["eta"],
        g=x["g"],
        beta=x["beta"],
        init_weights=(x["W1"], x["W2"]),
        layout=layout,
        end_batches=end_batches,
        resets=resets,
        reset_state=reset,
        norm=norm,
        max_grad_norm=max_grad_norm,
        fused=fused,
        mini_batch=mini_batch,
        decay_to=decay_to,
    )
    o = layout.to_tokens(online_read(scan, norm))
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for group in (scan.kept or (), scan.final):
        for s in group:
            if s is not None:
                loss = loss + (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    return o, loss


def _assert_same_function(x, rule, runs):
    """Each run is (lengths, _run keyword arguments); all must give the same outputs, loss
    and input gradients (relative error below 1e-10)."""
    results = []
    for lengths, kw in runs:
        for t in x.values():
            if t is not None:
                t.grad = None
        o, loss = _run(x, rule, lengths, **kw)
        loss.backward()
        grads = [t.grad.clone() for t in x.values() if t is not None]
        results.append([o.detach(), loss.detach(), *grads])
    names = ["o", "loss (every state)"] + [n for n, t in x.items() if t is not None]
    for name, a, b in zip(names, *results, strict=True):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-10, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("resets", [(), (3,)])
def test_fused_scan_matches_autograd_loop(rule, decay_to, norm, max_grad_norm, resets):
    lengths = [8, 8, 5, 8, 8]  # a short mini-batch in the middle (padding)
    kw = dict(norm=norm, max_grad_norm=max_grad_norm, resets=resets, end_batches=(1, 4))
    kw["decay_to"] = decay_to
    runs = [(lengths, dict(fused=fused, **kw)) for fused in (True, False)]
    _assert_same_function(_inputs(rule), rule, runs)


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize(
    ("lengths", "kw"),
    [
        ([3, 3, 1], dict(end_batches=(1,))),  # one block per mini-batch (ScanFunction)
        ([6, 1], dict(end_batches=(0,), mini_batch=2)),  # blocks of mini-batches (_inner_factors)
    ],
)
def test_scan_gradcheck(rule, decay_to, lengths, kw):
    """Finite differences through the whole scan (second-order terms of the inner gradient)."""
    x = _inputs(rule, B=1, T=7, H=1, D=3, Dh=4, seed=3)
    names = [n for n, t in x.items() if t is not None]

    def fn(*tensors):
        y = dict(zip(names, tensors, strict=True))
        y = {n: y.get(n) for n in x}
        return _run(y, rule, lengths, True, True, 0.8, decay_to=decay_to, **kw)

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


@pytest.mark.parametrize(("rule", "decay_to"), RULE_DECAYS)
@pytest.mark.parametrize(("norm", "max_grad_norm"), [(True, 0.5), (False, None)])
def test_blocks_of_mini_batches_match_one_block_per_mini_batch(rule, decay_to, norm, max_grad_norm):
    """A block holding several mini-batches (their weights in low-rank form) computes what
    one block per mini-batch does: outputs, kept and final states, every gradient. The blocks
    restart their grid at a partial mini-batch and at a reset, as segments make them."""
    x = _inputs(rule)
    blocks = [12, 7, 12, 6]  # mini-batches of 3: [3, 3, 3, 3], [3, 3, 1], [3] * 4, [3, 3]
    per_mini_batch = [3, 3, 3, 3, 3, 3, 1, 3, 3, 3, 3, 3, 3]
    kw = dict(fused=True, norm=norm, max_grad_norm=max_grad_norm, decay_to=decay_to)
    runs = (
        (blocks, dict(resets=(2,), end_batches=(1, 3), mini_batch=3, **kw)),
        (per_mini_batch, dict(resets=(7,), end_batches=(6, 12), **kw)),
    )
    _assert_same_function(x, rule, runs)


def test_scan_block_and_block_lengths():
    assert scan_block(64, 1000) == 64  # mini-batches of the block size or more: one per block
    assert scan_block(1, 1000) == 32
    assert scan_block(3, 1000) == 30
    assert scan_block(4, 10) == 8  # a short call: up to its length
    assert scan_block(4, 3) == 4
    assert scan_block(4, 1000, boundary=24) == 24  # states are read at block ends
    assert scan_block(4, 1000, boundary=20) == 20
    assert scan_block(3, 1000, boundary=21) == 21
    assert scan_block(2, 1000, boundary=6) == 6
    assert block_lengths(37, 3, 12) == [12, 12, 12, 1]
    assert block_lengths(35, 3, 12) == [12, 12, 9, 2]  # the open mini-batch stands alone
    assert block_lengths(32, 4, 12) == [12, 12, 8]
    assert block_lengths(5, 8, 8) == [5]
    assert block_lengths(0, 4, 8) == []


def test_blocks_of_mini_batches_keep_no_tensors_after_backward():
    """The weight-gradient factors collected per block are freed by the backward, also for
    a weight without gradient (titans' zero initial momentum)."""
    import gc

    from growmem.ops.deep import deep_memory

    x = _inputs("titans", T=20)

    def step():
        o, _ = deep_memory(
            x["q"], x["k"], x["v"], rule="titans", eta=x["eta"], g=x["g"], beta=x["beta"],
            init_weights=(x["W1"], x["W2"]), mini_batch=2,
        )  # fmt: skip
        o.sum().backward()

    def live_tensors():
        gc.collect()
        return sum(type(o) in (torch.Tensor, torch.nn.Parameter) for o in gc.get_objects())

    step()
    before = live_tensors()
    for _ in range(3):
        step()
    assert live_tensors() == before
