"""Tests of GrowMemConfig: every bad value is a ValueError naming it, the nested memory
settings round-trip through dicts and config.json, and configs of earlier releases (flat
memory settings, as arguments or in a saved model folder) still load."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, GenerationConfig

from growmem.layers.config import DEFAULT_GATE_TEMPERATURE
from growmem.models import GrowMemConfig, GrowMemForCausalLM, MemoryConfig
from growmem.ops.spec import DEFAULT_GATE_NORM, Caching, DeepMemory, MatrixMemory
from tests.helpers import memory_config

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2)
# config.json of tiny models saved by growmem e872a2b (flat GrowMemConfig) and the names and
# shapes of their weights (no weights in git: the test makes them).
FLAT_MODELS = Path(__file__).parent / "data" / "flat_config_models"


def arg(name: str) -> str:
    """A message that starts with the argument's name."""
    return r"^" + re.escape(name) + r"\b"


BAD = {
    "norm_eps 0": ("norm_eps", dict(norm_eps=0.0)),
    "norm_eps negative": ("norm_eps", dict(norm_eps=-1e-6)),
    "norm_eps nan": ("norm_eps", dict(norm_eps=math.nan)),
    "initializer_range negative": ("initializer_range", dict(initializer_range=-0.02)),
    "initializer_range inf": ("initializer_range", dict(initializer_range=math.inf)),
    "tie_word_embeddings 'no'": ("tie_word_embeddings", dict(tie_word_embeddings="no")),
    "use_cache 0": ("use_cache", dict(use_cache=0)),
    "rope_theta inf": ("rope_theta", dict(rope_theta=math.inf)),
    "rope_theta string": ("rope_theta", dict(rope_theta="1e4")),
    # the memory settings: checked once, by the objects the dict builds
    "conv_size 0": ("conv_size", dict(memory={"conv_size": 0})),
    "chunk_size 0": ("chunk_size", dict(memory={"chunk_size": 0})),
    "mini_batch 0": ("mini_batch", dict(memory={"rule": "dla", "mini_batch": 0})),
    "expansion 0": ("expansion", dict(memory={"rule": "titans", "expansion": 0})),
    "eta_max 0": ("eta_max", dict(memory={"rule": "titans", "eta_max": 0.0})),
    "eta_max inf": ("eta_max", dict(memory={"rule": "titans", "eta_max": math.inf})),
    "eta_max string": ("eta_max", dict(memory={"rule": "titans", "eta_max": "0.1"})),
    "eta_max on a matrix rule": ("eta_max", dict(memory={"eta_max": 0.1})),
    "max_grad_norm 0": ("max_grad_norm", dict(memory={"rule": "dla", "max_grad_norm": 0})),
    "norm 'false'": ("norm", dict(memory={"rule": "titans", "norm": "false"})),
    "decay_to 'one'": ("decay_to", dict(memory={"rule": "titans", "decay_to": "one"})),
    "use_short_conv 'no'": ("use_short_conv", dict(memory={"use_short_conv": "no"})),
    "qk_norm 1": ("qk_norm", dict(memory={"qk_norm": 1})),
    "top_k 0": ("top_k", dict(memory={"caching": {"top_k": 0}})),
    "segments 'lin'": ("segments", dict(memory={"caching": {"segments": "lin"}})),
    "gate_scale -1": ("gate_scale", dict(memory={"caching": {"gate_scale": -1.0}})),
    "memory a string": ("memory settings", dict(memory="gated_delta+grm")),
    # the flat settings of earlier releases are checked by the same objects
    "flat top_k 0": ("top_k", dict(top_k=0)),
    "flat ssc_top_k float": ("top_k", dict(ssc_top_k=1.5)),
    "flat top_k and ssc_top_k differ": ("top_k", dict(top_k=2, ssc_top_k=3)),
    "flat eta_max nan": ("eta_max", dict(rule="titans", eta_max=math.nan)),
    "flat memory and memory": ("pass memory", dict(memory={"rule": "delta"}, rule="delta")),
    "gate_temperature 0": ("gate_temperature", dict(memory={"gate_temperature": 0})),
    "gate_norm unknown": ("gate_norm", dict(memory={"caching": {"gate_norm": "unit"}})),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_bad_value_raises_value_error_naming_it(case):
    name, kwargs = BAD[case]
    with pytest.raises(ValueError, match=arg(name)):
        GrowMemConfig(**BASE, **kwargs)


MEMORIES = [
    MemoryConfig(),
    memory_config("swla", aggregation="ssc", top_k=3, segments="log", gate_scale=0.5),
    memory_config("titans", aggregation="soup", segments=[4, 8], mini_batch=4, eta_max=0.3),
    memory_config(
        "gated_delta",
        aggregation="grm",
        gate_norm="l2",
        gate_scale=1.0,
        detach_summaries=True,
        gate_temperature=10.0,
        gate_online_bias=4.0,
        summary_source="gate_keys",
        o_norm_eps=1e-8,
    ),
    None,  # Transformer++
]


@pytest.mark.parametrize("memory", MEMORIES, ids=lambda m: getattr(m, "rule", "attention"))
def test_memory_round_trips_through_dicts_and_config_json(memory, tmp_path):
    config = GrowMemConfig(**BASE, memory=memory, attn_layers=[1])
    assert config.memory == memory
    stored = config.to_dict()["memory"]
    assert stored == (None if memory is None else memory.to_dict())
    assert GrowMemConfig(**config.to_dict()).memory == memory
    assert GrowMemConfig(**BASE, memory=stored).memory == memory  # the dict form
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["memory"] == stored
    assert GrowMemConfig.from_pretrained(tmp_path).memory == memory
    assert config.is_attention_layer(1)
    assert config.is_attention_layer(0) == (memory is None)


def test_memory_is_always_a_checked_object():
    config = GrowMemConfig(**BASE)
    assert config.memory == MemoryConfig()
    config.memory = {"rule": "delta", "caching": {"aggregation": "residual"}}
    assert config.memory.memory == MatrixMemory("delta")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        config.memory = {"caching": {"aggregation": "sum"}}
    with pytest.raises(AttributeError, match=r"config.memory.caching.segment_size: assign"):
        config.segment_size = 8


def test_from_pretrained_overrides_are_checked(tmp_path):
    """from_pretrained sets its keyword overrides as attributes: the same check applies."""
    GrowMemConfig(**BASE).save_pretrained(tmp_path)
    loaded = GrowMemConfig.from_pretrained(tmp_path, memory={"rule": "titans"})
    assert loaded.memory.memory == DeepMemory("titans")
    with pytest.raises(ValueError, match="rule must be one of"):
        GrowMemConfig.from_pretrained(tmp_path, memory={"rule": "lstm"})


def test_top_k_does_not_reach_generation():
    """The ssc fan-out lives in memory.caching: transformers' sampling top_k never sees it."""
    config = GrowMemConfig(**BASE, memory={"caching": {"aggregation": "ssc", "top_k": 5}})
    assert "top_k" not in config.to_dict() and "ssc_top_k" not in config.to_dict()
    assert not hasattr(config, "top_k")
    model = GrowMemForCausalLM(config)
    assert model.generation_config.top_k == GenerationConfig().top_k  # transformers' default


def test_flat_arguments_convert_with_a_future_warning():
    flat = dict(rule="titans", aggregation="ssc", segment_size=8, ssc_top_k=3, mini_batch=4)
    with pytest.warns(FutureWarning, match=r"^GrowMemConfig: the flat memory settings"):
        config = GrowMemConfig(**BASE, **flat, chunk_size=16)  # chunk_size: not titans'
    assert config.memory == MemoryConfig(
        memory=DeepMemory("titans", mini_batch=4),
        caching=Caching("ssc", segment_size=8, top_k=3, gate_norm="none"),
        expansion=4,
        eta_max=0.1,
        gate_temperature=None,
        summary_source="keys",
    )  # the flat settings predate the gate settings: the gates they had
    with pytest.warns(FutureWarning, match=r"\['rule', 'segment_size'\] .*; pass memory=None$"):
        assert GrowMemConfig(**BASE, rule="attention", segment_size=8).memory is None
    with pytest.warns(FutureWarning, match=r"read config.memory.caching.top_k$"):
        assert config.ssc_top_k == 3
    with pytest.warns(FutureWarning, match=r"read config.memory.memory.rule$"):
        assert GrowMemConfig(**BASE, memory=None).rule == "attention"
    with pytest.warns(FutureWarning), pytest.raises(AttributeError, match="no setting"):
        GrowMemConfig(**BASE).mini_batch  # noqa: B018 -- a matrix memory has none


@pytest.mark.parametrize("name", ["gated_delta_ssc", "titans_grm_hybrid", "transformer"])
def test_a_model_folder_saved_with_the_flat_config_loads(name, tmp_path):
    """A folder whose config.json has the flat settings (as e872a2b wrote it) loads: the model
    it builds has the weights those models had (names and shapes, from their safetensors
    header), weights saved into the folder load with the same logits, and saved again the
    config is in the new form."""
    folder = tmp_path / "flat"
    shutil.copytree(FLAT_MODELS / name, folder)
    shapes = json.loads((folder / "weight_shapes.json").read_text())
    with pytest.warns(FutureWarning, match="flat memory settings"):
        config = GrowMemConfig.from_pretrained(folder)
    torch.manual_seed(0)
    original = GrowMemForCausalLM(config).eval()
    original.save_pretrained(tmp_path / "weights")
    with safe_open(tmp_path / "weights" / "model.safetensors", "pt") as saved:
        assert {k: list(saved.get_slice(k).get_shape()) for k in saved.keys()} == shapes  # noqa: SIM118
    shutil.copy(tmp_path / "weights" / "model.safetensors", folder)  # the flat config stays
    with pytest.warns(FutureWarning, match="flat memory settings"):
        model = GrowMemForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)
    flat = json.loads((folder / "config.json").read_text())
    assert "rule" in flat  # the folder really holds the flat form
    if flat["rule"] == "attention":
        assert model.config.memory is None
    else:
        memory = model.config.memory
        assert memory.rule == flat["rule"] and memory.caching.top_k == flat["ssc_top_k"]
        assert memory.caching.segment_size == flat["segment_size"]
    copy = tmp_path / "copy"
    model.save_pretrained(copy)
    saved = json.loads((copy / "config.json").read_text())
    assert "rule" not in saved and "ssc_top_k" not in saved
    assert GrowMemConfig.from_pretrained(copy).memory == model.config.memory  # no warning now


