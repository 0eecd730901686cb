"""Public entry point of the deep memories: argument checks, then the chosen kernel."""

from __future__ import annotations

import itertools

import torch

from growmem.ops.checks import (
    check_choice,
    check_positive_float,
    check_positive_int,
    check_qkv,
    check_shape,
    check_tensor,
    check_values,
)
from growmem.ops.deep.chunk import chunk_deep_memory
from growmem.ops.deep.mlp import DeepState
from growmem.ops.deep.naive import deep_memory_reference
from growmem.ops.nonfinite import NonFiniteGuard, poison
from growmem.ops.precision import autocast_off
from growmem.ops.spec import DECAY_TARGETS, DEEP_RULES


def mini_batch_lengths(T: int, mini_batch: int) -> list[int]:
    """Mini-batches of ``mini_batch`` tokens from token 0; the last may be shorter."""
    return [mini_batch] * (T // mini_batch) + ([T % mini_batch] if T % mini_batch else [])


# Tokens per scan block for small mini-batches: the scan forms the weights once per block and
# each mini-batch inside it in low-rank form (scan.py), since forming them per mini-batch
# costs a pass over every weight per mini-batch, the cost of small mini-batches on CPU
SCAN_BLOCK_TOKENS = 32


def scan_block(mini_batch: int, tokens: int, boundary: int | None = None) -> int:
    """Tokens per scan block: a multiple of ``mini_batch`` up to SCAN_BLOCK_TOKENS (and up to
    ``tokens``, the call's length) that divides ``boundary`` when given."""
    blocks = max(1, min(SCAN_BLOCK_TOKENS, tokens) // mini_batch)
    if boundary is not None:
        while (boundary // mini_batch) % blocks:
            blocks -= 1
    return mini_batch * blocks


def block_lengths(T: int, mini_batch: int, block: int) -> list[int]:
    """Scan blocks of ``block`` tokens from token 0, the tail cut at its last mini-batch
    boundary: the last block is then a whole number of mini-batches or the one open
    mini-batch, whose entry is the state a stream keeps (the caching cache's ``pending``)."""
    lengths = mini_batch_lengths(T, block)
    tail = lengths[-1] if lengths else 0
    if tail % mini_batch and tail > mini_batch:
        lengths[-1:] = [tail - tail % mini_batch, tail % mini_batch]
    return lengths


def check_deep_args(
    rule, B, T, H, Dk, Dv, eta, g, beta, init_weights, max_grad_norm, *, eps, decay_to
):  # fmt: skip
    """Checks shared by deep_memory and memory_caching on deep rules; returns Dh.

    Gate values are checked by ``check_values`` (a NaN or inf is a failed activation upstream,
    which the fast paths keep causal: ops/nonfinite.py).
    """
    check_choice("rule", rule, DEEP_RULES)
    if Dk != Dv:
        raise ValueError(
            f"v must have Dv = Dk for deep memories (M(x) = x + ...), got Dk={Dk}, Dv={Dv}"
        )
    if eta is None:
        raise ValueError(
            f"eta is required by rule {rule!r}: a [B, T, H] tensor of inner learning rates"
        )
    check_tensor("eta", eta, 3, "[B, T, H]")
    check_shape("eta", eta, (B, T, H), "[B, T, H]")
    for name, x in (("g", g), ("beta", beta)):
        if rule == "titans":
            if x is None:
                raise ValueError(f"{name} is required by rule 'titans': a [B, T, H] tensor")
            check_tensor(name, x, 3, "[B, T, H]")
            check_shape(name, x, (B, T, H), "[B, T, H]")
        elif x is not None:
            raise ValueError(f"{name} is not used by rule {rule!r}; pass {name}=None")
    if not isinstance(init_weights, (tuple, list)) or len(init_weights) != 2:
        raise ValueError("init_weights must be a pair (W1 [H, Dv, Dh], W2 [H, Dh, Dk])")
    W1, W2 = init_weights
    check_tensor("init_weights[0]", W1, 3, "[H, Dv, Dh]")
    Dh = W1.shape[-1]
    check_shape("init_weights[0]", W1, (H, Dv, Dh), "[H, Dv, Dh]")
    check_tensor("init_weights[1]", W2, 3, "[H, Dh, Dk]")
    check_shape("init_weights[1]", W2, (H, Dh, Dk), "[H, Dh, Dk]")
    check_positive_float("max_grad_norm", max_grad_norm, allow_none=True)
    check_positive_float("eps", eps)  # the LayerNorm epsilon
    check_choice("decay_to", decay_to, DECAY_TARGETS)
    return Dh


def check_deep_state(name, state, rule, B, H, Dk, Dv, Dh):
    if state is None:
        return
    if not isinstance(state, DeepState):
        raise ValueError(f"{name} must be a DeepState, got {type(state).__name__}")
    if (rule == "titans") != (state.S1 is not None and state.S2 is not None):
        raise ValueError(f"{name} must carry momentum S1, S2 exactly for rule 'titans'")
    shapes = {
        "W1": (B, H, Dv, Dh),
        "W2": (B, H, Dh, Dk),
        "S1": (B, H, Dv, Dh),
        "S2": (B, H, Dh, Dk),
    }
    for field, shape in shapes.items():
        x = getattr(state, field)
        if x is not None:
            check_tensor(f"{name}.{field}", x, 4, str(list(shape)))
            check_shape(f"{name}.{field}", x, shape, "[B, H, ...]")


def deep_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rule: str,
    eta: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    init_weights: tuple[torch.Tensor, torch.Tensor],
    initial_state: DeepState | None = None,
    mini_batch: int = 64,
    boundary: int | None = None,
    norm: bool = True,
    max_grad_norm: float | None = None,
    eps: float = 1e-5,
    decay_to: str = "init",
    impl: str = "chunk",
) -> tuple[torch.Tensor, DeepState]:
    """A deep (MLP) memory trained at test time, read at every token (docs/design.md §2.4).

    The memory is M_W(x) = x + N(W1 GELU(W2 x)) per head, N an optional LayerNorm.
    ``dla``: W_t = W_{t-1} - η_t ∇ℓ, ℓ = -<M(k_t), v_t>. ``titans``: Σ_t = β_t Σ_{t-1} - η_t ∇ℓ,
    W_t = a_t W_{t-1} + (1 - a_t) W_0 + Σ_t, ℓ = ||M(k_t) - v_t||², W_0 = init_weights (the
    decay forgets toward the learned initial memory). Within a mini-batch the gradients are
    taken at the weights the mini-batch starts from; token t reads the weights after its own
    update (mini_batch=1 is the exact per-token recurrence). See docs/design.md §2.4.

    A NaN or inf in an input is taken for a failed activation upstream, not a bad argument:
    every output and state after a non-finite k, v, eta, g or beta of a (row, head) is NaN
    (a non-finite q: that token's output), and everything before it is unchanged
    (ops/nonfinite.py).

    Args:
        q, k, v: [B, T, H, D] (L2-normalised q, k recommended).
        eta: [B, T, H] inner learning rates (>= 0).
        g: [B, T, H] log-decay a_t = exp(g_t), and beta: [B, T, H] momentum in [0, 1]
            (titans only). The fast path forms momentum products in log space: β below
            1e-30 acts as 1e-30 (and gets no gradient); the reference does the same.
        init_weights: (W1 [H, D, Dh], W2 [H, Dh, D]), the learned initial weights.
        initial_state: DeepState of [B, H, ...] tensors to start from (None: init_weights and
            zero momentum).
        mini_batch: tokens whose gradients share one set of weights.
        boundary: also return the states after tokens C, 2C, ... and after the last token;
            must be a multiple of mini_batch.
        norm: LayerNorm (without affine) on the MLP output.
        max_grad_norm: soft clamp: each token's step is scaled by min(1, c / ||∇ℓ||).
        eps: LayerNorm epsilon (> 0).
        decay_to: titans only: "init" (default), the decay pulls the weights toward
            init_weights; "zero": W_t = a_t W_{t-1} + Σ_t, Titans' equation read literally,
            which is chaotic at long context with the norm (a 1e-12 change grows to order 1)
            and forgets into a memory that stores nothing without it (docs/design.md §2.4).
        impl: "chunk" (mini-batch parallel, default) or "reference" (per-token loop).

    Returns:
        o [B, T, H, D] in q's dtype; the final DeepState ([B, H, ...]) or, with boundary, a
        DeepState of [B, ceil(T / boundary), H, ...] tensors (fp32, fp64 for fp64 inputs).
    """
    B, T, H, Dk, Dv = check_qkv(q, k, v)
    Dh = check_deep_args(
        rule, B, T, H, Dk, Dv, eta, g, beta, init_weights, max_grad_norm, eps=eps,
        decay_to=decay_to,
    )  # fmt: skip
    check_deep_state("initial_state", initial_state, rule, B, H, Dk, Dv, Dh)
    check_positive_int("mini_batch", mini_batch)
    check_positive_int("boundary", boundary, allow_none=True)
    check_choice("impl", impl, ("chunk", "reference"))
    if boundary is not None and boundary % mini_batch:
        raise ValueError(
            f"boundary ({boundary}) must be a multiple of mini_batch "
            f"({mini_batch}): states are read at mini-batch ends"
        )
    ends = None
    if boundary is not None:
        ends = list(range(boundary, T + 1, boundary))
        if not ends or ends[-1] != T:
            ends.append(T)
    kwargs = dict(
        rule=rule,
        init_weights=init_weights,
        initial_state=initial_state,
        norm=norm,
        max_grad_norm=max_grad_norm,
        eps=eps,
        decay_to=decay_to,
    )
    # both paths run on finite inputs (ops/nonfinite.py), so they agree on non-finite ones too
    writes = {"k": k, "v": v, "eta": eta, "g": g, "beta": beta}
    finite = check_values((q, k, v), {n: writes[n] for n in ("eta", "g", "beta")}, rule)
    guard = NonFiniteGuard({"q": q}, writes, finite)
    q, k, v = guard.reads["q"], guard.writes["k"], guard.writes["v"]
    gates = {n: guard.writes.get(n) for n in ("eta", "g", "beta")}
    with autocast_off(q.device.type):
        if impl == "reference":
            lengths = mini_batch_lengths(T, mini_batch)
            o, states = deep_memory_reference(
                q, k, v, batch_lengths=lengths, ends=ends, **gates, **kwargs
            )
        else:
            lengths = block_lengths(T, mini_batch, scan_block(mini_batch, T, boundary))
            block_ends = list(itertools.accumulate(lengths))
            end_batches = () if ends is None else [block_ends.index(e) for e in ends]
            o, stacked, final, _ = chunk_deep_memory(
                q,
                k,
                v,
                **gates,
                batch_lengths=lengths,
                end_batches=end_batches,
                mini_batch=mini_batch,
                **kwargs,
            )
            states = final if ends is None else stacked
    bad = guard.after([T] if ends is None else ends)  # [B, 1 or len(ends), H] or None
    if bad is not None:
        if ends is None:  # [B, H, ...]: the state after every token
            bad = bad[:, 0]
        states = states.map(lambda x: poison(x, bad))
    return guard.output(o).to(q.dtype), states
