"""The MLP-memory backend of Memory Caching (dla, titans).

The memory is the weights of a per-head MLP (ops/deep). Its mini-batch grid restarts at every
segment start, so segment ends are mini-batch ends and the cached memories are the MLP weights
there. One scan runs over all of a call's pieces (the state transitions never read a cache);
then every read is batched: the online memory's over mini-batches, the cached memories' per
piece. Memory Soup mixes the parameters, which an MLP's output is not linear in, so soup is
read inside the online read (``Mix``). Tokens after the last mini-batch boundary are kept by
the stream (``pending``) and recomputed by the next call, since their gradients are all taken
at that boundary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from growmem.ops.caching.backend import (
    MemoryBackend,
    Mix,
    ScanInputs,
    Scanned,
    register_backend,
)
from growmem.ops.caching.deep_reads import cached_mlp_read, routed_mlp_read
from growmem.ops.caching.reads import mixed_read
from growmem.ops.checks import host_reads_free
from growmem.ops.deep.api import block_lengths, check_deep_args, check_deep_state, scan_block
from growmem.ops.deep.chunk import MiniBatchLayout, deep_scan, online_read
from growmem.ops.deep.mlp import DeepState, decay_target, mlp_forward, start_state
from growmem.ops.deep.naive import token_step
from growmem.ops.nonfinite import poison
from growmem.ops.precision import compute_dtype
from growmem.ops.spec import DeepMemory


class DeepOnline(NamedTuple):
    """The stream state of an MLP memory: entry, the DeepState ([B, H, ...]) at the last
    mini-batch boundary; last, the DeepState after the last token (the memory its segment
    caches when it closes; ``entry`` itself when no mini-batch is open); pending, the write
    inputs (k, v, eta[, g, beta]: [B, n, H, ...]) of the n tokens after the boundary, as given,
    or None."""

    entry: DeepState
    last: DeepState
    pending: dict[str, torch.Tensor] | None = None


class MLPBackend(MemoryBackend):
    """Memory Caching over a ``DeepMemory`` (see the module docstring). Cached memories:
    DeepState(W1 [B, H, N, Dv, Dh], W2 [B, H, N, Dh, Dk]) (no momentum)."""

    def check(self, shape, gates, init_weights, initial_state) -> tuple:
        B, T, H, Dk, Dv = shape
        m = self.memory
        if gates.get("lam") is not None:
            raise ValueError(f"lam is not used by rule {m.rule!r}; pass no lam")
        Dh = check_deep_args(
            m.rule, B, T, H, Dk, Dv, gates.get("eta"), gates.get("g"), gates.get("beta"),
            init_weights, m.max_grad_norm, eps=m.eps, decay_to=m.decay_to,
        )  # fmt: skip
        check_deep_state("initial_state", initial_state, m.rule, B, H, Dk, Dv, Dh)
        return (Dh,)

    def start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device) -> DeepOnline:
        state = start_state(init_weights, initial_state, self.memory.rule, B, dtype)
        return DeepOnline(state, state)

    def no_cached(self, B, H, Dk, Dv, sizes, dtype, device) -> DeepState:
        (Dh,) = sizes
        return DeepState(
            torch.zeros(B, H, 0, Dv, Dh, dtype=dtype, device=device),
            torch.zeros(B, H, 0, Dh, Dk, dtype=dtype, device=device),
        )

    def segment_end(self, online: DeepOnline):
        last = online.last
        return DeepState(last.W1.unsqueeze(2), last.W2.unsqueeze(2)), DeepOnline(last, last)

    def pending(self, online: DeepOnline) -> dict[str, torch.Tensor]:
        return online.pending or {}

    def poison_online(self, online: DeepOnline, guard, total: int) -> DeepOnline:
        held = 0 if not online.pending else online.pending["k"].shape[1]
        bad = guard.after([total, total - held])  # [B, 2, H] or None
        if bad is None:
            return online
        last = online.last.map(lambda x: poison(x, bad[:, 0]))
        # the pending tokens stay as given: the next call's guard sees a non-finite one again
        entry = online.entry.map(lambda x: poison(x, bad[:, 1])) if held else last
        return DeepOnline(entry, last, online.pending)

    def scan(self, x: ScanInputs) -> Scanned:
        m = self.memory
        # the scan's blocks of whole mini-batches (ops/deep/scan.py): the grid restarts at every
        # piece start, and with init="independent" every piece after the first starts afresh
        block = scan_block(m.mini_batch, x.q.shape[1])
        grid, resets, ends, piece_of = [], [], [], []  # piece_of: the piece of every block
        for p, (a, b) in enumerate(x.pieces):
            if p and x.reset is not None:
                resets.append(len(grid))
            batches = block_lengths(b - a + (x.extra if p == 0 else 0), m.mini_batch, block)
            grid += batches
            ends.append(len(grid) - 1)
            piece_of += [p] * len(batches)
        layout = MiniBatchLayout.build(grid, x.q.device)
        keep = x.keep and len(x.pieces) > 1
        scan = deep_scan(
            x.q,
            x.k,
            x.v,
            **{n: x.gates.get(n) for n in ("eta", "g", "beta")},
            rule=m.rule,
            init_weights=x.init_weights,
            initial_state=x.online.entry,
            layout=layout,
            end_batches=ends[:-1] if keep else (),
            resets=resets,
            reset_state=None if x.reset is None else x.reset.entry,
            norm=m.norm,
            max_grad_norm=m.max_grad_norm,
            eps=m.eps,
            mini_batch=m.mini_batch,
            decay_to=m.decay_to,
        )
        stacked = None  # [P - 1, B, H, ...] -> [B, H, P - 1, ...]
        if scan.kept is not None:
            stacked = DeepState(*(w.permute(1, 2, 0, 3, 4) for w in scan.kept[:2]))
        open_len = grid[-1] if grid[-1] < m.mini_batch else 0
        pending = None
        if open_len:
            pending = {n: w[:, w.shape[1] - open_len :].clone() for n, w in x.raw.items()}
        online = DeepOnline(scan.last_entry if open_len else scan.final, scan.final, pending)

        def outputs(mix: Mix | None) -> torch.Tensor:
            soup = None if mix is None else self._soup(x, mix, layout, piece_of)
            return layout.to_tokens(online_read(scan, m.norm, m.eps, soup))[:, x.extra :]

        return Scanned(stacked, online, outputs)

    @staticmethod
    def _soup(x: ScanInputs, mix: Mix, layout: MiniBatchLayout, piece_of) -> dict:
        """``online_read``'s soup argument: the cached parts of the mixed weights, in the
        mini-batch layout of the scan (whose first ``extra`` tokens are pending ones: they
        read nothing cached, and their outputs are dropped)."""
        dtype = compute_dtype(x.q)
        g_cached = mix.gamma[..., :-1]  # [B, H, T, N]
        W2t = mix.cached.W2.transpose(-1, -2).contiguous()  # [B, H, N, Dk, Dh]
        Q = x.q[:, x.extra :].transpose(1, 2)  # [B, H, T, Dk]
        z_cached = mixed_read(Q, W2t, g_cached, mix.spans)  # [B, H, T, Dh]

        def batched(t, value):  # [B, T, H, ...] (pending tokens in front) -> mini-batch layout
            if x.extra:
                t = torch.cat([t.new_full((t.shape[0], x.extra, *t.shape[2:]), value), t], 1)
            return layout.to_batches(t, dtype)

        return {
            "gamma_online": batched(mix.gamma[..., -1].transpose(1, 2), 1.0).unsqueeze(-1),
            "z_cached": batched(z_cached.transpose(1, 2), 0.0),
            "gamma_cached": batched(g_cached.transpose(1, 2), 0.0),
            "W1_cached": mix.cached.W1,
            "visible": [mix.spans[p][2] for p in piece_of],
        }

    def read_dense(self, Q, cached: DeepState, w, spans) -> torch.Tensor:
        spans = [s for s in spans if s[2]]
        return cached_mlp_read(Q, cached.W1, cached.W2, w, spans, self.memory.norm, self.memory.eps)

    def read_routed(self, Q, cached: DeepState, idx, w, valid) -> torch.Tensor:
        if not host_reads_free(Q):  # no host-sized groups: the dense read (as matrix.py)
            return super().read_routed(Q, cached, idx, w, valid)
        return routed_mlp_read(Q, cached, idx, w, valid, self.memory.norm, self.memory.eps)

    def ref_start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device):
        """(the DeepState, the weights its mini-batch's gradients are taken at, the decay
        target)."""
        m = self.memory
        state = start_state(init_weights, initial_state, m.rule, B, dtype)
        return state, state[:2], decay_target(m.rule, m.decay_to, init_weights, dtype)

    def ref_step(self, state, t, k, v, gates, count):
        m = self.memory
        s, entry, target = state
        if count % m.mini_batch == 0:  # the grid restarts at every segment start
            entry = s[:2]
        eta, g, beta = (gates.get(n) for n in ("eta", "g", "beta"))
        s = token_step(
            m.rule, s, entry, t, k, v, eta, g, beta, m.norm, m.eps, m.max_grad_norm, target
        )
        return s, entry, target

    def ref_memory(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(state[0][:2])

    def ref_read(self, memory, q_t) -> torch.Tensor:
        m = self.memory
        return mlp_forward(q_t[:, :, None, :], *memory, m.norm, m.eps)[0][:, :, 0]


register_backend(DeepMemory, MLPBackend)
