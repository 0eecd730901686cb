"""MemoryConfig: its dict round trip, named errors, and the flat settings of earlier releases
(converted with a FutureWarning, for the layer's keyword arguments and its attributes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from growmem.layers import MemoryCachingAttention, MemoryConfig
from growmem.layers.config import (
    DEFAULT_GATE_TEMPERATURE,
    DEFAULT_SUMMARY_SOURCE,
    FLAT_DEFAULTS,
    FLAT_PATHS,
    nested_from_flat,
)
from growmem.ops.spec import DEFAULT_GATE_NORM, Caching, DeepMemory, MatrixMemory

# the gates of configs written before gate_norm and gate_temperature existed: the scaled dot
# product, no temperature
LEGACY = dict(gate_norm="none")

CONFIGS = [
    MemoryConfig(),
    MemoryConfig(
        memory=MatrixMemory("swla", chunk_size=16),
        caching=Caching("ssc", segments=(4, 8, 20), top_k=3, summary="sum", gate_scale=0.5),
        use_short_conv=False,
        conv_size=3,
        qk_norm=False,
    ),
    MemoryConfig(
        memory=DeepMemory("titans", mini_batch=8, norm=False, max_grad_norm=None, decay_to="zero"),
        caching=Caching("loglinear", segments="log"),
        expansion=2,
        eta_max=0.3,
    ),
    MemoryConfig(memory=DeepMemory("dla"), caching=Caching("none", init="independent")),
    MemoryConfig(
        caching=Caching("ssc", gate_scale=1.0, gate_norm="centered", detach_summaries=True),
        gate_temperature=10.0,
        gate_online_bias=-4,
        summary_source="gate_keys",
        o_norm_eps=1e-8,
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.rule)
def test_dict_round_trip_and_hash(config):
    values = config.to_dict()
    assert MemoryConfig.from_dict(values) == config
    assert hash(MemoryConfig.from_dict(values)) == hash(config)
    # the memory's fields sit at the top, the caching choices in their section
    assert values["rule"] == config.memory.rule
    assert Caching.from_dict(values["caching"]) == config.caching
    assert ("expansion" in values) == config.deep
    assert dict(config.settings())["caching.aggregation"] == config.caching.aggregation


def test_defaults():
    config = MemoryConfig.from_dict({})
    assert config == MemoryConfig()
    assert config.memory == MatrixMemory("gated_delta", chunk_size=64)
    assert config.caching == Caching("grm", segment_size=256, top_k=2)
    deep = MemoryConfig.from_dict({"rule": "titans"})
    assert (deep.expansion, deep.eta_max, deep.memory.max_grad_norm) == (4, 0.1, 1.0)
    # the gates: cosine with a learnable temperature starting at τ0 (the library's constants)
    assert (config.caching.gate_norm, config.caching.gate_scale) == (DEFAULT_GATE_NORM, None)
    gates = (config.gate_temperature, config.gate_online_bias, config.summary_source)
    assert gates == (DEFAULT_GATE_TEMPERATURE, None, DEFAULT_SUMMARY_SOURCE)
    assert config.o_norm_eps is None
    assert isinstance(config.gate_temperature, float)
    # a dict a user writes now, however partial, takes today's defaults
    partial = MemoryConfig.from_dict({"caching": {"aggregation": "ssc", "segment_size": 8}})
    assert (partial.caching.gate_norm, partial.gate_temperature) == (
        DEFAULT_GATE_NORM,
        DEFAULT_GATE_TEMPERATURE,
    )
    assert MemoryConfig(gate_online_bias=4).gate_online_bias == 4.0  # a float, also from an int


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rule": "lstm"}, r"rule must be one of \['linear', .*'titans'\], got 'lstm'"),
        ({"rule": "lstm", "mini_batch": 2}, r"rule must be one of .*, got 'lstm'"),
        ({"mini_batch": 4}, r"memory has no setting \['mini_batch'\]: rule 'gated_delta'"),
        ({"rule": "titans", "chunk_size": 8}, r"no setting \['chunk_size'\]: rule 'titans' takes"),
        ({"eta_max": 0.3}, r"eta_max is a setting of the deep memories"),
        ({"expansion": 2}, r"expansion is a setting of the deep memories"),
        ({"aggregation": "grm"}, r"no setting \['aggregation'\].*caching choices go in 'caching'"),
        ({"caching": {"aggregation": "max"}}, r"aggregation must be one of"),
        ({"caching": {"k": 2}}, r"Caching has no setting \['k'\]"),
        (
            {"caching": {"segment_size": 8, "segments": "log"}},
            r"pass segment_size .* or segments .*not both",
        ),
        ({"rule": "titans", "eta_max": 0}, r"eta_max must be a positive"),
        ({"conv_size": 0}, r"conv_size must be a positive int"),
        ({"gate_temperature": 0}, r"gate_temperature must be a positive finite number or None"),
        ({"gate_online_bias": "high"}, r"gate_online_bias must be a finite number or None"),
        ({"summary_source": "x"}, r"summary_source must be one of \['keys', 'gate_keys'\]"),
        ({"o_norm_eps": -1e-6}, r"o_norm_eps must be a positive"),
        ({"caching": {"gate_norm": "cos"}}, r"gate_norm must be one of"),
        ({"gate_norm": "l2"}, r"no setting \['gate_norm'\].*caching choices go in 'caching'"),
        ("grm", r"memory settings must be a mapping"),
    ],
)
def test_bad_settings_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        MemoryConfig.from_dict(values)


def test_segment_size_none_with_segments_in_a_dict():
    config = MemoryConfig.from_dict({"caching": {"segment_size": None, "segments": [4, 4]}})
    assert config.caching.segments == (4, 4) and config.caching.segment_size is None


# every flat setting at a value other than its old default
FLAT_MATRIX = dict(
    rule="swla",
    aggregation="ssc",
    segment_size=8,
    top_k=3,
    init="independent",
    summary="sum",
    use_short_conv=False,
    conv_size=3,
    qk_norm=False,
    chunk_size=16,
)
FLAT_DEEP = dict(
    rule="titans",
    aggregation="soup",
    segment_size=8,
    expansion=2,
    mini_batch=4,
    eta_max=0.3,
    max_grad_norm=None,
    mlp_norm=False,
    decay_to="zero",
)


def convert(flat: dict, memory: dict | None = None) -> MemoryConfig:
    return MemoryConfig.from_dict(nested_from_flat(flat, memory))


def test_flat_settings_convert():
    matrix = convert({**FLAT_MATRIX, "mini_batch": 4, "eta_max": 1.0})
    assert matrix == MemoryConfig(
        memory=MatrixMemory("swla", chunk_size=16),
        caching=Caching(
            "ssc", segment_size=8, top_k=3, init="independent", summary="sum", **LEGACY
        ),
        use_short_conv=False,
        conv_size=3,
        qk_norm=False,
        gate_temperature=None,
        summary_source="keys",
    )  # mini_batch and eta_max did nothing for a matrix memory: dropped
    assert convert({**FLAT_DEEP, "chunk_size": 8}) == MemoryConfig(
        memory=DeepMemory("titans", mini_batch=4, norm=False, max_grad_norm=None, decay_to="zero"),
        caching=Caching("soup", segment_size=8, **LEGACY),
        expansion=2,
        eta_max=0.3,
        gate_temperature=None,
        summary_source="keys",
    )  # the flat settings predate the gate settings: their gates are the old ones
    assert convert({"rule": "dla", "decay_to": "zero"}).memory == DeepMemory("dla")
    assert convert({"ssc_top_k": 3}).caching.top_k == 3
    with pytest.raises(ValueError, match=r"top_k .* and ssc_top_k .* name one setting"):
        convert({"top_k": 2, "ssc_top_k": 3})
    assert set(FLAT_MATRIX) | set(FLAT_DEEP) == set(FLAT_DEFAULTS)


def test_flat_defaults_are_the_nested_defaults():
    """Missing flat settings take MemoryConfig's defaults: they must be the old ones."""
    matrix_keys = {"rule", "chunk_size", *FLAT_MATRIX}
    assert convert({}) == convert({k: FLAT_DEFAULTS[k] for k in matrix_keys})
    deep_defaults = {**FLAT_DEFAULTS, "rule": "titans"}
    assert convert({"rule": "titans"}) == convert(deep_defaults)


