"""What a memory is and how it is cached: the typed, validated objects the ops take.

``MatrixMemory`` and ``DeepMemory`` carry a memory rule's own knobs, so a knob that a rule does
not have cannot be expressed (a matrix memory has no mini-batch); ``Caching`` carries the
Memory Caching choices. Each is frozen, hashable (caches fingerprint them), checked once when
built, and round-trips through ``to_dict``/``from_dict`` for YAML and JSON.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Literal

from growmem.ops.aggregations import aggregation as lookup_aggregation
from growmem.ops.checks import (
    LINEAR_RULES,
    RULE_GATES,
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
)

DEEP_RULES = ("dla", "titans")
# Where titans' decay a_t pulls the weights: "init", the learned initial weights
# (W_t = a_t W_{t-1} + (1 - a_t) W_0 + Σ_t), or "zero" (W_t = a_t W_{t-1} + Σ_t, Titans' equation
# read literally). Decay toward zero shrinks the MLP's weights: with the output LayerNorm its read
# does not change with their scale, so nothing is forgotten, but the inner loss's curvature
# grows as 1/var(y) and the inner gradient steps turn unstable; without the norm the weights
# reach the 2-layer MLP's zero saddle, where every inner gradient vanishes and nothing more is
# stored (docs/design.md §2.4).
DECAY_TARGETS = ("init", "zero")
INITS = ("continuous", "independent")
SUMMARIES = ("mean", "sum")
GATE_NORMS = ("none", "l2", "centered")
# The gate geometry of the gated aggregations when none is chosen: cosine gates (u and the
# summaries L2-normalised), whose sharpness a temperature sets (the layer's learnable τ,
# growmem/layers/config.py DEFAULT_GATE_TEMPERATURE). Chosen by the paired gate ablation in
# docs/results.md (mqar_capacity): cosine gates with τ0 5 beat the scaled dot product 1/sqrt(D)
# and the paper-literal raw product (docs/design.md §3.2).
DEFAULT_GATE_NORM = "l2"
# The geometry before gate_norm existed (the scaled dot product): what configs and calls of
# earlier releases, which cannot name it, keep meaning.
LEGACY_GATE_NORM = "none"
DEFAULT_SEGMENT_SIZE = 256

# Where the chunkwise scans of matrix memories may run (MatrixMemory.scan_impl).
SCAN_IMPLS = ("auto", "torch", "fla")


class _Spec:
    """to_dict / from_dict shared by the spec dataclasses."""

    def to_dict(self) -> dict:
        """Plain values (tuples as lists), ready for YAML or JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict):
        """Build from ``values``; a key the class does not have is a ValueError naming it."""
        if not isinstance(values, dict):
            raise ValueError(
                f"{cls.__name__} needs a dict of settings, got {type(values).__name__}"
            )
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__} has no setting {unknown}; its settings are {known}")
        return cls(**values)


@dataclass(frozen=True)
class MatrixMemory(_Spec):
    """A matrix memory S [Dv, Dk] updated by a linear-family rule (docs/design.md §2.1).

    Args:
        rule: linear | decay | delta | gated_delta | swla. The per-token gates it reads are
            ``gates`` (g: log-decay, beta: write strength, lam: current-token weight).
        chunk_size: chunk length of the chunkwise scans (a compute detail: results do not
            depend on it beyond rounding).
        scan_impl: where the chunkwise scans run (a compute detail too): "auto" (default:
            flash-linear-attention's kernels for CUDA tensors when it is installed at a tested
            version, else growmem's PyTorch path), "torch" or "fla"
            (growmem/ops/linear/fla_scan.py).
    """

    rule: Literal["linear", "decay", "delta", "gated_delta", "swla"] = "gated_delta"
    chunk_size: int = 64
    scan_impl: Literal["auto", "torch", "fla"] = "auto"

    kind: ClassVar[str] = "matrix"

    def __post_init__(self):
        check_choice("rule", self.rule, LINEAR_RULES)
        check_positive_int("chunk_size", self.chunk_size)
        check_choice("scan_impl", self.scan_impl, SCAN_IMPLS)

    @property
    def gates(self) -> tuple[str, ...]:
        """Names of the [B, T, H] gates this rule reads."""
        return RULE_GATES[self.rule]


