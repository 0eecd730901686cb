"""Paired starts: models that differ only in their Memory Caching aggregation start from the
same network for one seed, so a comparison measures the aggregation, not the draw."""

import pytest
import torch

from growmem.layers.config import DEFAULT_GATE_TEMPERATURE, DEFAULT_SUMMARY_SOURCE
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.ops.aggregations import AGGREGATIONS

# the gates' own parameters: a temperature, an online bias, the summary keys' projection
GATE_OPTIONS = dict(gate_temperature=3.0, gate_online_bias=4.0, summary_source="gate_keys")
GATE_PARAMETERS = ("gate_log_temperature", "gate_online_bias", "s_proj.weight")
# the gated aggregations' parameters with the library's defaults: the temperature (if any)
# and the summary keys' projection (if the summaries are of their own keys)
DEFAULT_PARAMETERS = {
    *(() if DEFAULT_GATE_TEMPERATURE is None else ("gate_log_temperature",)),
    *(("s_proj.weight",) if DEFAULT_SUMMARY_SOURCE == "gate_keys" else ()),
}
NO_GATE_PARAMETERS = dict(gate_temperature=None, summary_source="keys")


def build(rule: str, aggregation: str, seed: int, **layer) -> GrowMemForCausalLM:
    torch.manual_seed(seed)
    memory = {"rule": rule, "caching": {"aggregation": aggregation, "segment_size": 8}, **layer}
    config = GrowMemConfig(
        vocab_size=61, hidden_size=24, num_hidden_layers=2, num_heads=2, memory=memory
    )
    return GrowMemForCausalLM(config)


def without_gate_queries(model: GrowMemForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights, the gate queries' rows left out of every in_proj and the gates' own
    parameters left out."""
    weights = {}
    for name, value in model.state_dict().items():
        if name.endswith(GATE_PARAMETERS):
            continue
        if name.endswith("mixer.in_proj.weight"):
            rows = model.get_submodule(name.removesuffix(".in_proj.weight")).gate_query_rows
            if rows is not None:
                value = torch.cat([value[: rows.start], value[rows.stop :]])
        weights[name] = value
    return weights


@pytest.mark.parametrize(
    ("gate_options", "parameters"),
    [
        ({}, DEFAULT_PARAMETERS),
        (NO_GATE_PARAMETERS, set()),
        (GATE_OPTIONS, set(GATE_PARAMETERS)),
    ],
    ids=["defaults", "no-gate-parameters", "gate-parameters"],
)
@pytest.mark.parametrize("rule", ["gated_delta", "swla", "titans"])
def test_aggregations_share_every_other_initial_weight(rule, gate_options, parameters):
    """With the library's default gates, without any gate parameter, and with all of them (set
    for every model: the ungated ones have none)."""
    base = without_gate_queries(build(rule, "none", seed=3, **gate_options))
    for aggregation in AGGREGATIONS[1:]:
        model = build(rule, aggregation, seed=3, **gate_options)
        weights = without_gate_queries(model)
        assert weights.keys() == base.keys()
        for name, value in weights.items():
            assert torch.equal(value, base[name]), (aggregation, name)
        layer = model.model.layers[0].mixer
        if layer.gate_query_rows is not None:  # the gate queries are drawn, at the same std
            u = layer.in_proj.weight[layer.gate_query_rows]
            assert 0.015 < u.std().item() < 0.025
        own = {n for n, _ in layer.named_parameters() if n.endswith(GATE_PARAMETERS)}
        assert own == (parameters if layer.uses_u else set())
        # at their initial values: τ0, b0, and the summary keys drawn like u
        if "gate_log_temperature" in own:
            tau0 = gate_options.get("gate_temperature", DEFAULT_GATE_TEMPERATURE)
            assert torch.equal(layer.gate_log_temperature.exp(), torch.full((2,), tau0))
        if "gate_online_bias" in own:
            assert torch.equal(layer.gate_online_bias, torch.full((2,), 4.0))
        if "s_proj.weight" in own:
            assert 0.015 < layer.s_proj.weight.std().item() < 0.025
            assert not torch.equal(layer.s_proj.weight, u)  # a stream of its own


def test_the_gate_parameters_leave_every_other_weight_alone():
    """A grm model with the gates' own parameters starts as the grm model without them."""
    plain = build("gated_delta", "grm", seed=4, **NO_GATE_PARAMETERS).state_dict()
    weights = build("gated_delta", "grm", seed=4, **GATE_OPTIONS).state_dict()
    assert {n for n in weights if n not in plain} == {
        f"model.layers.{i}.mixer.{p}" for i in range(2) for p in GATE_PARAMETERS
    }
    for name, value in plain.items():
        assert torch.equal(value, weights[name]), name


def test_seeds_give_other_weights_and_the_same_seed_the_same():
    a, b, again = (build("gated_delta", "grm", s).state_dict() for s in (0, 1, 0))
    for name, value in a.items():
        assert torch.equal(value, again[name]), name
        if value.std() > 0:  # not a constant init (norm gains, zero biases)
            assert not torch.equal(value, b[name]), name


def test_a_deeper_model_keeps_the_shallower_ones_weights():
    """Each module draws from a stream named after it: a model with a third layer keeps the
    first two layers' weights (but for the residual outputs, scaled by 1/sqrt(2 · layers))."""
    models = []
    for layers in (2, 3):
        torch.manual_seed(5)
        config = GrowMemConfig(vocab_size=61, hidden_size=24, num_hidden_layers=layers,
                               num_heads=2)  # fmt: skip
        models.append(GrowMemForCausalLM(config))
    small, deeper = models
    deep_weights = deeper.state_dict()
    scaled = {
        f"{name}.weight"
        for name, module in small.named_modules()
        if getattr(module, "is_residual_output", False)
    }
    assert scaled  # o_proj and the SwiGLU's output projection of every layer
    for name, value in small.state_dict().items():
        same = torch.equal(value, deep_weights[name])
        assert same != (name in scaled), name
