"""Non-finite inputs stay causal: a NaN or inf at token t never reaches an earlier output.

The chunkwise forms read a chunk's future tokens with coefficient 0 (the causal mask is a
factor inside a matmul), and every backward pairs the zero adjoints of later tokens with their
activations: 0 · NaN = NaN in both, so a NaN in a late value would spread to earlier outputs
and to the gradients of earlier inputs. Masking each product would not fix the backward. So a
call whose inputs are not all finite (``checks.check_values`` tells) runs on finite numbers
only: the tokens with a non-finite input are zeroed first, and the outputs that read one are
set to NaN afterwards:

- a non-finite *read* (query q, gate query u) makes that token's output NaN;
- a non-finite *write* (key k, value v, or a gate) corrupts the memory, so every output from
  that token on is NaN, and so is every state recorded after it (and a stream's cache).

Outputs and states before the first non-finite input equal those of a run without it, and so
do the gradients of a loss on them; no gradient reaches a token with a non-finite input.
"""

from __future__ import annotations

import math

import torch


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
    """x ([B, T, H] or [B, T, H, D]) with the tokens where ``ok`` [B, T, H] is False zeroed
    (their gradient is 0)."""
    return torch.where(ok if x.dim() == 3 else ok[..., None], x, 0.0)


def poison(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with NaN where ``mask`` (x's leading dims) is True."""
    return x.masked_fill(mask.view(*mask.shape, *(1,) * (x.dim() - mask.dim())), math.nan)


class NonFiniteGuard:
    """Zeroes the tokens with a non-finite input and tells which results they reach.

    Args:
        reads: tensors a token only reads the memory with (q, u): [B, T, H, D] each.
        writes: tensors a token writes the memory with (k, v: [B, T, H, D]; gates [B, T, H]).

    Attributes:
        reads, writes: the same dicts, each token with a non-finite read (write) zeroed in
            every read (write) tensor. A bad read leaves the token's write alone, so later
            outputs are those of a run without it.
        written: [B, T, H] bool, a non-finite write at or before token t (memory corrupt).
        outputs: [B, T, H] bool, the outputs that must be NaN.
    """

    def __init__(self, reads: dict[str, torch.Tensor], writes: dict[str, torch.Tensor]):
        ok_read, ok_write = _finite_tokens(reads.values()), _finite_tokens(writes.values())
        self.reads = {name: _zero_tokens(x, ok_read) for name, x in reads.items()}
        self.writes = {name: _zero_tokens(x, ok_write) for name, x in writes.items()}
        self.written = (~ok_write).cumsum(1) > 0  # [B, T, H]
        self.outputs = self.written if ok_read is None else self.written | ~ok_read

    def output(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, Dv] with NaN at the outputs that read a non-finite input."""
        return poison(o, self.outputs)

    def states_after(self, states: torch.Tensor, ends: list[int]) -> torch.Tensor:
        """states [B, len(ends), H, Dv, Dk] after tokens ``ends`` (1-based counts), with NaN
        for those recorded after a non-finite write."""
        index = torch.as_tensor(ends, device=states.device) - 1
        return poison(states, self.written[:, index])

    @property
    def stream(self) -> torch.Tensor:
        """[B, H] bool: the memory is corrupt at the end of the call."""
        return self.written[:, -1]
