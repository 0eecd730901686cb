"""The matrix-memory backend of Memory Caching (linear, decay, delta, gated_delta, swla).

The memory is a state S [Dv, Dk] per head, read as M(q) = S q, so a read is linear in the
memory: Σ_i w_i S_i q = (Σ_i w_i S_i) q. Hence Memory Soup equals grm here, and residual and
mean read prefix sums of the cached states, O(T·Dk·Dv) instead of O(T·N·Dk·Dv). Cached states
are kept transposed and heads first, [B, H, N, Dk, Dv], the layout their reads use, so a
decode step never re-lays them out.

The dense and routed reads run in PyTorch (reads.py) or, for a backend built with
reads="triton", in the Triton kernels of triton_reads.py; the prefix-sum reads stay in PyTorch.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from growmem.ops.caching.backend import MemoryBackend, ScanInputs, Scanned, register_backend
from growmem.ops.caching.reads import mixed_read, sparse_read
from growmem.ops.checks import check_gates, check_state, host_reads_free
from growmem.ops.linear.chunk import chunk_linear_memory
from growmem.ops.linear.naive import linear_step
from growmem.ops.spec import MatrixMemory


class MatrixCached(NamedTuple):
    """Cached matrix memories: states [B, H, N, Dk, Dv] (transposed) and their sum
    [B, H, Dk, Dv], which a decode step of residual or mean reads instead of every state."""

    states: torch.Tensor
    total: torch.Tensor


class MatrixOnline(NamedTuple):
    """The stream state of a matrix memory: state [B, H, Dv, Dk] after the last token, and for
    swla prev_kv = (k [B, H, Dk], v [B, H, Dv]) of that token (None: zeros)."""

    state: torch.Tensor
    prev_kv: tuple[torch.Tensor, torch.Tensor] | None = None


class MatrixBackend(MemoryBackend):
    """Memory Caching over a ``MatrixMemory`` (see the module docstring)."""

    linear = True

    def check(self, shape, gates, init_weights, initial_state) -> tuple:
        B, T, H, Dk, Dv = shape
        check_gates(self.memory.rule, B, T, H, **{n: gates.get(n) for n in ("g", "beta", "lam")})
        if init_weights is not None:
            raise ValueError(
                f"init_weights is only used by the deep memories (DeepMemory), not by rule "
                f"{self.memory.rule!r}"
            )
        check_state("initial_state", initial_state, (B, H, Dv, Dk), "[B, H, Dv, Dk]")
        return ()

    def start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device) -> MatrixOnline:
        if initial_state is None:
            return MatrixOnline(torch.zeros(B, H, Dv, Dk, dtype=dtype, device=device))
        return MatrixOnline(initial_state.to(dtype))

    def no_cached(self, B, H, Dk, Dv, sizes, dtype, device) -> MatrixCached:
        return MatrixCached(
            torch.zeros(B, H, 0, Dk, Dv, dtype=dtype, device=device),
            torch.zeros(B, H, Dk, Dv, dtype=dtype, device=device),
        )

    def segment_end(self, online: MatrixOnline):
        return online.state.transpose(-1, -2).unsqueeze(2), online

    def append(self, cached: MatrixCached, ends: torch.Tensor) -> MatrixCached:
        return MatrixCached(torch.cat([cached.states, ends], 2), cached.total + ends.sum(2))

    def scan(self, x: ScanInputs) -> Scanned:
        if x.q.shape[1] == 1:
            o, states = self._step(x)
        elif x.reset is None or len(x.pieces) == 1:
            o, states = chunk_linear_memory(
                x.q,
                x.k,
                x.v,
                rule=self.memory.rule,
                **x.gates,
                initial_state=x.online.state,
                ends=[b for _, b in x.pieces],
                prev_kv=x.online.prev_kv,
                chunk_size=self.memory.chunk_size,
                scan_impl=self.memory.scan_impl,
            )
        else:
            o, states = self._independent(x)
        # states [B, P, H, Dv, Dk] after every piece; those but the last are finished segments
        ends = states[:, :-1].permute(0, 2, 1, 4, 3) if x.keep and len(x.pieces) > 1 else None
        swla = self.memory.rule == "swla"
        online = MatrixOnline(
            # clones: views would keep whole-call buffers alive in the cache
            states[:, -1].clone(),
            (x.k[:, -1].clone(), x.v[:, -1].clone()) if swla else None,
        )
        return Scanned(ends, online, lambda mix: o)

    def _step(self, x: ScanInputs):
        """A decode step: one token, one recurrence step."""
        k_prev, v_prev = x.online.prev_kv or (None, None)  # only swla reads them (zeros at first)
        if self.memory.rule == "swla" and k_prev is None:
            k_prev, v_prev = torch.zeros_like(x.k[:, 0]), torch.zeros_like(x.v[:, 0])
        gates = {n: g[:, 0] for n, g in x.gates.items()}
        S = linear_step(
            self.memory.rule, x.online.state, x.k[:, 0], x.v[:, 0], k_prev, v_prev, **gates
        )
        return (S @ x.q[:, 0, :, :, None]).squeeze(-1).unsqueeze(1), S.unsqueeze(1)

    def _independent(self, x: ScanInputs):
        """init="independent": the first piece continues the open segment, every later one
        starts afresh from the reset state; later pieces of one length run as one batch."""
        rule, pieces = self.memory.rule, x.pieces
        chunk = {"chunk_size": self.memory.chunk_size, "scan_impl": self.memory.scan_impl}
        B, H, Dv, Dk = x.online.state.shape
        outs, finals = [None] * len(pieces), [None] * len(pieces)
        a0, b0 = pieces[0]
        outs[0], finals[0] = chunk_linear_memory(
            x.q[:, a0:b0],
            x.k[:, a0:b0],
            x.v[:, a0:b0],
            rule=rule,
            **{n: g[:, a0:b0] for n, g in x.gates.items()},
            initial_state=x.online.state,
            prev_kv=x.online.prev_kv,
            **chunk,
        )
        by_length = defaultdict(list)
        for p, (a, b) in enumerate(pieces[1:], start=1):
            by_length[b - a].append(p)
        for L, ps in by_length.items():
            n = len(ps)

            def batch(t, ps=ps, L=L, n=n):  # [B, T, ...] -> [B * n, L, ...]
                parts = torch.stack([t[:, pieces[p][0] : pieces[p][0] + L] for p in ps], dim=1)
                return parts.reshape(B * n, L, *t.shape[2:])

            init = x.reset.state.unsqueeze(1).expand(B, n, H, Dv, Dk).reshape(B * n, H, Dv, Dk)
            o, s = chunk_linear_memory(
                batch(x.q),
                batch(x.k),
                batch(x.v),
                rule=rule,
                **{m: batch(g) for m, g in x.gates.items()},
                initial_state=init,
                **chunk,
            )
            o, s = o.view(B, n, L, H, Dv), s.view(B, n, H, Dv, Dk)
            for j, p in enumerate(ps):
                outs[p], finals[p] = o[:, j], s[:, j]
        return torch.cat(outs, dim=1), torch.stack(finals, dim=1)

    def read_dense(self, Q, cached: MatrixCached, w, spans) -> torch.Tensor:
        if self.reads == "triton":
            from growmem.ops.caching.triton_reads import triton_mixed_read  # needs triton

            return triton_mixed_read(Q, cached.states, w, spans)
        return mixed_read(Q, cached.states, w, spans)

    def read_sum(self, Q, cached: MatrixCached, spans) -> torch.Tensor:
        # Σ_{i<n} S_i q = (Σ_{i<n} S_i) q: prefix sums of the states, one matmul per span.
        # Always torch: these are plain matmuls (cuBLAS), O(T·Dk·Dv) whatever N is, where a
        # kernel over the N states (the dense read's) would cost O(T·N·Dk·Dv).
        states = cached.states
        if len(spans) == 1:  # one piece sees every cache (e.g. a decode step): their sum
            n = spans[0][2]
            return Q @ (cached.total if n == states.shape[2] else states[:, :, :n].sum(2))
        # (unbind, not a slice per span: each slice's backward would fill a full-size zero)
        prefix = [torch.zeros_like(cached.total), *states.cumsum(2).unbind(2)]
        # token-major spans of q are contiguous (3x faster fwd+bwd than heads-first slices)
        q = Q.transpose(1, 2).split([b - a for a, b, _ in spans], 1)  # [B, L, H, Dk] each
        reads = [
            torch.einsum("blhk,bhkv->blhv", q_s, prefix[n])
            for q_s, (_, _, n) in zip(q, spans, strict=True)
        ]
        return torch.cat(reads, 1).transpose(1, 2)

    def read_routed(self, Q, cached: MatrixCached, idx, w, valid) -> torch.Tensor:
        if self.reads == "triton":
            from growmem.ops.caching.triton_reads import triton_routed_read  # needs triton

            return triton_routed_read(Q, cached.states, idx, w, valid)
        if not host_reads_free(Q):
            # routing sizes its groups on the host; elsewhere (compiling, accelerators) the
            # dense read of static shapes: exact too, at the cost of reading every cache
            return super().read_routed(Q, cached, idx, w, valid)
        return sparse_read(Q, cached.states, idx, w, valid)

    def ref_start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device):
        """(S [B, H, Dv, Dk], k_prev, v_prev): swla reads the previous token (zeros first)."""
        S = self.start(B, H, Dk, Dv, None, initial_state, dtype, device).state
        return S, S.new_zeros(B, H, Dk), S.new_zeros(B, H, Dv)

    def ref_step(self, state, t, k, v, gates, count):
        S, k_prev, v_prev = state
        step = {n: g[:, t] for n, g in gates.items()}
        S = linear_step(self.memory.rule, S, k[:, t], v[:, t], k_prev, v_prev, **step)
        return S, k[:, t], v[:, t]

    def ref_memory(self, state) -> torch.Tensor:
        return state[0]

    def ref_read(self, memory, q_t) -> torch.Tensor:
        return torch.einsum("bhvk,bhk->bhv", memory, q_t)


register_backend(MatrixMemory, MatrixBackend)