# config.json's memory as growmem wrote it before the gate settings existed (d0cee83^): no
# caching.gate_norm or detach_summaries, no gate_temperature, gate_online_bias, summary_source
# or o_norm_eps.
OLD_MEMORY = {
    "rule": "gated_delta",
    "chunk_size": 64,
    "caching": {
        "aggregation": "grm",
        "segment_size": 8,
        "segments": None,
        "top_k": 2,
        "init": "continuous",
        "summary": "mean",
        "gate_scale": None,
    },
    "use_short_conv": True,
    "conv_size": 4,
    "qk_norm": True,
}


@pytest.mark.parametrize("aggregation", ["grm", "ssc", "residual"])
def test_a_model_saved_before_the_gate_settings_keeps_its_gates(aggregation, tmp_path):
    """A config.json whose memory lacks gate_norm and gate_temperature meant the gates of then
    (the scaled dot product, no temperature): it loads with them, no temperature parameter, and
    the logits of a model built with them explicitly. An ungated aggregation has no gates, so
    it reads as today's config of the same model. A memory dict given now takes today's
    defaults."""
    old = {**OLD_MEMORY, "caching": {**OLD_MEMORY["caching"], "aggregation": aggregation}}
    legacy = {
        **old,
        "gate_temperature": None,
        "summary_source": "keys",
        "caching": {**old["caching"], "gate_norm": "none"},
    }
    explicit = MemoryConfig.from_dict(legacy)
    torch.manual_seed(0)
    reference = GrowMemForCausalLM(GrowMemConfig(**BASE, memory=explicit)).eval()
    reference.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "memory": old}))

    model = GrowMemForCausalLM.from_pretrained(tmp_path).eval()
    gated = aggregation != "residual"
    assert model.config.memory == (explicit if gated else MemoryConfig.from_dict(old))
    assert AutoConfig.from_pretrained(tmp_path).memory == model.config.memory
    assert model.state_dict().keys() == reference.state_dict().keys()  # no temperature
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "again")  # now with every gate setting written out
    assert GrowMemConfig.from_pretrained(tmp_path / "again").memory == model.config.memory

    today = GrowMemConfig(**BASE, memory=old).memory
    assert (today.caching.gate_norm, today.gate_temperature) == (
        DEFAULT_GATE_NORM,
        DEFAULT_GATE_TEMPERATURE,
    )
    assert GrowMemConfig.from_pretrained(tmp_path, memory=old).memory == today  # an override
    assert GrowMemConfig.from_dict({**BASE, "memory": legacy}).memory == explicit