@dataclass(frozen=True)
class DeepMemory(_Spec):
    """An MLP memory M(x) = x + W2 σ(W1 LN(x)) trained online by gradient steps
    (docs/design.md §2.4-2.5).

    Args:
        rule: dla (one gradient step per mini-batch) | titans (with momentum beta and weight
            decay g).
        mini_batch: tokens per inner gradient step (the grid restarts at every segment start
            under Memory Caching).
        norm: apply the LayerNorm inside M.
        max_grad_norm: soft clamp of each inner gradient's norm, or None (no clamp). The
            default 1.0 is the memory layers' (and models') default since their first release.
        eps: the LayerNorm epsilon.
        decay_to: titans only: "init" (decay toward the learned initial weights) or "zero"
            (the literal equation). dla has no decay and accepts only the default.
    """

    rule: Literal["dla", "titans"] = "titans"
    mini_batch: int = 64
    norm: bool = True
    max_grad_norm: float | None = 1.0
    eps: float = 1e-5
    decay_to: Literal["init", "zero"] = "init"

    kind: ClassVar[str] = "deep"

    def __post_init__(self):
        check_choice("rule", self.rule, DEEP_RULES)
        check_positive_int("mini_batch", self.mini_batch)
        check_bool("norm", self.norm)
        check_positive_float("max_grad_norm", self.max_grad_norm, allow_none=True)
        check_positive_float("eps", self.eps)
        check_choice("decay_to", self.decay_to, DECAY_TARGETS)
        if self.rule == "dla" and self.decay_to != "init":
            raise ValueError(
                "decay_to is titans' weight decay target and rule 'dla' has no decay; "
                f"got decay_to={self.decay_to!r}"
            )
        if self.max_grad_norm is not None:
            object.__setattr__(self, "max_grad_norm", float(self.max_grad_norm))
        object.__setattr__(self, "eps", float(self.eps))

    @property
    def gates(self) -> tuple[str, ...]:
        """Names of the [B, T, H] gates this rule reads (eta: inner learning rate)."""
        return ("eta", "g", "beta") if self.rule == "titans" else ("eta",)


MemorySpec = MatrixMemory | DeepMemory


def memory_spec(rule: str, **knobs) -> MemorySpec:
    """The memory object for ``rule`` with ``knobs``; a knob the rule does not have is a
    ValueError naming it and the rule's knobs.

    Example: ``memory_spec("titans", mini_batch=16)`` -> ``DeepMemory(rule="titans", ...)``.
    """
    if rule in LINEAR_RULES:
        cls = MatrixMemory
    elif rule in DEEP_RULES:
        cls = DeepMemory
    else:
        raise ValueError(f"rule must be one of {[*LINEAR_RULES, *DEEP_RULES]}, got {rule!r}")
    allowed = [f.name for f in fields(cls) if f.name != "rule"]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"rule {rule!r} has no setting {unknown}; its settings are {allowed}")
    return cls(rule=rule, **knobs)


def memory_from_dict(values: dict) -> MemorySpec:
    """``memory_spec`` from a dict with a ``rule`` key (the inverse of ``to_dict``)."""
    if not isinstance(values, dict) or "rule" not in values:
        raise ValueError(f"a memory needs a dict with a 'rule' key, got {values!r}")
    values = dict(values)
    return memory_spec(values.pop("rule"), **values)


