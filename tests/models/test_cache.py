"""GrowMemCache: its transformers interface, batch reordering against a prefill of the reordered
batch, the fingerprint that keeps a cache in the model it was built for, and decoding a
left-padded batch through GrowMemModel without generate.

Tiny float64 models (2 layers, width 16, segments of 4 tokens, init std 0.7 so that outputs
depend on the context).
"""

from __future__ import annotations

import pytest
import torch

from growmem.models import CACHE_FIELD, GrowMemCache, GrowMemConfig, GrowMemForCausalLM
from tests.helpers import growmem_config, rel_err

VOCAB = 29
# a row-group memory model (padded rows stream apart), the Transformer++ and a hybrid
CASES = [
    ("gated_delta", "ssc", {}),
    ("titans", "grm", {}),
    ("attention", "none", {}),
    ("swla", "soup", {"attn_layers": [0], "attn_window": 3}),
]
CASE_IDS = [f"{r}-{a}{'+attn' if e else ''}" for r, a, e in CASES]


def config(rule="gated_delta", **overrides) -> GrowMemConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_heads=2,
        segment_size=4,
        mini_batch=4,
        chunk_size=4,
        initializer_range=0.7,
    )
    return growmem_config(rule, **{**settings, **overrides})


def make_model(rule="gated_delta", aggregation="grm", **overrides) -> GrowMemForCausalLM:
    torch.manual_seed(0)
    model = GrowMemForCausalLM(config(rule=rule, aggregation=aggregation, **overrides))
    return model.double().eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [3, 9] left-padded to lengths 9, 4, 6 (rows at different positions), their mask,
    and 3 next tokens per row [3, 3]."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[2, :3] = 0
    return ids * mask, mask, torch.randint(1, VOCAB, (3, 3), generator=gen)


@torch.no_grad()
def continue_logits(model, cache, mask, tokens) -> torch.Tensor:
    """Feed ``tokens`` [B, n] one at a time after ``cache`` (whose rows have ``mask``);
    returns the logits [B, n, V]."""
    logits = []
    for t in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(tokens[:, t : t + 1], attention_mask=mask, cache=cache, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        logits.append(out.logits)
    return torch.cat(logits, 1)


@torch.no_grad()
def prefill(model, ids, mask) -> GrowMemCache:
    return getattr(model(ids, attention_mask=mask, use_cache=True), CACHE_FIELD)


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
def test_batch_reordering_equals_a_prefill_of_the_reordered_batch(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    ids, mask, tokens = padded_batch()
    operations = [
        ("reorder_cache", torch.tensor([2, 0, 2, 1]), torch.tensor([2, 0, 2, 1])),
        ("batch_select_indices", torch.tensor([1]), torch.tensor([1])),
        ("batch_select_indices", torch.tensor([2, 0]), torch.tensor([2, 0])),
        ("batch_repeat_interleave", 2, torch.tensor([0, 0, 1, 1, 2, 2])),
    ]
    for method, argument, rows in operations:
        cache = prefill(model, ids, mask)
        getattr(cache, method)(argument)
        assert cache.batch_size == len(rows) and cache.get_seq_length() == 9
        reordered = continue_logits(model, cache, mask[rows], tokens[rows])
        expected = continue_logits(
            model, prefill(model, ids[rows], mask[rows]), mask[rows], tokens[rows]
        )
        assert rel_err(reordered, expected) < 1e-12, method
    # the rows differ, so a wrong row order could not pass
    assert rel_err(expected[0], expected[2]) > 1e-3


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
def test_left_padded_prefill_then_one_token_at_a_time_equals_each_row_alone(
    rule, aggregation, extra
):
    """GrowMemModel without generate: prefill a left-padded batch, then one token at a time with
    the growing [B, past + 1] mask; every row's hidden states equal its own unpadded forward."""
    model = make_model(rule, aggregation, **extra).model
    ids, mask, tokens = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        hidden, cache, full_mask = [out.last_hidden_state], getattr(out, CACHE_FIELD), mask
        for t in range(tokens.shape[1]):
            full_mask = torch.cat([full_mask, torch.ones_like(mask[:, :1])], 1)
            out = model(tokens[:, t : t + 1], attention_mask=full_mask, cache=cache)
            hidden.append(out.last_hidden_state)
            cache = getattr(out, CACHE_FIELD)
        hidden = torch.cat(hidden, 1)
        sequences = torch.cat([ids, tokens], 1)
        for b in range(3):
            real = full_mask[b].bool()
            alone = model(sequences[b : b + 1, real]).last_hidden_state[0]
            assert rel_err(hidden[b, real], alone) < 1e-12
            assert torch.all(hidden[b, ~real] == 0)  # padding outputs are 0


def test_interface_generate_reads():
    model = make_model()
    cache = GrowMemCache(2)
    assert len(cache) == 2 and cache.batch_size == 0 and cache.get_seq_length() == 0
    assert not cache.is_initialized and not cache.is_croppable and not cache.is_compileable
    assert cache.get_max_length() == -1 and cache.nbytes() == 0
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
    assert getattr(out, CACHE_FIELD) is cache  # a user's empty cache is filled in place
    assert cache.is_initialized and cache.batch_size == 3 and cache.get_seq_length() == 9
    assert cache.dtype == torch.float64 and cache.nbytes() > 0
    cache.crop(0)  # transformers' no-op
    assert cache.get_seq_length() == 9
    with pytest.raises(NotImplementedError, match="cannot forget"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="tokens_to_remove must be 0 or negative"):
        cache.crop(3)
    with pytest.raises(TypeError, match="tokens_to_remove must be an int"):
        cache.crop(1.0)
    assert cache.get_seq_length() == 9
    cache.reset()
    assert not cache.is_initialized and cache.batch_size == 0 and cache.nbytes() == 0


def test_generate_continues_a_cache_the_user_passes():
    model = make_model()
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    cache = GrowMemCache(2)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **{CACHE_FIELD: cache})
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == 11  # the last token is generated, never fed


def test_a_cache_only_continues_the_model_it_was_built_for(tmp_path):
    ids, mask, tokens = padded_batch()
    two_layers = make_model()
    cache = prefill(two_layers, ids, mask)
    for layers in (1, 3):
        with pytest.raises(ValueError, match=f"cache holds 2 layers, the model has {layers}"):
            make_model(num_hidden_layers=layers)(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match=r"configuration: memory.rule='gated_delta' \(model"):
        make_model(rule="swla")(tokens[:, :1], cache=cache)
    with pytest.raises(ValueError, match=r"memory.caching.segment_size=4 \(model: 8\)"):
        make_model(segment_size=8)(tokens[:, :1], cache=cache)
    # a copy of the model, saved and loaded, continues it (with another init scale)
    two_layers.save_pretrained(tmp_path)
    loaded = GrowMemForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    loaded.config.initializer_range = 0.02  # does not shape the state
    expected = continue_logits(two_layers, prefill(two_layers, ids, mask), mask, tokens)
    assert rel_err(continue_logits(loaded, cache, mask, tokens), expected) < 1e-12


def test_a_cache_refuses_hidden_states_of_another_dtype():
    ids, mask, tokens = padded_batch()
    model = make_model().float()
    cache = prefill(model, ids, mask)
    assert cache.dtype == torch.float32
    model.double()  # converted in the middle of a sequence
    with pytest.raises(ValueError, match=r"cache was built with torch.float32 hidden states, got"):
        model(tokens[:, :1], cache=cache)
    assert cache.get_seq_length() == 9  # untouched
