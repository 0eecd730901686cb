"""What Memory Caching needs from a memory: the backend interface, and which backend serves
which memory object.

Memory Caching (core.py, its per-token reference naive.py) is one algorithm for every memory.
A *backend* supplies the few operations that depend on what a memory is (a matrix S, the
weights of an MLP, ...):

- the stream: ``start`` (the state before the first token), ``no_cached`` (no finished
  segment yet), ``segment_end`` (what a closing segment caches), ``append`` (finished
  segments join the cached ones), ``pending`` and ``poison_online`` (what a stream keeps);
- the fast path: ``scan`` (the online memory over a call's pieces: its outputs, the memories
  at the piece ends, the next stream state) and the reads of cached memories: ``read_dense``
  (every visible cache, weighted: grm), ``read_sum`` (every visible cache, unweighted:
  residual, mean) and ``read_routed`` (a few selected caches per token: ssc, loglinear);
- the per-token reference: ``ref_start``, ``ref_step``, ``ref_memory``, ``ref_read``.

A backend whose reads are linear in the memory's parameters (``linear``: a matrix memory,
M(q) = S q) computes Memory Soup as grm, since reading the γ-mix of memories is the γ-mix of
their reads; any other backend computes soup in its ``scan``'s ``outputs`` (``Mix``).

Shapes: q, k [B, T, H, Dk], v [B, T, H, Dv]; "stacked" memories are a tensor, or a NamedTuple
of tensors, with the cached segments along dim 2 ([B, H, N, ...]); queries of the reads are
heads-first, Q [B, H, T, Dk]; a span (a, b, n) says tokens a..b-1 see the first n caches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from growmem.ops.caching.read_impl import READS
from growmem.ops.checks import check_choice
from growmem.ops.nonfinite import NonFiniteGuard, poison

Spans = list[tuple[int, int, int]]


class Mix(NamedTuple):
    """Memory Soup's parameter mix, handed to ``Scanned.outputs`` of a non-linear backend.

    gamma [B, H, T, N + 1]: the gates of the N cached memories (0 on those a token does not
    see), then of the online memory; cached: the cached memories (this call's finished
    segments included); spans: which caches each piece of tokens sees.
    """

    gamma: torch.Tensor
    cached: Any
    spans: Spans


class Scanned(NamedTuple):
    """What ``MemoryBackend.scan`` returns.

    ends: the memories at the ends of every piece but the last (the segments this call
        finishes), stacked [B, H, P - 1, ...] in the layout of ``segment_end``; None when the
        scan was asked not to keep them (aggregation none) or there is one piece.
    online: the stream state after the call (before ``poison_online``).
    outputs: the online outputs [B, T, H, Dv] of the call's own tokens, given None; given a
        ``Mix``, the outputs of the γ-mixed memories (soup on a non-linear backend).
    """

    ends: Any
    online: Any
    outputs: Callable[[Mix | None], torch.Tensor]


@dataclass
class ScanInputs:
    """The tokens a scan runs over: the ``extra`` pending tokens of the stream (see
    ``MemoryBackend.pending``), then the call's own.

    q, k, v: [B, extra + T, H, D] and gates: dict of [B, extra + T, H], finite (non-finite
    tokens zeroed by the call's ``NonFiniteGuard``; q is zero on the pending tokens); raw: the
    write inputs (k, v, gates) as given, for what the stream keeps; pieces: the call's tokens
    cut at segment starts, (start, end) offsets after the pending ones; online: the stream
    state before the call; reset: the state every piece after the first starts from
    (init="independent"), or None (each continues the previous one); keep: return the
    memories at the piece ends; init_weights: the memory's learned initial weights, if it has
    any (an MLP's).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    gates: dict[str, torch.Tensor]
    raw: dict[str, torch.Tensor]
    extra: int
    pieces: list[tuple[int, int]]
    online: Any
    reset: Any
    keep: bool
    init_weights: Any = None


class MemoryBackend(ABC):
    """The operations Memory Caching asks of a memory (see the module docstring).

    A backend is built from its memory object (``self.memory``: the rule and its knobs). The
    methods without a body are what a new backend implements; the others have generic
    defaults (``read_sum`` and ``read_routed`` through ``read_dense``, ``append`` as a
    concatenation along the segment dim).
    """

    linear: ClassVar[bool] = False  # reads are linear in the parameters (soup == grm)

    def __init__(self, memory, reads: str = "torch"):
        """memory: the memory object; reads: "torch" or "triton", who computes the reads of
        cached memories (``read_impl.resolve_reads``; a backend without kernels, e.g. the MLP
        memories', reads with torch whatever it is)."""
        check_choice("reads", reads, READS)
        self.memory = memory
        self.reads = reads

    # ---- arguments -------------------------------------------------------------------------

    @abstractmethod
    def check(self, shape, gates: dict, init_weights, initial_state) -> tuple:
        """Raise a ValueError naming the argument unless the gates (a dict of [B, T, H]
        tensors), init_weights and initial_state fit this memory and ``shape`` = (B, T, H,
        Dk, Dv); return the memory's own sizes a cache must agree on (e.g. (Dh,))."""

    # ---- the stream ------------------------------------------------------------------------

    @abstractmethod
    def start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device):
        """The stream state before the first token (and of every segment start with
        init="independent")."""

    @abstractmethod
    def no_cached(self, B, H, Dk, Dv, sizes: tuple, dtype, device):
        """The cached memories of a stream that has finished no segment (N = 0)."""

    @abstractmethod
    def segment_end(self, online):
        """(the memory ``online`` ends its segment with, stacked with N = 1; the stream state
        that continues it when the next segment starts, init="continuous")."""

    def append(self, cached, ends):
        """``cached`` with the stacked ``ends`` after its N memories."""
        if isinstance(cached, torch.Tensor):
            return torch.cat([cached, ends], 2)
        return type(cached)(
            *(
                None if c is None else torch.cat([c, e], 2)
                for c, e in zip(cached, ends, strict=True)
            )
        )

    def pending(self, online) -> dict[str, torch.Tensor]:
        """Write inputs (k, v, gates; [B, n, H, ...]) of tokens the stream has seen but whose
        writes a call must compute again, before its own tokens (a deep memory's open
        mini-batch); none by default."""
        return {}

    def poison_online(self, online, guard: NonFiniteGuard, total: int):
        """``online`` with NaN in the rows and heads whose memory a non-finite write reached
        among the scan's ``total`` tokens (the stream stays NaN, as its memory is)."""
        bad = guard.after([total])  # [B, 1, H] or None
        return online if bad is None else map_tensors(online, lambda x: poison(x, bad[:, 0]))

    # ---- the fast path ---------------------------------------------------------------------

    @abstractmethod
    def scan(self, x: ScanInputs) -> Scanned:
        """The online memory over the pieces of ``x`` (see ``Scanned``)."""

    @abstractmethod
    def read_dense(self, Q, cached, w, spans: Spans) -> torch.Tensor:
        """Σ_{i<n} w[b, h, t, i] M_i(q_t) for the tokens of every span (a, b, n): Q [B, H, T,
        Dk], w [B, H, T, N] -> [B, H, T, Dv] (0 outside the spans)."""

    def read_sum(self, Q, cached, spans: Spans) -> torch.Tensor:
        """Σ_{i<n} M_i(q_t) per span (a, b, n) -> [B, H, T, Dv] (residual, mean)."""
        B, H, T, _ = Q.shape
        return self.read_dense(Q, cached, Q.new_ones(B, H, T, num_stacked(cached)), spans)

    def read_routed(self, Q, cached, idx, w, valid) -> torch.Tensor:
        """Σ_j w[b, h, t, j] M_{idx[b, h, t, j]}(q_t) over the slots j where ``valid`` (None:
        all): idx, w, valid [B, H, T, k] -> [B, H, T, Dv]. By default a dense read with the
        weights scattered to their caches; a backend should read only the selected ones."""
        B, H, T, _ = Q.shape
        w = w if valid is None else torch.where(valid, w, 0.0)
        dense = Q.new_zeros(B, H, T, num_stacked(cached)).scatter_add(-1, idx, w)
        return self.read_dense(Q, cached, dense, [(0, T, dense.shape[-1])])

    # ---- the per-token reference -----------------------------------------------------------

    @abstractmethod
    def ref_start(self, B, H, Dk, Dv, init_weights, initial_state, dtype, device):
        """The per-token reference's state before the first token."""

    @abstractmethod
    def ref_step(self, state, t: int, k, v, gates: dict, count: int):
        """The state after token t (k [B, T, H, Dk], v, gates as in ``ScanInputs``);
        ``count``: tokens of t's segment before it."""

    @abstractmethod
    def ref_memory(self, state):
        """The memory a state reads with: a [B, H, ...] tensor or a tuple of them (the
        cached form; soup mixes it tensor by tensor)."""

    @abstractmethod
    def ref_read(self, memory, q_t) -> torch.Tensor:
        """M(q_t) of one memory (``ref_memory``): q_t [B, H, Dk] -> [B, H, Dv]."""


_BACKENDS: dict[type, type[MemoryBackend]] = {}


def register_backend(memory_type: type, backend: type[MemoryBackend]) -> None:
    """Memories of ``memory_type`` (e.g. MatrixMemory) are computed by ``backend``."""
    _BACKENDS[memory_type] = backend


def backend_for(memory, reads: str = "torch") -> MemoryBackend:
    """The backend of a memory object, reading cached memories with ``reads`` ("torch" or
    "triton"); a TypeError names the known memory types."""
    backend = _BACKENDS.get(type(memory))
    if backend is None:
        known = [t.__name__ for t in _BACKENDS]
        raise TypeError(f"memory must be one of {known}, got {type(memory).__name__}")
    return backend(memory, reads)


def num_stacked(stacked) -> int:
    """N of stacked memories (a tensor or a NamedTuple whose first field is a tensor)."""
    first = stacked if isinstance(stacked, torch.Tensor) else stacked[0]
    return first.shape[2]


def map_tensors(value, fn):
    """``value`` with ``fn`` applied to each of its tensors (structure kept; None stays)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(map_tensors(x, fn) for x in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(x, fn) for x in value)
    if isinstance(value, dict):
        return {n: map_tensors(x, fn) for n, x in value.items()}
    return value


def iter_tensors(value):
    """The tensors in ``value`` (a tensor, a tuple/NamedTuple/list or dict of them, None)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for x in value:
            yield from iter_tensors(x)
    elif isinstance(value, dict):
        for x in value.values():
            yield from iter_tensors(x)