@dataclass(frozen=True)
class Caching(_Spec):
    """How the memory is cached and read (docs/design.md §3).

    Args:
        aggregation: none | residual | mean | grm | soup | ssc | loglinear (the table in
            ``ops/caching/aggregations.py`` says what each needs).
        segment_size: constant segment length (the last segment may be shorter); default 256
            when ``segments`` is not given.
        segments: instead of ``segment_size``: "log" (the binary decomposition of the length,
            37 -> [32, 4, 1]) or explicit lengths covering the sequence (the stream when
            streaming).
        top_k: caches ssc reads per token (all when fewer are visible); unused otherwise.
        init: "continuous" (segment s starts from segment s-1's final memory) or
            "independent" (every segment starts from the initial state).
        summary: "mean" or "sum" of a segment's keys, its summary c_i (the keys: k, or the
            ``summary_keys`` gate input when given).
        gate_scale: the fixed factor s of the gate logits r = s · τ · <û_t, ĉ_i> (+ b on the
            online memory's; docs/design.md §3.2); None: 1/sqrt(Dk) with gate_norm "none"
            (the scaled dot product), 1.0 with "l2" or "centered" (cosine logits in [-1, 1],
            whose sharpness the temperature τ sets). 1.0 with gate_norm "none" is the
            paper's literal raw inner product (Eq. 9-10).
        gate_norm: the geometry of the logits: "none" (<u_t, c_i>), "l2" (u_t and every
            summary L2-normalised: cosine gates) or "centered" (the summaries a token sees,
            the online one included, centred on their mean, then L2-normalised, as is u_t).
            Default: ``DEFAULT_GATE_NORM`` (cosine gates). The temperature τ is an input of
            the op (``gates["temperature"]``; the layer passes its learnable per-head τ,
            which starts at ``MemoryConfig.gate_temperature``): an op-level call without it
            gets τ = 1, so the default cosine logits lie in [-1, 1] and the gates are soft.
        detach_summaries: the gates see the summaries through a stop-gradient, so no gradient
            reaches the keys through the gates (the memories still train them).
    """

    aggregation: str = "grm"
    segment_size: int | None = None
    segments: str | tuple[int, ...] | None = None
    top_k: int = 2
    init: str = "continuous"
    summary: str = "mean"
    gate_scale: float | None = None
    gate_norm: str = DEFAULT_GATE_NORM
    detach_summaries: bool = False

    def __post_init__(self):
        agg = lookup_aggregation(self.aggregation)
        if self.segments is None:
            size = DEFAULT_SEGMENT_SIZE if self.segment_size is None else self.segment_size
            check_positive_int("segment_size", size)
            object.__setattr__(self, "segment_size", size)
        else:
            if self.segment_size is not None:
                raise ValueError(
                    "pass segment_size (constant segments) or segments ('log' or lengths), "
                    f"not both; got segment_size={self.segment_size!r}, segments={self.segments!r}"
                )
            if isinstance(self.segments, str):
                check_choice("segments", self.segments, ("log",))
            else:
                if not isinstance(self.segments, (list, tuple)) or not self.segments:
                    raise ValueError(
                        "segments must be 'log' or a non-empty list of lengths, got "
                        f"{self.segments!r}"
                    )
                for n in self.segments:
                    check_positive_int("segments[i]", n)
                object.__setattr__(self, "segments", tuple(self.segments))
        check_positive_int("top_k", self.top_k)
        check_choice("init", self.init, INITS)
        check_choice("summary", self.summary, SUMMARIES)
        check_positive_float("gate_scale", self.gate_scale, allow_none=True)
        if self.gate_scale is not None:
            object.__setattr__(self, "gate_scale", float(self.gate_scale))
        check_choice("gate_norm", self.gate_norm, GATE_NORMS)
        check_bool("detach_summaries", self.detach_summaries)
        if agg.needs_continuous_init and self.init != "continuous":
            raise ValueError(
                f"aggregation {self.aggregation!r} reads a bucket of segments through the "
                "memory at its end, which holds the whole bucket only with init='continuous'; "
                f"got init={self.init!r}"
            )

    @property
    def spec(self):
        """The declared properties of ``aggregation`` (ops/aggregations.py)."""
        return lookup_aggregation(self.aggregation)

    def gate_scale_for(self, key_dim: int) -> float:
        """The gate logits' fixed factor for keys of ``key_dim`` dims: gate_scale, or when it
        is None 1/sqrt(key_dim) for the dot product (gate_norm "none") and 1 for the cosine
        logits of "l2" and "centered" (the temperature sets their sharpness)."""
        if self.gate_scale is not None:
            return self.gate_scale
        return 1.0 / math.sqrt(key_dim) if self.gate_norm == "none" else 1.0
