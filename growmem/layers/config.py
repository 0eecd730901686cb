"""MemoryConfig: every setting of a memory layer, from a YAML file down to the op.

The op's own objects (``MatrixMemory`` / ``DeepMemory``: which memory and its rule's knobs;
``Caching``: the Memory Caching choices) plus what the layer itself builds around them (the
short convolution, the q/k norm, the deep memories' MLP width and inner learning-rate bound).
It is checked once, when built; ``GrowMemConfig`` nests it (``config.memory``) and the layer
hands ``memory`` and ``caching`` to ``memory_caching`` unchanged.

In a dict (YAML, config.json) the memory's rule and knobs sit beside the layer's, and the
caching choices form a section::

    memory:
      rule: titans          # the memory (MatrixMemory / DeepMemory fields)
      mini_batch: 16
      eta_max: 0.3          # the layer
      caching: {aggregation: grm, segment_size: 16}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

from growmem.ops.aggregations import TABLE as AGGREGATION_TABLE
from growmem.ops.caching.read_impl import LAYER_IMPLS
from growmem.ops.checks import (
    LINEAR_RULES,
    check_bool,
    check_choice,
    check_float,
    check_positive_float,
    check_positive_int,
)
from growmem.ops.spec import (
    DEEP_RULES,
    LEGACY_GATE_NORM,
    Caching,
    DeepMemory,
    MatrixMemory,
    memory_spec,
)

# The layer's settings of deep memories only, and their defaults.
DEEP_LAYER_DEFAULTS = {"expansion": 4, "eta_max": 0.1}
# What the gates' summaries summarise: the memory keys, or a projection of their own.
SUMMARY_SOURCES = ("keys", "gate_keys")
# The default: summaries of a projection of their own (x W_s), chosen with the temperature by
# the paired gate ablation in docs/results.md (mqar_capacity); the memory keys before.
DEFAULT_SUMMARY_SOURCE = "gate_keys"
LEGACY_SUMMARY_SOURCE = "keys"
# The initial value τ0 of the gated aggregations' learnable per-head temperature: with the
# default cosine gates (growmem/ops/spec.py DEFAULT_GATE_NORM) the logits start in [-5, 5].
# Chosen by the paired gate ablation in docs/results.md (mqar_capacity), with the geometry.
DEFAULT_GATE_TEMPERATURE = 5.0
# No temperature: what configs of earlier releases, saved before the setting existed, meant.
LEGACY_GATE_TEMPERATURE = None


@dataclass(frozen=True)
class MemoryConfig:
    """The settings of a ``MemoryCachingAttention`` layer (all layers of a model share them).

    Args:
        memory: the memory and its rule's knobs, passed to the op (``MatrixMemory`` for
            linear | decay | delta | gated_delta | swla, ``DeepMemory`` for dla | titans).
        caching: the Memory Caching choices, passed to the op: aggregation, segment_size or
            segments ("log": Log-Linear++'s logarithmic segments, or explicit lengths), top_k,
            init, summary, gate_scale (None: 1/sqrt(head_dim) for gate_norm "none", 1 for the
            cosine gates), gate_norm ("none", "l2", "centered"; default the cosine gates of
            ``DEFAULT_GATE_NORM``), detach_summaries.
        use_short_conv: causal depthwise convolution (with SiLU) on q, k and v.
        conv_size: its kernel size.
        qk_norm: L2-normalise q and k (the delta rules need it for stability).
        expansion: deep memories only (default 4): the MLP memory's hidden size is
            expansion · head_dim. Setting it for a matrix memory is a ValueError.
        eta_max: deep memories only (default 0.1): bound of the inner learning rate
            η = eta_max · sigmoid(x W_η). Setting it for a matrix memory is a ValueError.
        gate_temperature: τ0 > 0 (default ``DEFAULT_GATE_TEMPERATURE``, 5) or None (no
            temperature): the gate logits of head h are multiplied by a learnable
            τ_h = exp(gate_log_temperature_h), which starts at τ0 (with gate_norm "l2" or
            "centered", the default cosine gates, it sets the gates' sharpness).
        gate_online_bias: None (no bias) or b0: a learnable per-head bias, starting at b0, is
            added to the online memory's gate logit (b0 = 4 starts grm and ssc close to the
            plain RNN, online weight ≈ 1, and lets the gates open the caches as they learn).
        summary_source: what the gates' segment summaries summarise: "gate_keys" (default,
            ``DEFAULT_SUMMARY_SOURCE``: a projection of their own, s_t = x_t W_s, like the gate
            queries u) or "keys" (the memory keys, after the short convolution and the q/k
            norm).
        o_norm_eps: epsilon of the output RMSNorm; None: the layer's ``norm_eps``.
        impl: how the op computes (``memory_caching``'s impl, without "reference"): "auto"
            (default: the Triton reads of cached matrix memories on CUDA when triton is
            installed, else PyTorch), "chunk" (PyTorch) or "triton". Not part of a cache's
            fingerprint: every impl keeps the same cache.

        The four gate settings (and ``caching``'s gate ones) act only in the gated
        aggregations (grm, soup, ssc, loglinear); the others ignore them. Configs saved before
        gate_norm and gate_temperature existed keep their gates (``with_legacy_gates``).
    """

    memory: MatrixMemory | DeepMemory = field(default_factory=MatrixMemory)
    caching: Caching = field(default_factory=Caching)
    use_short_conv: bool = True
    conv_size: int = 4
    qk_norm: bool = True
    expansion: int | None = None
    eta_max: float | None = None
    gate_temperature: float | None = DEFAULT_GATE_TEMPERATURE
    gate_online_bias: float | None = None
    summary_source: str = DEFAULT_SUMMARY_SOURCE
    o_norm_eps: float | None = None
    impl: str = "auto"

    def __post_init__(self):
        if not isinstance(self.memory, (MatrixMemory, DeepMemory)):
            raise TypeError(
                "memory must be a MatrixMemory or DeepMemory (growmem.ops.memory_spec builds "
                f"one from a rule), got {type(self.memory).__name__}"
            )
        if not isinstance(self.caching, Caching):
            raise TypeError(f"caching must be a Caching, got {type(self.caching).__name__}")
        check_bool("use_short_conv", self.use_short_conv)
        check_positive_int("conv_size", self.conv_size)
        check_bool("qk_norm", self.qk_norm)
        check_positive_float("gate_temperature", self.gate_temperature, allow_none=True)
        check_float("gate_online_bias", self.gate_online_bias, allow_none=True)
        check_choice("summary_source", self.summary_source, SUMMARY_SOURCES)
        check_positive_float("o_norm_eps", self.o_norm_eps, allow_none=True)
        check_choice("impl", self.impl, LAYER_IMPLS)
        for name in ("gate_temperature", "gate_online_bias", "o_norm_eps"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        for name, default in DEEP_LAYER_DEFAULTS.items():
            value = getattr(self, name)
            if not self.deep:
                if value is not None:
                    raise ValueError(
                        f"{name} is a setting of the deep memories {list(DEEP_RULES)}; rule "
                        f"{self.memory.rule!r} has a matrix memory: leave {name} unset"
                    )
                continue
            value = default if value is None else value
            (check_positive_int if name == "expansion" else check_positive_float)(name, value)
            object.__setattr__(self, name, float(value) if name == "eta_max" else value)

    @property
    def deep(self) -> bool:
        """Whether the memory is an MLP (dla, titans) rather than a matrix."""
        return isinstance(self.memory, DeepMemory)

    @property
    def rule(self) -> str:
        """The memory's rule (``memory.rule``)."""
        return self.memory.rule

    def to_dict(self) -> dict:
        """Plain values for YAML or JSON: the memory's fields, the layer's, and ``caching``."""
        values = {**self.memory.to_dict(), "caching": self.caching.to_dict()}
        for f in fields(self):
            if f.name not in ("memory", "caching") and (
                self.deep or f.name not in DEEP_LAYER_DEFAULTS
            ):
                values[f.name] = getattr(self, f.name)
        return values

    def settings(self) -> tuple[tuple[str, object], ...]:
        """Every setting as (name, value) pairs, the caching ones named ``caching.<name>``:
        what a cache fingerprints, and what its mismatch messages name."""
        values = self.to_dict()
        caching = values.pop("caching")
        # how the op computes, not what: a cache serves every impl (a matrix memory's
        # scan_impl likewise)
        del values["impl"]
        values.pop("scan_impl", None)
        pairs = [*values.items(), *((f"caching.{k}", v) for k, v in caching.items())]
        return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in pairs)

    @classmethod
    def from_dict(cls, values: dict) -> MemoryConfig:
        """The inverse of ``to_dict``; missing settings take their defaults (rule:
        gated_delta), today's (a dict saved by an earlier release goes through
        ``with_legacy_gates`` first: GrowMemConfig.from_dict does it for config.json).

        Raises:
            ValueError: a setting that neither the rule nor the layer has (naming both lists),
                or a value its object refuses.
        """
        if isinstance(values, MemoryConfig):
            return values
        if not isinstance(values, dict):
            raise ValueError(
                f"memory settings must be a mapping (rule, its knobs, caching, the layer's), "
                f"got {type(values).__name__}"
            )
        values = dict(values)
        caching = values.pop("caching", None)
        layer_names = [f.name for f in fields(cls) if f.name not in ("memory", "caching")]
        layer = {n: values.pop(n) for n in layer_names if n in values}
        rule = values.pop("rule", MatrixMemory.rule)
        check_choice("rule", rule, (*LINEAR_RULES, *DEEP_RULES))
        memory_class = DeepMemory if rule in DEEP_RULES else MatrixMemory
        knobs = [f.name for f in fields(memory_class) if f.name != "rule"]
        unknown = sorted(set(values) - set(knobs))
        if unknown:
            raise ValueError(
                f"memory has no setting {unknown}: rule {rule!r} takes {knobs}, the layer "
                f"takes {layer_names}, and the caching choices go in 'caching'"
            )
        return cls(
            memory=memory_spec(rule, **values),
            caching=Caching.from_dict(caching or {}),
            **layer,
        )


# The flat settings of GrowMemConfig and MemoryCachingAttention before MemoryConfig, with their
# defaults then (MemoryConfig's are the same), and where each lives now.
FLAT_DEFAULTS = {
    "rule": "gated_delta",
    "aggregation": "grm",
    "segment_size": 256,
    "top_k": 2,
    "init": "continuous",
    "summary": "mean",
    "use_short_conv": True,
    "conv_size": 4,
    "qk_norm": True,
    "chunk_size": 64,
    "expansion": 4,
    "mini_batch": 64,
    "eta_max": 0.1,
    "max_grad_norm": 1.0,
    "mlp_norm": True,
    "decay_to": "init",
}
FLAT_PATHS = {
    "rule": "memory.rule",
    "chunk_size": "memory.chunk_size",
    "mini_batch": "memory.mini_batch",
    "max_grad_norm": "memory.max_grad_norm",
    "mlp_norm": "memory.norm",
    "decay_to": "memory.decay_to",
    "aggregation": "caching.aggregation",
    "segment_size": "caching.segment_size",
    "top_k": "caching.top_k",
    "ssc_top_k": "caching.top_k",  # GrowMemConfig's stored name of top_k
    "init": "caching.init",
    "summary": "caching.summary",
    "use_short_conv": "use_short_conv",
    "conv_size": "conv_size",
    "qk_norm": "qk_norm",
    "expansion": "expansion",
    "eta_max": "eta_max",
}
# what a matrix memory's layer ignored
_DEEP_ONLY = {"mini_batch", "max_grad_norm", "mlp_norm", "decay_to", *DEEP_LAYER_DEFAULTS}


def with_legacy_gates(memory):
    """A memory dict saved by an earlier release (``MemoryConfig.to_dict``'s form: config.json,
    a run's run.yaml, flat settings converted), with the gate settings that it lacks because
    they did not exist then set to what it meant: ``caching.gate_norm`` "none" (the scaled dot
    product, ``LEGACY_GATE_NORM``), ``gate_temperature`` None (``LEGACY_GATE_TEMPERATURE``) and
    ``summary_source`` "keys" (``LEGACY_SUMMARY_SOURCE``).
    The one place saved configs are read with the old gate defaults; what it already has is
    kept, and a dict a user writes now takes today's defaults.

    Only gated aggregations (grm, soup, ssc, loglinear; caching.aggregation's default is grm)
    get them: the others have no gates, so either value builds the same model, and today's
    defaults keep such a config equal to a new one of the same model (a resume compares them).
    Anything but a dict (None: a Transformer++; a malformed value, which building the config
    reports) is returned as it is.
    """
    if not isinstance(memory, dict) or not isinstance(memory.get("caching", {}), dict):
        return memory
    caching = dict(memory.get("caching") or {})
    name = caching.get("aggregation", Caching.aggregation)
    spec = AGGREGATION_TABLE.get(name) if isinstance(name, str) else None
    if spec is None or not spec.gated:  # an unknown name: MemoryConfig's error names it
        return memory
    caching.setdefault("gate_norm", LEGACY_GATE_NORM)
    pinned = {**memory, "caching": caching}
    pinned.setdefault("gate_temperature", LEGACY_GATE_TEMPERATURE)
    pinned.setdefault("summary_source", LEGACY_SUMMARY_SOURCE)
    return pinned


def nested_from_flat(flat: dict, memory: dict | None = None) -> dict:
    """The memory dict (``MemoryConfig.to_dict``'s form) of flat settings of earlier releases,
    written over ``memory`` (e.g. a base config's memory dict; default: none, so the missing
    settings take MemoryConfig's defaults, which are the flat ones). The flat settings
    predate the gate settings: a gated aggregation keeps the gates it had then
    (``with_legacy_gates``).

    The old layer ignored the settings its rule does not have (a gated_delta config carried
    mini_batch, a titans one chunk_size, a dla one decay_to): they are dropped, so every saved
    config converts. Values are checked when the dict is built into a MemoryConfig.

    Raises:
        ValueError: ``top_k`` and ``ssc_top_k`` (its stored name) that differ.
    """
    flat = dict(flat)
    if "ssc_top_k" in flat:
        alias = flat.pop("ssc_top_k")
        if flat.get("top_k", alias) != alias:
            raise ValueError(
                f"top_k ({flat['top_k']!r}) and ssc_top_k ({alias!r}) name one setting: pass one"
            )
        flat["top_k"] = alias
    memory = dict(memory or {})
    caching = dict(memory.get("caching") or {})
    rule = flat.get("rule", memory.get("rule", MatrixMemory.rule))
    ignored = _DEEP_ONLY if rule not in DEEP_RULES else {"chunk_size"}
    ignored = {*ignored, "decay_to"} if rule == "dla" else ignored  # dla has no decay
    for name, value in flat.items():
        if name in ignored:
            continue
        section, _, key = FLAT_PATHS[name].rpartition(".")
        (caching if section == "caching" else memory)[key] = value
    return with_legacy_gates({**memory, "caching": caching})


def warn_flat(owner: str, names, instead: str) -> None:
    """The FutureWarning of flat settings ``names`` given to ``owner``; ``instead``: what to
    write now."""
    warnings.warn(
        f"{owner}: the flat memory settings {sorted(names)} are deprecated and will be "
        f"removed; {instead}",
        FutureWarning,
        stacklevel=3,  # the caller of owner
    )


def flat_value(config: MemoryConfig, name: str):
    """The value that the flat setting ``name`` (a key of ``FLAT_PATHS``) has in ``config``.

    Raises:
        AttributeError: the memory has no such knob (a matrix memory has no mini_batch).
    """
    value = config
    for part in FLAT_PATHS[name].split("."):
        if not hasattr(value, part) or (part in DEEP_LAYER_DEFAULTS and not config.deep):
            raise AttributeError(f"rule {config.rule!r} has no setting {name!r}")
        value = getattr(value, part)
    return value
