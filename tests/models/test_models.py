"""Tests of the Hugging Face models: GrowMemConfig, GrowMemModel, GrowMemForCausalLM.

Tiny models (2 layers, width 32) in float64 unless stated: for every rule (the Transformer++
baseline and a hybrid included) and every aggregation, a full forward equals prefill +
token-by-token decoding; padding never changes real tokens' logits; save/load round trips; the
Auto classes; the loss; the init; the keyword arguments forward accepts; bad input.
generate() is tested in test_generation.py, the cache in test_cache.py, the Trainer in
test_trainer.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from growmem.models import (
    CACHE_FIELD,
    GrowMemCache,
    GrowMemConfig,
    GrowMemForCausalLM,
    GrowMemModel,
)
from growmem.ops.caching import AGGREGATIONS
from growmem.ops.checks import LINEAR_RULES
from growmem.ops.deep import DEEP_RULES
from tests.helpers import growmem_config, rel_err

VOCAB = 61
# (rule, extra config): every memory rule, the Transformer++ baseline, a windowed hybrid
MODELS = [(r, {}) for r in (*LINEAR_RULES, *DEEP_RULES)] + [
    ("attention", {}),
    ("attention", {"attn_conv_size": 3}),
    ("gated_delta", {"attn_layers": [1], "attn_window": 6}),
]
MODEL_IDS = [
    r + ("+conv" if "attn_conv_size" in extra else "+attn" if extra else "") for r, extra in MODELS
]


def make_model(rule="gated_delta", aggregation="grm", dtype=torch.float64, seed=0, **extra):
    config = growmem_config(
        rule,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        aggregation=aggregation,
        segment_size=8,
        top_k=2,
        mini_batch=4,
        chunk_size=8,
        pad_token_id=0,
        **extra,
    )
    torch.manual_seed(seed)
    return GrowMemForCausalLM(config).to(dtype).eval()


def token_ids(B=2, T=21, seed=1):
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def decode_logits(model, ids, prefill):
    """Logits of a prefill of ``prefill`` tokens, then one token at a time."""
    out = model(ids[:, :prefill], use_cache=True)
    logits, cache = [out.logits], getattr(out, CACHE_FIELD)
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
        cache = getattr(out, CACHE_FIELD)
    return torch.cat(logits, 1), cache


# every memory model with every aggregation; attention has no memory to aggregate
DECODE_CASES = [
    (rule, extra, aggregation)
    for rule, extra in MODELS
    for aggregation in (("none",) if rule == "attention" else AGGREGATIONS)
]


@pytest.mark.parametrize(
    ("rule", "extra", "aggregation"),
    DECODE_CASES,
    ids=[f"{r}{'+attn' if e else ''}-{a}" for r, e, a in DECODE_CASES],
)
def test_decoding_equals_full_forward_float64(rule, extra, aggregation):
    model, ids = make_model(rule, aggregation, **extra), token_ids()
    full = model(ids).logits
    decoded, cache = decode_logits(model, ids, prefill=11)
    assert rel_err(decoded, full) < 1e-10
    assert isinstance(cache, GrowMemCache) and cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize(("rule", "extra"), MODELS, ids=MODEL_IDS)
def test_decoding_equals_full_forward_float32(rule, extra):
    model, ids = make_model(rule, "ssc", dtype=torch.float32, **extra), token_ids()
    assert rel_err(decode_logits(model, ids, prefill=5)[0], model(ids).logits) < 1e-5


@pytest.mark.parametrize(("rule", "extra"), MODELS, ids=MODEL_IDS)
def test_padding_does_not_change_real_logits(rule, extra):
    model, ids = make_model(rule, "grm", **extra), token_ids(B=3, T=17)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    mask[1, 12:] = 0  # right padding
    logits = model(ids, attention_mask=mask).logits
    for b in range(3):
        real = mask[b].bool()
        alone = model(ids[b : b + 1, real]).logits[0]
        assert rel_err(logits[b, real], alone) < 1e-10


@pytest.mark.parametrize(("rule", "extra"), MODELS[-3:], ids=MODEL_IDS[-3:])
def test_save_load_round_trip(tmp_path, rule, extra):
    model, ids = make_model(rule, "ssc", **extra), token_ids()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert isinstance(loaded, GrowMemForCausalLM)
    saved, original = loaded.config.to_dict(), model.config.to_dict()
    saved.pop("_name_or_path"), original.pop("_name_or_path")
    assert saved == original
    original_state = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original_state[name]), name
    # identical weights; SDPA may pick another blocking for other memory addresses
    assert rel_err(loaded(ids).logits, model(ids).logits) < 1e-14
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied


def test_auto_classes_from_config():
    config = AutoConfig.for_model("growmem", vocab_size=VOCAB, hidden_size=32, num_heads=2)
    assert isinstance(config, GrowMemConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), GrowMemForCausalLM)
    assert isinstance(AutoModel.from_config(config), GrowMemModel)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model, ids = make_model(), token_ids()
    labels = ids.clone()
    labels[:, :7] = -100
    out = model(ids, labels=labels)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert rel_err(out.loss, expected) < 1e-12
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_loss_with_num_items_in_batch_is_the_sum_over_that_count():
    """The Trainer's contract under gradient accumulation: sum of the batch's losses divided by
    the number of targets of the whole step (here 3 times this batch's)."""
    model, ids = make_model(), token_ids()
    labels = ids.clone()
    labels[0, :7] = -100
    items = int((labels[:, 1:] != -100).sum())
    mean = model(ids, labels=labels).loss
    for count in (3 * items, torch.tensor(3 * items), torch.tensor(3.0 * items)):
        assert rel_err(model(ids, labels=labels, num_items_in_batch=count).loss, mean / 3) < 1e-14


def test_init_scales_the_residual_output_projections():
    model = make_model(dtype=torch.float32)
    for block in model.model.layers:
        assert block.mixer.o_proj.weight.std() < 0.02 / 1.5  # 0.02 / sqrt(2 · 2) = 0.01
        assert 0.015 < block.mlp.gate_proj.weight.std() < 0.025
    assert torch.all(
        model.model.layers[0].mixer.A_log.exp().clamp(1, 16)
        == model.model.layers[0].mixer.A_log.exp()
    )
    other = make_model(dtype=torch.float32, seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)


def test_cache_bytes_equal_the_layers_state_sizes():
    model, ids = make_model("gated_delta", "ssc", attn_layers=[1]), token_ids(B=1, T=19)
    cache = getattr(model(ids, use_cache=True), CACHE_FIELD)
    expected = sum(block.mixer.state_size(19, dtype=torch.float64) for block in model.model.layers)
    assert cache.nbytes() == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory": {"rule": "lstm"}}, "rule"),
        ({"attn_layers": [2]}, "attn_layers"),
        ({"attn_layers": [-1]}, "attn_layers"),
        ({"memory": {"caching": {"aggregation": "max"}}}, "aggregation"),
        (
            {"memory": {"caching": {"aggregation": "loglinear", "init": "independent"}}},
            "^aggregation 'loglinear'",
        ),
        ({"hidden_size": 30, "num_heads": 4}, "divisible"),
        ({"attn_window": 0}, "attn_window"),
        ({"attn_conv_size": 0}, "^attn_conv_size"),
    ],
)
def test_bad_config(kwargs, match):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2)
    with pytest.raises(ValueError, match=match):
        GrowMemConfig(**{**base, **kwargs})


