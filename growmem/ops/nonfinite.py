"""Non-finite inputs stay causal: a NaN or inf at token t never reaches an earlier output, an
earlier state, or the gradient of a loss on them, in any memory (matrix or MLP).

A non-finite number in a per-token input (q, k, v, u or a gate) is what a failed activation
upstream looks like, not an argument to reject: the ops carry it forward as the recurrence
would. The fast paths read a chunk's (mini-batch's) later tokens with coefficient 0 inside
matmuls, and every backward pairs the zero adjoints of later tokens with their activations:
0 · NaN = NaN would spread to earlier tokens both ways, and masking each product would not fix
the backward. So a call whose inputs are not all finite (``checks.check_values`` tells, in the
host synchronisation it makes anyway) runs on finite numbers only: the tokens with a
non-finite input are zeroed first (``torch.where``, so no gradient reaches them), and
afterwards what they reach is set to NaN (``masked_fill``):

- a non-finite *read* (query q, gate query u) makes that token's output NaN;
- a non-finite *write* (key k, value v, or a gate) corrupts the memory of its row and head, so
  every output from that token on is NaN, and so is every state recorded after it (and the
  cache a stream continues from).

Outputs and states before the first non-finite input equal those of a run without it, and so
do the gradients of a loss on them. The per-token references need no guard: their loops never
read a later token.
"""

from __future__ import annotations

import math

import torch


def poison(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x with NaN where ``mask`` (x's leading dims) is True; x itself when mask is None."""
    if mask is None:
        return x
    return x.masked_fill(mask.view(*mask.shape, *(1,) * (x.dim() - mask.dim())), math.nan)


class NonFiniteGuard:
    """Zeroes the tokens with a non-finite input and marks what they reach.

    Args:
        reads: tensors a token only reads the memory with (q, u): [B, T, H, D] each; None
            entries are dropped.
        writes: tensors a token writes the memory with (k, v: [B, T, H, D]; gates: [B, T, H]);
            None entries are dropped.
        finite: the inputs are known to be finite (``check_values`` said so): the guard does
            nothing, and every mask below is None.

    Attributes:
        reads, writes: the same dicts (None entries dropped), every token with a non-finite
            read (write) zeroed in every read (write) tensor. A bad read leaves the token's
            write alone, so later outputs are those of a run without it.
        written: [B, T, H] bool, a non-finite write at or before token t (memory corrupt).
        outputs: [B, T, H] bool, the outputs that must be NaN.
    """

    def __init__(self, reads: dict, writes: dict, finite: bool):
        self.reads = {name: x for name, x in reads.items() if x is not None}
        self.writes = {name: x for name, x in writes.items() if x is not None}
        self.written = self.outputs = None
        if finite:
            return
        ok_read, ok_write = (
            _finite_tokens(self.reads.values()),
            _finite_tokens(self.writes.values()),
        )
        self.reads = {name: _zero_tokens(x, ok_read) for name, x in self.reads.items()}
        self.writes = {name: _zero_tokens(x, ok_write) for name, x in self.writes.items()}
        self.written = (~ok_write).cumsum(1) > 0  # [B, T, H]
        self.outputs = self.written if ok_read is None else self.written | ~ok_read

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, Dv] with NaN at the outputs that read a non-finite input."""
        return poison(o, self.outputs)

    def after(self, counts) -> torch.Tensor | None:
        """[B, len(counts), H] bool: a non-finite write among the first ``counts[i]`` tokens
        (counts >= 0), i.e. the states recorded after them must be NaN; None when every input
        is finite."""
        if self.written is None:
            return None
        B, _, H = self.written.shape
        written = torch.cat([self.written.new_zeros(B, 1, H), self.written], 1)
        return written[:, torch.as_tensor(list(counts), device=written.device)]

    def states_after(self, states: torch.Tensor, counts) -> torch.Tensor:
        """states [B, len(counts), H, ...] recorded after the first ``counts[i]`` tokens, NaN
        where a non-finite write came before them."""
        return poison(states, self.after(counts))

    @property
    def stream(self) -> torch.Tensor | None:
        """[B, H] bool: the memory is corrupt at the end of the call (None: all finite)."""
        return None if self.written is None else self.written[:, -1]


def _finite_tokens(tensors) -> torch.Tensor | None:
    """[B, T, H] bool: every entry of the token is finite in every tensor ([B, T, H] or
    [B, T, H, D] each); None when there is no tensor."""
    ok = None
    for x in tensors:
        finite = torch.isfinite(x)
        finite = finite.all(-1) if x.dim() == 4 else finite
        ok = finite if ok is None else ok & finite
    return ok


def _zero_tokens(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """x ([B, T, H] or [B, T, H, D]) with the tokens where ``ok`` [B, T, H] is False zeroed."""
    return torch.where(ok if x.dim() == 3 else ok[..., None], x, 0.0)
