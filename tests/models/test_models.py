"""Tests of the Hugging Face models: GrowMemConfig, GrowMemModel, GrowMemForCausalLM.

Tiny models (2 layers, width 32) in float64 unless stated: for every rule (the Transformer++
baseline and a hybrid included) and every aggregation, a full forward equals prefill +
token-by-token decoding; generate() with a cache equals generate() without one (greedy,
sampling and beam search); a left-padded batch generates what each prompt generates alone;
padding never changes real tokens' logits; save/load round trips; the Auto classes; the loss;
the init; bad input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from growmem.models import CACHE_FIELD, GrowMemCache, GrowMemConfig, GrowMemForCausalLM, GrowMemModel
from growmem.ops.caching import AGGREGATIONS
from growmem.ops.checks import LINEAR_RULES
from growmem.ops.deep import DEEP_RULES
from tests.helpers import rel_err

VOCAB = 61
# (rule, extra config): every memory rule, the Transformer++ baseline, a windowed hybrid
MODELS = [(r, {}) for r in (*LINEAR_RULES, *DEEP_RULES)] + [
    ("attention", {}),
    ("gated_delta", {"attn_layers": [1], "attn_window": 6}),
]
MODEL_IDS = [r + ("+attn" if extra else "") for r, extra in MODELS]


def make_model(rule="gated_delta", aggregation="grm", dtype=torch.float64, seed=0, **extra):
    config = GrowMemConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        rule=rule,
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
def test_greedy_generate_with_cache_equals_without(rule, extra):
    model, ids = make_model(rule, "ssc", **extra), token_ids(T=9)
    with_cache = model.generate(ids, max_new_tokens=12, do_sample=False)
    without = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 21)
    assert torch.equal(with_cache, without)


def test_sampling_with_cache_equals_without():
    model, ids = make_model("gated_delta", "grm"), token_ids(T=6)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        runs.append(
            model.generate(ids, max_new_tokens=10, do_sample=True, top_k=20, use_cache=use_cache)
        )
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("rule", "extra"), [("gated_delta", {}), ("titans", {}), ("attention", {})]
)
def test_beam_search_with_cache_equals_without(rule, extra):
    model, ids = make_model(rule, "ssc", **extra), token_ids(T=7)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(
        model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs)
    )


def left_padded(prompts):
    """A left-padded batch (pad id 0) and its attention mask."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
    return ids, mask


@pytest.mark.parametrize(
    ("rule", "aggregation", "extra"),
    [
        ("gated_delta", "grm", {}),
        ("swla", "ssc", {}),
        ("titans", "soup", {}),
        ("attention", "none", {"attn_window": 5}),
        ("gated_delta", "ssc", {"attn_layers": [0]}),
    ],
)
def test_left_padded_batch_generates_each_prompt_alone(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    prompts = [token_ids(1, n, seed=n)[0] for n in (5, 13, 9)]
    ids, mask = left_padded(prompts)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10, do_sample=False)
        assert torch.equal(batch[i, ids.shape[1] :], alone[0, len(p) :])


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


def test_top_k_is_stored_apart_from_sampling_settings():
    config = GrowMemConfig(top_k=3)
    assert config.ssc_top_k == 3 and not hasattr(config, "top_k")
    assert GrowMemConfig(**config.to_dict()).ssc_top_k == 3


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
        ({"rule": "lstm"}, "rule"),
        ({"attn_layers": [2]}, "attn_layers"),
        ({"attn_layers": [-1]}, "attn_layers"),
        ({"aggregation": "max"}, "aggregation"),
        ({"aggregation": "loglinear", "init": "independent"}, "^aggregation 'loglinear'"),
        ({"hidden_size": 30, "num_heads": 4}, "divisible"),
        ({"attn_window": 0}, "attn_window"),
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
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_model(max_position_embeddings=5)(ids)
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])