def test_bad_forward_inputs():
    model, ids = make_model(), token_ids(T=6)
    with pytest.raises(ValueError, match="vocab_size"):
        model(ids + VOCAB)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 6, 1))
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids, past_key_values=(torch.zeros(1),))
    with pytest.raises(ValueError, match=r"^cache .*GrowMemCache"):
        model(ids, cache=(torch.zeros(1),))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_model(max_position_embeddings=5)(ids)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.complex64, torch.float32, torch.float16], ids=str
)
def test_input_ids_of_a_non_integer_dtype(dtype):
    model, ids = make_model(), token_ids(T=6)
    with pytest.raises(ValueError, match=f"input_ids must hold integer ids, got dtype {dtype}"):
        model(ids.to(dtype))


@pytest.mark.parametrize("model_class", [GrowMemForCausalLM, GrowMemModel])
def test_empty_batch_or_sequence_is_a_named_error(model_class):
    model = make_model()
    model = model if model_class is GrowMemForCausalLM else model.model
    for shape in ((0, 5), (2, 0)):
        with pytest.raises(ValueError, match=r"input_ids must have shape \[B >= 1, T >= 1\]"):
            model(torch.zeros(shape, dtype=torch.long))
        with pytest.raises(ValueError, match=r"inputs_embeds must have shape \[B >= 1, T >= 1"):
            model(inputs_embeds=torch.zeros(*shape, 32, dtype=torch.float64))


def test_inputs_embeds_of_the_wrong_width_or_dtype():
    model, ids = make_model(), token_ids(T=6)
    embeds = model.model.embed_tokens(ids)  # [2, 6, 32]
    assert rel_err(model(inputs_embeds=embeds).logits, model(ids).logits) == 0
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape .*hidden_size=32"):
        model(inputs_embeds=embeds[..., :31])
    with pytest.raises(ValueError, match="inputs_embeds must be a floating-point tensor"):
        model(inputs_embeds=ids[..., None].expand(2, 6, 32))
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \[B, T, hidden_size\]"):
        model(inputs_embeds=embeds[0])


@pytest.mark.parametrize("model_class", [GrowMemForCausalLM, GrowMemModel])
def test_forward_rejects_unknown_keyword_arguments(model_class):
    """No **kwargs: a misspelt or unsupported argument is a TypeError naming it, not ignored."""
    model = make_model()
    model = model if model_class is GrowMemForCausalLM else model.model
    ids = token_ids(T=6)
    for name in ("attn_mask", "position_ids", "cache_params"):
        with pytest.raises(TypeError, match=name):
            model(ids, **{name: None})
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids, output_attentions=True)


def test_cache_and_past_key_values_are_one_argument():
    model, ids = make_model(), token_ids(T=6)

    def prefill():
        return getattr(model(ids[:, :4], use_cache=True), CACHE_FIELD)

    cache = prefill()
    with pytest.raises(ValueError, match="not both"):
        model(ids[:, 4:], cache=cache, past_key_values=cache)
    via_alias = model(ids[:, 4:], past_key_values=prefill(), use_cache=True)
    via_cache = model(ids[:, 4:], cache=cache, use_cache=True)
    assert torch.equal(via_alias.logits, via_cache.logits)
    assert getattr(via_alias, CACHE_FIELD).get_seq_length() == 6


def test_return_dict_false_returns_the_fields_as_a_tuple():
    model, ids = make_model(), token_ids(T=6)
    out = model(ids, labels=ids, use_cache=True)
    loss, logits, cache = model(ids, labels=ids, use_cache=True, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert isinstance(cache, GrowMemCache)
    hidden, cache = model.model(ids, use_cache=True, return_dict=False)
    assert torch.equal(hidden, model.model(ids).last_hidden_state)
