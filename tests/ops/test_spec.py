"""The typed memory and caching objects: built once, checked once, round-trip through dicts."""

import pytest

from growmem.ops.aggregations import AGGREGATIONS, TABLE, aggregation
from growmem.ops.spec import (
    DEFAULT_GATE_NORM,
    DEFAULT_SEGMENT_SIZE,
    GATE_NORMS,
    Caching,
    DeepMemory,
    MatrixMemory,
    memory_from_dict,
    memory_spec,
)


@pytest.mark.parametrize(
    "spec",
    [
        MatrixMemory("delta", chunk_size=16),
        DeepMemory("titans", mini_batch=8, norm=False, max_grad_norm=1.0, decay_to="zero"),
        DeepMemory("dla"),
    ],
)
def test_memory_round_trip(spec):
    assert memory_from_dict(spec.to_dict()) == spec
    assert hash(memory_from_dict(spec.to_dict())) == hash(spec)


@pytest.mark.parametrize(
    "caching",
    [
        Caching(),
        Caching("ssc", segment_size=5, top_k=3),
        Caching("loglinear", segments="log"),
        Caching("mean", segments=[3, 4], summary="sum", gate_scale=2),
        Caching("ssc", gate_scale=1, gate_norm="centered", detach_summaries=True),
    ],
)
def test_caching_round_trip(caching):
    assert Caching.from_dict(caching.to_dict()) == caching


def test_defaults_and_gates():
    assert Caching().segment_size == DEFAULT_SEGMENT_SIZE
    gates = Caching()
    assert (gates.gate_scale, gates.gate_norm, gates.detach_summaries) == (
        None,
        DEFAULT_GATE_NORM,
        False,
    )
    # gate_scale None: 1/sqrt(Dk) for the dot product, 1 for the cosine logits (the temperature
    # sets their sharpness); a number is itself whatever the geometry
    expected = {"none": 0.25, "l2": 1.0, "centered": 1.0}
    assert {n: Caching(gate_norm=n).gate_scale_for(16) for n in GATE_NORMS} == expected
    assert gates.gate_scale_for(16) == expected[DEFAULT_GATE_NORM]
    for gate_norm in GATE_NORMS:
        assert Caching(gate_scale=2, gate_norm=gate_norm).gate_scale_for(16) == 2.0
    assert Caching(segments="log").segment_size is None
    assert Caching(segments=[2, 3]).segments == (2, 3)  # lists from YAML become hashable
    assert MatrixMemory("swla").gates == ("g", "beta", "lam")
    assert MatrixMemory("linear").gates == ()
    assert DeepMemory("titans").gates == ("eta", "g", "beta")
    assert DeepMemory("dla").gates == ("eta",)
    assert memory_spec("gated_delta", chunk_size=32) == MatrixMemory("gated_delta", 32)
    assert memory_spec("dla", mini_batch=4) == DeepMemory("dla", mini_batch=4)


def test_aggregation_table():
    assert AGGREGATIONS == ("none", "residual", "grm", "soup", "ssc", "loglinear", "mean")
    assert all(name == a.name for name, a in TABLE.items())
    gated = {n for n, a in TABLE.items() if a.gated}
    assert gated == {"grm", "soup", "ssc", "loglinear"}
    assert {n for n, a in TABLE.items() if a.routed} == {"ssc", "loglinear"}
    assert not aggregation("none").keeps_segments
    assert aggregation("residual").uniform == "sum" and aggregation("mean").uniform == "mean"
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregation("gmr")


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: memory_spec("delta", mini_batch=4),
            r"rule 'delta' has no setting \['mini_batch'\]",
        ),
        (lambda: memory_spec("titans", chunk_size=4), r"no setting \['chunk_size'\]"),
        (lambda: memory_spec("mamba"), "rule must be one of"),
        (lambda: MatrixMemory("titans"), "rule must be one of"),
        (lambda: DeepMemory("delta"), "rule must be one of"),
        (lambda: MatrixMemory(chunk_size=0), "chunk_size must be a positive int"),
        (lambda: DeepMemory(mini_batch=2.0), "mini_batch must be a positive int"),
        (lambda: DeepMemory(norm="yes"), "norm must be True or False"),
        (lambda: DeepMemory(max_grad_norm=0), "max_grad_norm must be a positive"),
        (lambda: DeepMemory(eps=float("nan")), "eps must be a positive"),
        (lambda: DeepMemory(decay_to="one"), "decay_to must be one of"),
        (lambda: DeepMemory("dla", decay_to="zero"), "rule 'dla' has no decay"),
        (lambda: memory_from_dict({"chunk_size": 4}), "'rule' key"),
        (lambda: Caching("gmr"), "aggregation must be one of"),
        (lambda: Caching(segment_size=0), "segment_size must be a positive int"),
        (lambda: Caching(segment_size=4, segments="log"), "not both"),
        (lambda: Caching(segments="lin"), "segments must be one of"),
        (lambda: Caching(segments=[]), "non-empty list"),
        (lambda: Caching(segments=[4, 0]), r"segments\[i\] must be a positive int"),
        (lambda: Caching(top_k=0), "top_k must be a positive int"),
        (lambda: Caching(init="reset"), "init must be one of"),
        (lambda: Caching(summary="max"), "summary must be one of"),
        (lambda: Caching(gate_scale=-1.0), "gate_scale must be a positive"),
        (lambda: Caching(gate_norm="cosine"), "gate_norm must be one of"),
        (lambda: Caching(detach_summaries="no"), "detach_summaries must be True or False"),
        (lambda: Caching("loglinear", init="independent"), "init='continuous'"),
        (lambda: Caching.from_dict({"segment": 4}), r"Caching has no setting \['segment'\]"),
        (lambda: Caching.from_dict([("top_k", 2)]), "needs a dict"),
    ],
)
def test_bad_settings_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()
