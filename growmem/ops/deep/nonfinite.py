"""Non-finite inputs of the deep memories stay causal: a NaN or inf at token t never reaches
an earlier output, an earlier state, or the gradient of a loss on them.

A non-finite number in an input is what a failed activation upstream looks like (an
overflowing or diverged layer before this one), not an argument to check: the deep memories
keep it where it belongs. The mini-batch forms read the later tokens of a mini-batch with
coefficient 0 inside matmuls, and their backward pairs the zero adjoints of later tokens with
their activations, so 0 · NaN = NaN would spread to earlier tokens both ways. So the fast paths
run on finite numbers only: every token with a non-finite input is zeroed first (``torch.where``),
and afterwards the outputs and states that depend on it are set to NaN (``masked_fill``):

- a non-finite *read* (the query q, the gate query u) makes that token's output NaN;
- a non-finite *write* (the key k, the value v, or a gate eta, g, beta) changes the memory, so
  every output from that token on is NaN, and so is every state recorded after it.

Outputs and states before the first non-finite input equal those of a run without it. The
per-token references need no guard: their loops never read a later token.
"""

from __future__ import annotations

import math

import torch


def _finite_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H] bool: every entry of the token's x ([B, T, H] or [B, T, H, D]) is finite."""
    ok = torch.isfinite(x)
    return ok.all(-1) if x.dim() == 4 else ok


def poison(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x with NaN where ``mask`` (x's leading dims) is True; x itself when mask is None."""
    if mask is None:
        return x
    return x.masked_fill(mask.view(*mask.shape, *(1,) * (x.dim() - mask.dim())), math.nan)


class NonFiniteGuard:
    """Zeroes the tokens with a non-finite input and marks what they reach.

    With every input finite (one host synchronisation tells) the guard does nothing, so the
    common case costs one pass over the inputs.

    Args:
        reads: tensors a token only reads the memory with (q, u; None entries are skipped).
        writes: tensors a token writes the memory with (k, v: [B, T, H, D]; eta, g, beta:
            [B, T, H]; None entries are skipped).

    Attributes:
        reads, writes: the same dicts with every token that had a non-finite input (in any
            of the dict's tensors) zeroed; no gradient reaches the zeroed entries.
        written: [B, T, H] bool, a non-finite write at or before token t (None: all finite).
        outputs: [B, T, H] bool, the outputs that must be NaN (None: all finite).
    """

    def __init__(self, reads: dict, writes: dict):
        self.reads = {n: x for n, x in reads.items() if x is not None}
        self.writes = {n: x for n, x in writes.items() if x is not None}
        self.written = self.outputs = None
        tensors = [*self.reads.values(), *self.writes.values()]
        if bool(torch.stack([torch.isfinite(x).all() for x in tensors]).all()):
            return
        ok_read, ok_write = _all_finite(self.reads.values()), _all_finite(self.writes.values())
        # a bad read is zeroed in the reads only: the token's write stays, so later outputs
        # are those of a run without the bad read
        self.reads = {n: _zero_where_not(x, ok_read) for n, x in self.reads.items()}
        self.writes = {n: _zero_where_not(x, ok_write) for n, x in self.writes.items()}
        self.written = (~ok_write).cumsum(1) > 0  # [B, T, H]
        self.outputs = self.written | ~ok_read

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, D] with NaN at the outputs that read a non-finite input."""
        return poison(o, self.outputs)

    def after(self, counts) -> torch.Tensor | None:
        """[B, len(counts), H] bool: a non-finite write among the first ``counts[i]`` tokens
        (counts >= 0), i.e. the states recorded after those tokens must be NaN; None when
        every input is finite."""
        if self.written is None:
            return None
        B, _, H = self.written.shape
        written = torch.cat([self.written.new_zeros(B, 1, H), self.written], 1)
        return written[:, torch.as_tensor(list(counts), device=written.device)]


def _all_finite(tensors) -> torch.Tensor:
    """[B, T, H] bool: every entry of the token is finite in every tensor."""
    ok = None
    for x in tensors:
        ok = _finite_tokens(x) if ok is None else ok & _finite_tokens(x)
    return ok


def _zero_where_not(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """x ([B, T, H] or [B, T, H, D]) with the tokens where ``ok`` [B, T, H] is False zeroed."""
    return torch.where(ok if x.dim() == 3 else ok[..., None], x, 0.0)
