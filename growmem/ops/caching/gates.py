"""The gates of Memory Caching: the one place the gate logits r and the weights γ are formed
(docs/design.md §3.2). The per-token reference (``naive.py``) spells the same equation out.

For token t of segment s, which sees the cached segments i < s and its online memory i = s:

    r_{t,i} = gate_scale · τ_t · <û_t, ĉ_{t,i}> + [i = s] · b_t,   γ_t = softmax_i r_{t,i}

over every visible cache (grm, soup), the top_k of them (ssc) or the log buckets
(loglinear), the online memory always included. c_i are the segments' summaries (of the keys,
or of the ``summary_keys`` input), c_s(t) the causal one of the open segment, and
``Caching.gate_norm`` sets the geometry:

- "none": û = u, ĉ = c (a loglinear bucket's ĉ: the mean, or sum, of its segments' c);
- "l2": û = u/‖u‖ and ĉ = c/‖c‖ (for a bucket: its summary normalised);
- "centered": û = u/‖u‖, ĉ_{t,i} = (c_i − m_t)/‖c_i − m_t‖ with m_t the mean of the s summaries
  token t sees, c_1 .. c_{s−1} and c_s(t) (causal: the online one is part of it); a bucket
  combines its segments' centred summaries, then is normalised.

τ (``temperature``, default 1) and b (``online_bias``, default 0) are optional per-token
inputs (the layer's learnable per-head parameters; its τ starts at 5 by default, which the
default cosine gates need to be sharp: without it their logits lie in [-1, 1]);
``Caching.detach_summaries`` puts a stop-gradient on c. gate_scale is
``Caching.gate_scale_for(Dk)``: 1/sqrt(Dk) for "none", 1 for "l2" and "centered" unless set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from growmem.ops.caching.cache import CachingConfig
from growmem.ops.caching.select import bucket_summaries, log_buckets, select_top_k

# F.normalize's: x / max(‖x‖, EPS)
EPS = 1e-12


class GateInputs(NamedTuple):
    """Memory Caching's optional gate inputs, which ``memory_caching`` takes in its ``gates``
    dict under these names (gated aggregations only; the others ignore them, as they ignore u).

    temperature: [B, T, H] τ, multiplying token t's logits (a per-head [H] is expanded);
    online_bias: [B, T, H] b, added to the online memory's logit (a per-head [H] is expanded);
    summary_keys: [B, T, H, Dk] the vectors whose segment means (sums) are the summaries,
        instead of the keys k.
    """

    temperature: torch.Tensor | None = None
    online_bias: torch.Tensor | None = None
    summary_keys: torch.Tensor | None = None


GATE_INPUTS = GateInputs._fields


class GateRecord(NamedTuple):
    """The gate weights of one ``cache_gates`` call, detached (see `record_gates`).

    gamma: [B, H, T, K + 1] (the K candidates, then the online memory); idx: [B, H, T, K] the
    cache each candidate is (None: candidate i is cache i); valid: [B, H, T, K] filled slots
    (None: all); n_tok: [T] caches token t sees (None: all N); num_caches: N.
    """

    gamma: torch.Tensor
    idx: torch.Tensor | None
    valid: torch.Tensor | None
    n_tok: torch.Tensor | None
    num_caches: int


_recorders: list[list[GateRecord]] = []


@contextmanager
def record_gates() -> Iterator[list[GateRecord]]:
    """Collect the gate weights of every gated Memory Caching call made inside the block, in
    call order (one per gated layer and forward), for diagnostics such as gate entropy and
    routing (growmem.evaluate.mqar_gate_routing). Recording detaches; outside the block
    nothing is kept.

    Yields: the list the records are appended to.
    """
    records: list[GateRecord] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        _recorders.remove(records)


def _recorded(gamma, idx, valid, n_tok, num_caches):
    """``(gamma, idx, valid)``, recorded first when a `record_gates` block is open."""
    if _recorders:
        record = GateRecord(
            gamma.detach(),
            None if idx is None else idx.detach(),
            valid,
            n_tok,
            num_caches,
        )
        for records in _recorders:
            records.append(record)
    return gamma, idx, valid


def cache_gates(
    u, summaries, cached_summaries, n_tok, cfg: CachingConfig, inputs: GateInputs | None = None
):  # fmt: skip
    """γ of the cached and online memories (the module docstring's equation).

    Args:
        u: [B, T, H, Dk] gate queries; summaries: [B, T, H, Dk] online (causal) summaries;
        cached_summaries: [B, H, N, Dk], N >= 1; n_tok: [T] caches each token sees (None: all
        N); cfg: the call's configuration; inputs: temperature and online_bias, [B, T, H] or
        None (summary_keys are already in the summaries); None: none of them.

    Returns:
        gamma [B, H, T, K + 1] (softmax over K cached candidates, then the online memory;
        K = N, or the top_k selected, or the bucket slots of the log buckets), and for routed
        aggregations the caches read, idx [B, H, T, K] and valid [B, H, T, K] (None when
        every slot is filled).
    """
    B, T, H, _ = u.shape
    N = cached_summaries.shape[2]
    inputs = GateInputs() if inputs is None else inputs
    if cfg.detach_summaries:
        summaries, cached_summaries = summaries.detach(), cached_summaries.detach()
    factor = cfg.gate_scale
    if inputs.temperature is not None:
        factor = factor * inputs.temperature[..., None]  # [B, T, H, 1]
    if cfg.gate_norm != "none":  # û = u/max(‖u‖, EPS), folded into the factor: one pass over u
        factor = factor / _norm(u)
    us = (u * factor).transpose(1, 2)  # [B, H, T, Dk]: s·τ·û
    select = cfg.spec.select
    scores, score_online = _logits(
        us, summaries.transpose(1, 2), cached_summaries, n_tok, cfg, select == "log_buckets"
    )  # [B, H, T, N], [B, H, T, 1]
    if inputs.online_bias is not None:
        score_online = score_online + inputs.online_bias.transpose(1, 2)[..., None]
    if select == "log_buckets":  # slot l: the bucket of 2**l segments, ending at cache idx
        n_seen = torch.full((T,), N, device=u.device) if n_tok is None else n_tok
        _, end, valid = log_buckets(n_seen, N.bit_length())  # [T, L] each
        L = end.shape[1]
        idx = (end - 1).clamp(min=0).expand(B, H, T, L)
        slots = scores.gather(-1, idx).masked_fill(~valid, -math.inf)  # [B, H, T, L]
        gamma = torch.softmax(torch.cat([slots, score_online], -1), -1)
        return _recorded(gamma, idx, valid.expand(B, H, T, L), n_tok, N)
    if n_tok is not None:
        hidden = torch.arange(N, device=u.device)[None, :] >= n_tok[:, None]  # [T, N]
        scores = scores.masked_fill(hidden, -math.inf)
    if select is None:
        gamma = torch.softmax(torch.cat([scores, score_online], -1), -1)
        return _recorded(gamma, None, None, n_tok, N)
    top, idx = select_top_k(scores, min(cfg.top_k, N))  # [B, H, T, k]
    gamma = torch.softmax(torch.cat([top, score_online], -1), -1)
    # a token that sees fewer than k caches has empty slots (score -inf, weight 0)
    valid = None if n_tok is None else torch.isfinite(top)
    return _recorded(gamma, idx, valid, n_tok, N)


def _logits(us, online, cached, n_tok, cfg: CachingConfig, buckets: bool):
    """The logits s·τ·<û_t, ĉ> without the bias: of the N candidates [B, H, T, N] (the cached
    segments, or with ``buckets`` the log bucket ending at each cache) and of the online
    memory [B, H, T, 1].

    us: [B, H, T, Dk] scaled (normalised) gate queries; online: [B, H, T, Dk] the online
    summaries; cached: [B, H, N, Dk].
    """
    if cfg.gate_norm == "centered":
        return _centered_logits(us, online, cached, n_tok, buckets)
    candidates = bucket_summaries(cached, cfg.summary)[0] if buckets else cached
    score_online = (us * online).sum(-1, keepdim=True)
    if cfg.gate_norm == "l2":  # (the online summaries' norms divide their [T] scores)
        candidates = F.normalize(candidates, dim=-1, eps=EPS)
        score_online = score_online / _norm(online)
    return us @ candidates.transpose(-1, -2), score_online


def _centered_logits(us, online, cached, n_tok, buckets: bool):
    """``_logits`` for gate_norm "centered", in O(T·N·Dk) without a [T, N, Dk] tensor.

    ĉ_{t,i} = (c_i − m_t)/‖c_i − m_t‖ is expanded into dot products: <û, c_i − m_t> =
    <û, c_i> − <û, m_t> and ‖c_i − m_t‖² = ‖c_i‖² − 2<c_i, m_t> + ‖m_t‖² (one fused matmul
    each). Centring does not depend on the origin, so everything is first taken relative to
    the first cached summary (a constant of the stream, detached: its gradient is zero in
    exact arithmetic): summaries that share a large common direction, the case centring is
    for, then leave no large common part to cancel in these differences.

    A bucket of λ segments combines its centred summaries into b − λ m_t with b their mean
    (summary "mean", λ = 1) or sum; normalising removes the factor λ > 0 from λ(b/λ − m_t), so
    either way the bucket's ĉ is that of its segments' mean.
    """
    B, H, T, _ = us.shape
    N = cached.shape[2]
    origin = cached[:, :, :1].detach()  # [B, H, 1, Dk]
    cached, online = cached - origin, online - origin
    n = torch.full((T,), N, device=us.device) if n_tok is None else n_tok
    prefix = torch.cat([torch.zeros_like(cached[:, :, :1]), cached.cumsum(2)], 2)
    mean = (prefix[:, :, n] + online) / (n + 1).to(us.dtype)[:, None]  # [B, H, T, Dk]: m_t
    candidates = bucket_summaries(cached, "mean")[0] if buckets else cached  # [B, H, N, Dk]
    cand_t = candidates.transpose(-1, -2).flatten(0, 1)  # [B·H, Dk, N]
    along = torch.baddbmm(
        -(us * mean).sum(-1, keepdim=True).flatten(0, 1), us.flatten(0, 1), cand_t
    )  # [B·H, T, N]: <û, c_i − m_t>
    square = torch.baddbmm(
        (candidates.pow(2).sum(-1)[:, :, None, :] + mean.pow(2).sum(-1, keepdim=True)).flatten(
            0, 1
        ),
        mean.flatten(0, 1),
        cand_t,
        alpha=-2,
    )  # [B·H, T, N]: ‖c_i − m_t‖²
    scores = (along * square.clamp_min(EPS**2).rsqrt()).view(B, H, T, N)
    centred_online = online - mean
    return scores, (us * centred_online).sum(-1, keepdim=True) / _norm(centred_online)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """max(‖x‖, EPS) over the last dim, kept: what ``F.normalize`` divides by."""
    return x.norm(dim=-1, keepdim=True).clamp_min(EPS)
