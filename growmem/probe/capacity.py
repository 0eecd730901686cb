"""The capacity probe: how many key-value pairs a memory recalls, and how much Memory Caching
could add, before any training.

For each number of pairs P, P random key-value pairs are written into a matrix memory of head
size D, one pair per token (plus ``filler`` tokens that write nothing), cut into segments of
``segment_size`` tokens; then every key is queried and a query counts as recalled when the read
vector's nearest value among the P values (by cosine) is its own. The variants:

- ``base``: the recurrent memory's state after the last token (what the plain RNN reads);
- ``uniform``: the uniform mean of the online memory and every cached segment memory, what the
  ``mean`` aggregation computes and, up to the per-head output norm, ``residual``
  (docs/design.md §3.3; recall by cosine does not see the scale);
- ``oracle``: the cached memory at the end of the segment that holds the queried pair (the
  online memory for the last segment), the best any routing of whole segments can do;
- ``grm``, ``ssc``: the gated aggregations with the library's default gates (``gate_scales``
  "default"): ``Caching``'s default geometry (``DEFAULT_GATE_NORM``, cosine gates) at its
  default scale, times the temperature input τ = ``DEFAULT_GATE_TEMPERATURE``, the layer's
  initial τ0, for a gate query aligned with the query (u = the key), c_i the segment's key
  summary (a trained layer's default summaries are of keys of its own, ``summary_source``
  "gate_keys", which have no analogue before training: the probe summarises the keys);
  computed by ``memory_caching`` itself, in float64;
- ``grm s=…``, ``ssc s=…``: the dot-product gates r_i = s <u, c_i> (gate_norm "none") at the
  scales ``gate_scales`` names: "invsqrtD" (1/sqrt(D), the library's default before the
  cosine gates), "raw" (1, the paper's inner product, Eq. 9-10), "sqrtD" or numbers;
- with ``normalize_summaries``, also ``grm norm …``, ``ssc norm …``: each of them with the
  summaries centred on their mean and, like u, L2-normalised (``gate_norm="centered"``, the
  same factor), also by ``memory_caching``.

Values are random unit vectors of dimension D (Gaussian, L2-normalised), like the keys: they
fit any P (one-hot values would need D >= P and change the state's size with P), and the
nearest-value test then asks only that the read points toward its own value.

    growmem probe capacity [--head-dim 16] [--segment-size 16]
        [--pairs 4 8 16 32 64 128] [--draws 20] [--rule gated_delta] [--out results/probe]

(or ``python -m growmem.probe capacity``; growmem/probe/command.py has the command line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from growmem.layers.config import DEFAULT_GATE_TEMPERATURE
from growmem.ops import linear_memory, memory_caching
from growmem.ops.checks import (
    RULE_GATES,
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from growmem.ops.spec import GATE_NORMS, INITS, SUMMARIES, Caching, MatrixMemory

RULES = ("gated_delta", "delta", "linear")
KEYS = ("random", "orthogonal")
DEFAULT_PAIRS = (4, 8, 16, 32, 64, 128)
# The name of the library's default gates among the gate settings.
DEFAULT_GATES = "default"
# Named dot-product scales: 1/sqrt(D) (the library's default before the cosine gates), the
# paper's raw inner product (Eq. 9-10), and a scale as much sharper than the raw product as
# 1/sqrt(D) is softer.
NAMED_SCALES = {
    "invsqrtD": lambda d: 1.0 / math.sqrt(d),
    "raw": lambda d: 1.0,
    "sqrtD": lambda d: math.sqrt(d),
}
# What <û, ĉ_i> is in each geometry (gate_norm), u being the queried key (a unit vector).
GEOMETRIES = {
    "none": "the dot product <u, c_i> with the segment's key mean (sum)",
    "l2": "the cosine of u and c_i",
    "centered": "the cosine of u and c_i centred on the mean of the summaries",
}
DTYPE = torch.float64


@dataclass(frozen=True)
class Gates:
    """One parameterisation of the probe's grm and ssc gates: r_i = gate_scale · τ · <û, ĉ_i>
    (docs/design.md §3.2), u the queried key.

    Args:
        name: how it was asked for: "default", a named scale or a number.
        gate_norm: the geometry (``Caching.gate_norm``).
        gate_scale: the fixed factor s (``Caching.gate_scale``).
        temperature: τ, the op's temperature input, or None (τ = 1).
    """

    name: str
    gate_norm: str
    gate_scale: float
    temperature: float | None = None

    @property
    def factor(self) -> float:
        """s · τ: the logits are factor · <û, ĉ_i>."""
        return self.gate_scale * (1.0 if self.temperature is None else self.temperature)

    def to_dict(self) -> dict:
        """The settings, for the JSON."""
        return {"gate_norm": self.gate_norm, "gate_scale": self.gate_scale,
                "temperature": self.temperature}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where the pairs sit: pair j is written at token j·(1 + filler), the filler tokens after
    it write nothing, and the tokens are cut into segments of ``segment_size``.

    Args:
        pairs: P, the number of key-value pairs.
        filler: tokens that write nothing after each pair.
        segment_size: tokens per segment (the last segment may be shorter).
    """

    pairs: int
    filler: int
    segment_size: int

    @property
    def writes(self) -> int:
        """Tokens before the queries: P pairs and their filler."""
        return self.pairs * (1 + self.filler)

    @property
    def num_segments(self) -> int:
        """N, segments of the written tokens (N - 1 cached ones and the online one)."""
        return -(-self.writes // self.segment_size)

    def segment_of_pair(self) -> torch.Tensor:
        """[P] index of the segment that holds each pair."""
        return torch.arange(self.pairs) * (1 + self.filler) // self.segment_size

    def lengths(self) -> list[int]:
        """Segment lengths of the written tokens and the P query tokens, which extend the last
        segment (so they read the N - 1 caches and the online memory)."""
        n, C = self.num_segments, self.segment_size
        return [C] * (n - 1) + [self.writes - (n - 1) * C + self.pairs]


def gate_setting(name, head_dim: int) -> Gates:
    """The gates ``name`` stands for at head size ``head_dim``: "default", the library's
    default gates (``Caching()``'s geometry and scale, the layer's initial temperature
    ``DEFAULT_GATE_TEMPERATURE`` as the op's temperature input), or dot-product gates
    (gate_norm "none") at a scale: a positive number, "invsqrtD" (1/sqrt(D)), "raw" (1) or
    "sqrtD" (sqrt(D)).

    Raises:
        ValueError: anything else, naming ``gate_scales``.
    """
    if name == DEFAULT_GATES:
        library = Caching()
        return Gates(
            name, library.gate_norm, library.gate_scale_for(head_dim), DEFAULT_GATE_TEMPERATURE
        )
    if name in NAMED_SCALES:
        return Gates(name, "none", NAMED_SCALES[name](head_dim))
    value = None
    if not isinstance(name, bool):
        try:
            value = float(name)
        except (TypeError, ValueError):
            value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"gate_scales must hold positive numbers, {DEFAULT_GATES!r} or "
            f"{list(NAMED_SCALES)}, got {name!r}"
        )
    return Gates(str(name), "none", value)