def test_flat_settings_written_over_a_nested_memory():
    """An old YAML that names a rule or aggregation over a base in the new form."""
    base = {"rule": "gated_delta", "caching": {"aggregation": "none", "segment_size": 16}}
    config = convert({"rule": "titans", "aggregation": "grm", "mini_batch": 2}, base)
    assert config.memory == DeepMemory("titans", mini_batch=2)
    assert config.caching == Caching("grm", segment_size=16, **LEGACY)
    assert (config.gate_temperature, config.summary_source) == (None, "keys")
    # gate settings the nested memory names are kept
    named = {**base, "gate_temperature": 2.0, "caching": {**base["caching"], "gate_norm": "l2"}}
    config = convert({"aggregation": "grm"}, named)
    assert (config.caching.gate_norm, config.gate_temperature) == ("l2", 2.0)


def test_layer_takes_the_flat_settings_with_a_future_warning():
    torch.manual_seed(0)
    message = r"^MemoryCachingAttention: the flat memory settings .* pass config=MemoryConfig"
    with pytest.warns(FutureWarning, match=message) as warned:
        old = MemoryCachingAttention(16, 2, **FLAT_DEEP)
    assert warned.list[0].filename == __file__  # the warning points at the caller
    torch.manual_seed(0)
    new = MemoryCachingAttention(16, 2, convert(FLAT_DEEP))
    assert old.config == new.config
    x = torch.randn(1, 11, 16)
    assert torch.equal(old(x)[0], new(x)[0])
    with pytest.raises(ValueError, match="pass config or the deprecated flat settings"):
        MemoryCachingAttention(16, 2, new.config, rule="delta")