def test_a_model_saved_now_keeps_the_default_gates(tmp_path):
    """Today's defaults (cosine gates, a learnable temperature from τ0) survive a save and
    load: config.json writes them out."""
    config = GrowMemConfig(**BASE, memory={"caching": {"aggregation": "ssc", "segment_size": 8}})
    memory = config.memory
    assert (memory.caching.gate_norm, memory.gate_temperature) == (
        DEFAULT_GATE_NORM,
        DEFAULT_GATE_TEMPERATURE,
    )
    torch.manual_seed(0)
    model = GrowMemForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["memory"]
    assert saved["caching"]["gate_norm"] == DEFAULT_GATE_NORM
    assert saved["gate_temperature"] == DEFAULT_GATE_TEMPERATURE
    loaded = GrowMemForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.memory == memory
    tau = loaded.model.layers[0].mixer.gate_log_temperature.exp()
    torch.testing.assert_close(tau, torch.full((2,), DEFAULT_GATE_TEMPERATURE))
    ids = torch.randint(0, 64, (1, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_decay_to_reaches_the_titans_layers():
    """The model config chooses what titans' decay forgets toward; the two choices compute
    different functions (the literal equation is kept for models trained with it)."""
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = {}
    for decay_to in ("init", "zero"):
        memory = memory_config("titans", aggregation="none", mini_batch=4, decay_to=decay_to)
        config = GrowMemConfig(**BASE, memory=memory)
        assert GrowMemConfig(**config.to_dict()).memory.memory.decay_to == decay_to
        torch.manual_seed(0)
        model = GrowMemForCausalLM(config).double()
        assert {layer.mixer.config for layer in model.model.layers} == {memory}
        logits[decay_to] = model(ids).logits
    assert not torch.allclose(logits["init"], logits["zero"])


def test_the_memory_object_is_passed_down_unchanged():
    memory = memory_config("gated_delta", aggregation="loglinear", segments="log", gate_scale=2.0)
    model = GrowMemForCausalLM(GrowMemConfig(**BASE, memory=memory, attn_layers=[0]))
    assert model.model.layers[1].mixer.config is model.config.memory