def gate_logits(keys: torch.Tensor, summaries: torch.Tensor, gate_norm: str) -> torch.Tensor:
    """[B, P, N] <û_j, ĉ_i> at factor 1 in the geometry ``gate_norm``: keys [B, P, D] are the
    gate queries (unit vectors, so û = u), summaries [B, N, D] the segments' c_i, which
    "centered" centres on their mean (the N summaries the queries see) and "l2" and
    "centered" L2-normalise."""
    if gate_norm == "centered":
        summaries = summaries - summaries.mean(1, keepdim=True)
    if gate_norm != "none":
        summaries = F.normalize(summaries, dim=-1)
    return torch.einsum("bpd,bnd->bpn", keys, summaries)


def draw_keys(layout: Layout, head_dim: int, draws: int, keys: str, gen) -> torch.Tensor:
    """[draws, P, D] unit keys: ``random`` (Gaussian, L2-normalised) or ``orthogonal``
    (orthonormal within each block of D consecutive pairs, blocks independent)."""
    B, P, D = draws, layout.pairs, head_dim
    if keys == "random":
        return F.normalize(torch.randn(B, P, D, generator=gen, dtype=DTYPE), dim=-1)
    blocks = -(-P // D)
    basis, _ = torch.linalg.qr(torch.randn(B, blocks, D, D, generator=gen, dtype=DTYPE))
    # the columns of each Q are orthonormal
    return basis.transpose(-1, -2).reshape(B, blocks * D, D)[:, :P]


def recalled(reads: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[B, P] bool: the read of pair j is nearest (by cosine) to value j among the P values.

    reads, values: [B, P, D]; the values are unit vectors, so the nearest by cosine is the
    largest inner product. A zero read points nowhere and recalls nothing.
    """
    scores = torch.einsum("bpd,bmd->bpm", reads, values)  # [B, P, P]
    target = torch.arange(values.shape[1])
    return (scores.argmax(-1) == target) & (reads.norm(dim=-1) > 0)


def gated_mix(
    reads: torch.Tensor, logits: torch.Tensor, aggregation: str, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """grm or ssc over given reads and gate logits (docs/design.md §3.3): the gate weights
    behind the probe's diagnostics (``memory_caching`` returns only the reads);
    tests/test_probe.py checks its reads against ``memory_caching``'s.

    Args:
        reads: [B, P, N, D] reads of the N - 1 cached memories and, last, the online one.
        logits: [B, P, N] gate logits in the same order.
        aggregation: "grm" (softmax over all N) or "ssc" (softmax over the top_k cached
            logits, ties to the older segment, and the online one).

    Returns:
        out [B, P, D] and the gate weights gamma [B, P, N] (0 where ssc did not select).
    """
    n_cached = logits.shape[-1] - 1
    if aggregation == "ssc" and n_cached > top_k:
        # a stable sort, as the library's select_top_k, puts the older segment first on a tie
        order = logits[..., :-1].sort(dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, order[..., :top_k], True)
        keep[..., -1] = True
        logits = logits.masked_fill(~keep, -math.inf)
    gamma = torch.softmax(logits, dim=-1)
    return torch.einsum("bpn,bpnd->bpd", gamma, reads), gamma


def library_reads(
    q, k, v, u, *, rule, gates, lengths, aggregation, init, summary, top_k, gate_scale=None,
    gate_norm="none", temperature=None,
):  # fmt: skip
    """``memory_caching``'s outputs for these tokens: the probe's one call of the op.

    q, k, u: [B, T, 1, D]; v: [B, T, 1, D]; gates: the rule's [B, T, 1] gates; lengths: the
    segment lengths; gate_scale, gate_norm: ``Caching``'s; temperature: the op's temperature
    input τ (one head), or None. Returns [B, T, 1, D].
    """
    caching = Caching(
        aggregation,
        segments=lengths,
        top_k=top_k,
        init=init,
        summary=summary,
        gate_scale=gate_scale,
        gate_norm=gate_norm,
    )
    if temperature is not None:
        gates = {**gates, "temperature": torch.full((1,), temperature, dtype=q.dtype)}  # [H]
    return memory_caching(q, k, v, u, memory=MatrixMemory(rule), caching=caching, gates=gates)


def probe_reads(
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: Layout,
    *,
    rule: str = "gated_delta",
    init: str = "continuous",
    summary: str = "mean",
    top_k: int = 2,
    gate_scales: tuple = (),
    normalize_summaries: bool = False,
    gen: torch.Generator | None = None,
) -> dict:
    """Every variant's read of every pair's key after all pairs are written.

    The tokens are the written ones (pair j at token j·(1 + filler): k = key j, v = value j,
    write strength 1; filler: a random unit key, v = 0, write strength 0) and then one query
    token per pair (q = u = key j) that writes nothing (v = 0, write strength 0) and, as key,
    carries the last segment's summary's fixed point (its mean for summary="mean", 0 for
    "sum"), so the online summary the queries see is the written tokens' own. The decay is 0
    (g = 0): gated_delta with g = 0 and beta = 1 is the delta rule.

    Args:
        keys, values: [B, P, D] unit vectors.
        layout: where the pairs sit; layout.pairs == P.
        rule: gated_delta, delta or linear.
        init: "continuous" (segment s starts from segment s - 1's memory) or "independent"
            (from zeros), for the cached memories; base is the plain RNN either way.
        summary: the segment summary c_i, "mean" or "sum" of its keys.
        top_k: caches ssc selects.
        gate_scales: the gates of grm and ssc (``gate_setting``: "default", the library's,
            or dot-product scales; none: no gated variants).
        normalize_summaries: also grm and ssc with c_i centred (minus the mean of the N
            summaries) and L2-normalised, for each of the gates (gate_norm "centered").
        gen: the generator of the filler keys (required when layout.filler > 0).

    Returns:
        {"reads": {name: [B, P, D]}, "gates": {name: [B, P, N] gate weights of the gated
        variants, the online memory last}, "segment_reads": [B, P, N, D] every segment's
        memory at its end read at every key, "logits": {gate_norm: [B, P, N] <û, ĉ_i>, the
        gate logits at factor 1, for every geometry}, "series": {name: what the variant
        is}}.
    """
    B, P, D = keys.shape
    if layout.pairs != P:
        raise ValueError(f"layout.pairs must be the number of keys {P}, got {layout.pairs}")
    if layout.filler and gen is None:
        raise ValueError("gen is required with filler tokens: it draws their keys")
    n, W, C = layout.num_segments, layout.writes, layout.segment_size
    stride = 1 + layout.filler
    k_w = torch.zeros(B, W, D, dtype=DTYPE)
    if layout.filler:
        k_w = F.normalize(torch.randn(B, W, D, generator=gen, dtype=DTYPE), dim=-1)
    v_w = torch.zeros(B, W, D, dtype=DTYPE)
    writes = torch.zeros(B, W, dtype=DTYPE)  # [B, W] write strength beta
    k_w[:, ::stride], v_w[:, ::stride], writes[:, ::stride] = keys, values, 1.0

    # The segment summaries c_i [B, N, D]: means (sums) of the written tokens' keys.
    seg = torch.arange(W) // C
    sums = torch.zeros(B, n, D, dtype=DTYPE).index_add_(1, seg, k_w)
    counts = torch.bincount(seg, minlength=n).to(DTYPE)
    summaries = sums / counts[:, None] if summary == "mean" else sums

    T = W + P
    q = torch.cat([k_w, keys], 1)[:, :, None]  # [B, T, 1, D]; u = q
    query_key = summaries[:, -1:] if summary == "mean" else torch.zeros(B, 1, D, dtype=DTYPE)
    k = torch.cat([k_w, query_key.expand(B, P, D)], 1)[:, :, None]
    v = torch.cat([v_w, torch.zeros(B, P, D, dtype=DTYPE)], 1)[:, :, None]
    beta = torch.cat([writes, torch.zeros(B, P, dtype=DTYPE)], 1)[:, :, None]  # [B, T, 1]
    gates = {"g": torch.zeros(B, T, 1, dtype=DTYPE), "beta": beta}
    gates = {name: gates[name] for name in RULE_GATES[rule]}

    def library(aggregation: str, setting: Gates | None = None, init: str = init) -> torch.Tensor:
        """The query tokens' outputs [B, P, D] of ``aggregation`` with the gates ``setting``."""
        chosen = {} if setting is None else setting.to_dict()
        o = library_reads(
            q, k, v, q, rule=rule, gates=gates, lengths=layout.lengths(),
            aggregation=aggregation, init=init, summary=summary, top_k=top_k, **chosen,
        )  # fmt: skip
        return o[:, W:, 0]

    # The memory at the end of every segment [B, N, D, D]: the oracle reads its pair's.
    if init == "continuous":
        write_gates = {name: x[:, :W] for name, x in gates.items()}
        _, states = linear_memory(
            q[:, :W], k[:, :W], v[:, :W], rule=rule, **write_gates, boundary=C
        )  # [B, N, 1, D, D]
        states = states[:, :, 0]
    else:  # every segment a sequence of its own, the last one padded with tokens that
        # write nothing (v = 0, beta = 0)
        pad = n * C - W
        seqs = [F.pad(x[:, :W], (0, 0) * (x.dim() - 2) + (0, pad)) for x in (q, k, v)]
        seqs = [x.reshape(B * n, C, *x.shape[2:]) for x in seqs]  # [B·N, C, 1, D]
        write_gates = {
            name: F.pad(x[:, :W], (0, 0, 0, pad)).reshape(B * n, C, 1) for name, x in gates.items()
        }
        _, states = linear_memory(*seqs, rule=rule, **write_gates)  # [B·N, 1, D, D]
        states = states.view(B, n, D, D)
    cached = torch.einsum("bnvk,bpk->bpnv", states, keys)  # [B, P, N, D]: S_i k_j
    holder = layout.segment_of_pair()
    reads = {
        "base": library("none", init="continuous"),  # the plain RNN reads its final state
        "uniform": library("mean"),
        "oracle": cached[:, torch.arange(P), holder],
    }
    series = {name: {"description": DESCRIPTIONS[name]} for name in reads}
    logits = {norm: gate_logits(keys, summaries, norm) for norm in GATE_NORMS}  # [B, P, N]
    gate_weights = {}
    for setting in (gate_setting(s, D) for s in gate_scales):
        variants = [(setting, False)]
        if normalize_summaries and setting.gate_norm != "centered":
            variants.append((replace(setting, gate_norm="centered"), True))
        for aggregation in ("grm", "ssc"):
            for gates_of, normalized in variants:
                name = series_name(aggregation, gates_of, normalized)
                r = gates_of.factor * logits[gates_of.gate_norm]
                # the gate weights, for the diagnostics; the library computes the read
                _, gate_weights[name] = gated_mix(cached, r, aggregation, top_k)
                reads[name] = library(aggregation, gates_of)
                series[name] = {
                    "description": describe(aggregation, gates_of),
                    "aggregation": aggregation,
                    "gates": setting.name,
                    **gates_of.to_dict(),
                }
    return {
        "reads": reads,
        "segment_reads": cached,
        "gates": gate_weights,
        "logits": logits,
        "series": series,
    }


DESCRIPTIONS = {
    "base": "the recurrent memory's final state (the plain RNN), by memory_caching (none)",
    "uniform": "uniform mean of the online and cached memories, by memory_caching (mean); "
    "= residual after the output norm",
    "oracle": "the memory at the end of the segment holding the pair (linear_memory's states)",
}


def describe(aggregation: str, gates: Gates) -> str:
    """What a gated series is, in words."""
    text = f"{aggregation}, u = the key, logits {gates.factor:g} x {GEOMETRIES[gates.gate_norm]}"
    if gates.temperature is not None:
        text += f" (scale {gates.gate_scale:g}, temperature {gates.temperature:g})"
    return text + ", by memory_caching"


def series_name(aggregation: str, gates: Gates, normalized: bool) -> str:
    """``grm``, ``ssc`` with the library's default gates (``grm norm``: with centred
    summaries); ``grm s=1``, ``ssc norm s=4`` ... for dot-product gates at scale s."""
    parts = [aggregation] + (["norm"] if normalized else [])
    if gates.name != DEFAULT_GATES:
        parts.append(f"s={gates.gate_scale:g}")
    return " ".join(parts)


def check_settings(
    head_dim, segment_size, pairs, draws, rule, init, filler, keys, summary, top_k,
    gate_scales, normalize_summaries, seed,
) -> list[float]:  # fmt: skip
    """ValueError naming the first bad setting of ``capacity_probe``; returns the gates
    ``gate_scales`` stand for."""
    check_positive_int("head_dim", head_dim)
    check_positive_int("segment_size", segment_size)
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"pairs must be a non-empty list of positive ints, got {pairs!r}")
    for p in pairs:
        check_positive_int("pairs[i]", p)
    check_positive_int("draws", draws)
    check_choice("rule", rule, RULES)
    check_choice("init", init, INITS)
    if isinstance(filler, bool) or not isinstance(filler, int) or filler < 0:
        raise ValueError(f"filler must be an int >= 0, got {filler!r}")
    check_choice("keys", keys, KEYS)
    check_choice("summary", summary, SUMMARIES)
    check_positive_int("top_k", top_k)
    if not isinstance(gate_scales, (list, tuple)):
        raise ValueError(f"gate_scales must be a list, got {gate_scales!r}")
    settings = []
    for s in gate_scales:
        if not isinstance(s, str):
            check_positive_float("gate_scales[i]", s)
        settings.append(gate_setting(s, head_dim))
    distinct = {(g.gate_norm, round(g.factor, 12)) for g in settings}
    if len(distinct) < len(settings):
        raise ValueError(
            f"gate_scales repeat a setting: {list(gate_scales)} -> "
            f"{[(g.gate_norm, g.factor) for g in settings]}"
        )
    check_bool("normalize_summaries", normalize_summaries)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return settings


def capacity_probe(
    *,
    head_dim: int = 16,
    segment_size: int = 16,
    pairs=DEFAULT_PAIRS,
    draws: int = 20,
    rule: str = "gated_delta",
    init: str = "continuous",
    filler: int = 0,
    keys: str = "random",
    summary: str = "mean",
    top_k: int = 2,
    gate_scales=(DEFAULT_GATES,),
    normalize_summaries: bool = False,
    seed: int = 0,
) -> dict:
    """Recall against the number of pairs for every variant (the module docstring).

    Args:
        head_dim: D, the key and value size of the memory (its state is D x D).
        segment_size: tokens per Memory Caching segment.
        pairs: the numbers of pairs P to probe.
        draws: independent draws of keys and values per P.
        rule: gated_delta (g = 0, beta = 1: the delta rule), delta or linear.
        init: "continuous" (the library's default: segment s starts from segment s - 1's
            memory) or "independent" (each segment's memory holds only its own pairs).
        filler: tokens that write nothing after each pair (they spread the pairs over more
            segments and enter the key summaries).
        keys: "random" or "orthogonal" (orthonormal within blocks of D consecutive pairs).
        summary: a segment's summary, the "mean" or "sum" of its keys.
        top_k: caches ssc selects.
        gate_scales: the gates of the grm and ssc variants: "default" (the library's default
            gates, with the layer's initial temperature), or dot-product gates at a scale:
            numbers, "invsqrtD" (1/sqrt(D)), "raw" (1, the paper's inner product), "sqrtD"
            (sqrt(D)).
        normalize_summaries: also grm and ssc with centred, L2-normalised summaries.
        seed: the draws for P come from the generator seeded seed·100003 + P, so one P's
            numbers do not depend on which other P are probed.

    Returns:
        A JSON-ready dict: ``settings``, ``pairs``, ``segments`` (N per P) and ``series``, a
        list of {name, description, recall [per P: mean over draws], sem, per_draw [per P:
        per draw]}; the gated series add aggregation, gates (the ``gate_scales`` entry),
        gate_norm, gate_scale, temperature, ``gate_on_holder``
        (mean gate weight on the segment that holds the queried pair) and
        ``top_gate_on_holder`` (fraction of queries whose largest gate weight is on it).

    Raises:
        ValueError naming the first bad argument.
    """
    settings = check_settings(
        head_dim, segment_size, pairs, draws, rule, init, filler, keys, summary, top_k,
        gate_scales, normalize_summaries, seed,
    )  # fmt: skip
    series: dict[str, dict] = {}
    segments = []
    for P in pairs:
        layout = Layout(P, filler, segment_size)
        segments.append(layout.num_segments)
        gen = torch.Generator().manual_seed(seed * 100003 + P)
        k = draw_keys(layout, head_dim, draws, keys, gen)
        v = F.normalize(torch.randn(draws, P, head_dim, generator=gen, dtype=DTYPE), dim=-1)
        out = probe_reads(
            k, v, layout, rule=rule, init=init, summary=summary, top_k=top_k,
            gate_scales=tuple(gate_scales), normalize_summaries=normalize_summaries, gen=gen,
        )  # fmt: skip
        holder = layout.segment_of_pair()  # [P]
        for name, reads in out["reads"].items():
            hits = recalled(reads, v).to(DTYPE).mean(-1)  # [draws]
            entry = series.setdefault(
                name, {"name": name, **out["series"][name], "recall": [], "sem": [],
                       "per_draw": []},
            )  # fmt: skip
            entry["recall"].append(hits.mean().item())
            entry["sem"].append(_sem(hits))
            entry["per_draw"].append(hits.tolist())
            if name in out["gates"]:
                gamma = out["gates"][name]  # [draws, P, N]
                on_holder = gamma[:, torch.arange(P), holder]  # [draws, P]
                top = gamma.argmax(-1) == holder
                entry.setdefault("gate_on_holder", []).append(on_holder.mean().item())
                entry.setdefault("top_gate_on_holder", []).append(top.to(DTYPE).mean().item())
    return {
        "probe": "capacity",
        "settings": {
            "head_dim": head_dim,
            "segment_size": segment_size,
            "draws": draws,
            "rule": rule,
            "init": init,
            "filler": filler,
            "keys": keys,
            "values": "random unit vectors of dimension head_dim",
            "summary": summary,
            "top_k": top_k,
            "gate_scales": {g.name: g.to_dict() for g in settings},
            "normalize_summaries": normalize_summaries,
            "seed": seed,
            "dtype": "float64",
        },
        "pairs": list(pairs),
        "segments": segments,
        "series": list(series.values()),
    }


def _sem(hits: torch.Tensor) -> float:
    """Standard error of the mean over draws (0 for one draw)."""
    if hits.numel() < 2:
        return 0.0
    return (hits.std() / math.sqrt(hits.numel())).item()