@pytest.mark.parametrize("name", sorted(FLAT_DEFAULTS))
def test_layer_reads_a_flat_attribute_with_a_future_warning(name):
    flat = FLAT_MATRIX if name in FLAT_MATRIX else FLAT_DEEP
    config = convert(flat)
    layer = MemoryCachingAttention(16, 2, config)
    with pytest.warns(FutureWarning, match=rf"read layer.config.{FLAT_PATHS[name]}$"):
        value = getattr(layer, name)
    assert value == flat.get(name, FLAT_DEFAULTS[name])


def test_layer_refuses_a_flat_attribute_its_memory_lacks():
    layer = MemoryCachingAttention(16, 2, MemoryConfig())
    with (
        pytest.warns(FutureWarning),
        pytest.raises(AttributeError, match="no setting 'mini_batch'"),
    ):
        layer.mini_batch  # noqa: B018
    with pytest.raises(AttributeError, match="segment"):
        layer.segment  # noqa: B018 -- not a flat name: the usual error


def test_the_objects_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        MemoryConfig().conv_size = 3


def test_where_the_op_computes_is_a_setting_but_not_part_of_the_fingerprint():
    """memory.scan_impl (the scans: fla or PyTorch) and impl (the reads: Triton or PyTorch)
    travel through the dict, but a cache built under one serves every other."""
    chosen = MemoryConfig.from_dict({"rule": "delta", "scan_impl": "torch", "impl": "chunk"})
    assert chosen.memory == MatrixMemory("delta", scan_impl="torch")
    assert chosen.impl == "chunk"
    assert MemoryConfig.from_dict(chosen.to_dict()) == chosen
    assert chosen.settings() == MemoryConfig(memory=MatrixMemory("delta")).settings()
    with pytest.raises(ValueError, match="scan_impl"):
        MemoryConfig.from_dict({"rule": "delta", "scan_impl": "cuda"})
    with pytest.raises(ValueError, match=r"rule 'titans' takes"):
        MemoryConfig.from_dict({"rule": "titans", "scan_impl": "torch"})
