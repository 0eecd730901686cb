"""generate() against plain decode loops, on models whose next token depends on the context.

The models are tiny (2 layers, width 16, float64) with a large init (std 0.7), so that what they
generate depends on the whole context, not only on the last token: every test asserts this first
(``assert_depends_on_context``), so that no test can pass because the model ignores its history
(the std 0.02 init repeats its last token whatever came before, and a generate that dropped the
cache after the prefill went unnoticed).

Each generation mode is compared with two loops written here, without generate: prefill then one
token at a time through forward with the cache, and full recomputation without a cache. Covered:
greedy, sampling with a fixed seed (also with num_return_sequences), beam search, left-padded
batches; for gated_delta, swla, titans, the Transformer++ baseline and a hybrid, with several
aggregations. Also: no deprecation warning from generate or forward.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers

from growmem.models import CACHE_FIELD, GrowMemForCausalLM
from tests.helpers import tiny_lm

VOCAB = 37
TOP_K = 8  # sampling: top-k filter of generate, reproduced by the loops below
# (rule, aggregation, extra config): the rule families, several aggregations, a hybrid
CASES = [
    ("gated_delta", "grm", {}),
    ("gated_delta", "loglinear", {}),
    ("swla", "ssc", {}),
    ("swla", "mean", {}),
    ("titans", "soup", {}),
    ("titans", "residual", {}),
    ("attention", "none", {}),
    ("attention", "none", {"attn_conv_size": 3}),
    ("gated_delta", "ssc", {"attn_layers": [1], "attn_window": 5, "attn_conv_size": 2}),
]
CASE_IDS = [
    f"{r}-{a}"
    + ("+attn" if "attn_layers" in e else "")
    + ("+conv" if "attn_conv_size" in e else "")
    for r, a, e in CASES
]


def make_model(rule: str, aggregation: str, **extra) -> GrowMemForCausalLM:
    """tests.helpers.tiny_lm (2 layers, width 16, segments of 4 tokens, init std 0.7,
    float64) with top-2 routing and pad id 0."""
    return tiny_lm(rule, aggregation, VOCAB, top_k=2, pad_token_id=0, **extra)


def prompts(B: int = 3, T: int = 9, seed: int = 0) -> torch.Tensor:
    """[B, T] ids in [1, VOCAB) whose rows end with the same two tokens: they differ only in
    their earlier context."""
    ids = torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
    ids[:, -2:] = torch.tensor([5, 6])
    return ids


def left_padded(lengths, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch (pad id 0) of prompts of these lengths, and its attention mask."""
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = prompts(1, n, seed=seed + i)[0]
        mask[i, T - n :] = 1
    return ids, mask


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """argmax of [B, V] logits, in fp32 as generate takes it."""
    return logits.float().argmax(-1)


def sample_pick(logits: torch.Tensor) -> torch.Tensor:
    """What generate(do_sample=True, top_k=TOP_K) draws from [B, V] logits: fp32 scores, all
    but the top TOP_K set to -inf, one multinomial draw per row."""
    scores = logits.float()
    kth = torch.topk(scores, TOP_K)[0][..., -1, None]
    probs = torch.softmax(scores.masked_fill(scores < kth, -float("inf")), dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)


@torch.no_grad()
def decode_with_cache(model, ids, mask, steps: int, pick) -> torch.Tensor:
    """Prefill, then one token at a time through forward with the cache and the growing
    [B, past + 1] mask; returns the [B, T + steps] sequences."""
    out = model(ids, attention_mask=mask, use_cache=True)
    for step in range(steps):
        token = pick(out.logits[:, -1])
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if step + 1 < steps:
            cache = getattr(out, CACHE_FIELD)
            out = model(token[:, None], attention_mask=mask, cache=cache, use_cache=True)
    return ids


@torch.no_grad()
def decode_recomputing(model, ids, mask, steps: int, pick) -> torch.Tensor:
    """Every step a full forward over the whole sequence, without a cache."""
    for _ in range(steps):
        token = pick(model(ids, attention_mask=mask, use_cache=False).logits[:, -1])
        ids = torch.cat([ids, token[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


def assert_depends_on_context(model) -> None:
    """Rows that differ only before their last two tokens continue differently (greedy)."""
    ids = prompts()
    out = decode_recomputing(model, ids, torch.ones_like(ids), 6, greedy_pick)[:, ids.shape[1] :]
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2]), out


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
def test_greedy_generate_equals_decode_loops(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    assert_depends_on_context(model)
    ids = prompts(T=7, seed=1)
    mask = torch.ones_like(ids)
    generated = model.generate(ids, max_new_tokens=10, do_sample=False)  # no mask given
    assert generated.shape == (3, 17)
    assert torch.equal(generated, decode_recomputing(model, ids, mask, 10, greedy_pick))
    assert torch.equal(generated, decode_with_cache(model, ids, mask, 10, greedy_pick))
    with_mask = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(with_mask, generated)


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES[::2], ids=CASE_IDS[::2])
def test_sampling_generate_equals_decode_loops(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    assert_depends_on_context(model)
    ids = prompts(T=6, seed=2)
    mask = torch.ones_like(ids)
    runs = []
    for run in (
        lambda: model.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=TOP_K
        ),
        lambda: decode_with_cache(model, ids, mask, 10, sample_pick),
        lambda: decode_recomputing(model, ids, mask, 10, sample_pick),
    ):
        torch.manual_seed(5)
        runs.append(run())
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES[1::2], ids=CASE_IDS[1::2])
def test_sampling_num_return_sequences_equals_decode_loop(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    assert_depends_on_context(model)
    ids, mask = left_padded([4, 7])
    torch.manual_seed(3)
    generated = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=True,
        top_k=TOP_K,
        num_return_sequences=3,
    )
    # generate repeats each prompt (rows a, a, a, b, b, b), then samples every row
    torch.manual_seed(3)
    expected = decode_with_cache(
        model, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), 8, sample_pick
    )
    assert generated.shape == (6, 15)
    assert torch.equal(generated, expected)
    assert not torch.equal(generated[0], generated[1])  # the seed draws different samples


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
def test_beam_search_with_cache_equals_without(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    assert_depends_on_context(model)
    ids, mask = left_padded([5, 8])
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=7,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with_cache = model.generate(ids, **kwargs)
    without = model.generate(ids, use_cache=False, **kwargs)
    assert with_cache.sequences.shape == (4, 15)
    assert torch.equal(with_cache.sequences, without.sequences)
    assert torch.allclose(with_cache.sequences_scores, without.sequences_scores, atol=1e-10)


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
def test_left_padded_batch_generates_each_prompt_alone(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    assert_depends_on_context(model)
    lengths = [4, 9, 6]
    ids, mask = left_padded(lengths, seed=4)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    assert torch.equal(batch, decode_with_cache(model, ids, mask, 7, greedy_pick))
    assert torch.equal(batch, decode_recomputing(model, ids, mask, 7, greedy_pick))
    for i, n in enumerate(lengths):
        alone = model.generate(ids[i : i + 1, -n:], max_new_tokens=7, do_sample=False)
        assert torch.equal(batch[i, ids.shape[1] :], alone[0, n:])


def test_generate_from_inputs_embeds_continues_like_from_ids():
    model = make_model("titans", "ssc", attn_layers=[0])
    assert_depends_on_context(model)
    ids = prompts(T=6, seed=6)
    from_ids = model.generate(ids, max_new_tokens=6, do_sample=False)
    embeds = model.get_input_embeddings()(ids).detach()
    # with inputs_embeds generate returns the new tokens only
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=6), from_ids[:, 6:])


def test_generate_and_forward_emit_no_warning():
    """No deprecation (or other) warning, neither a Python warning nor a transformers log
    record (transformers logs through its own logger, which does not propagate to the root)."""
    model = make_model("gated_delta", "grm", attn_layers=[1])
    ids, mask = left_padded([4, 6])
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    transformers.utils.logging.warning_once.cache_clear()  # once-only warnings count again
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2)
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=4)
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=4, return_dict_in_generate=True
            )
            step = model(ids, attention_mask=mask, use_cache=True)
            cache = getattr(step, CACHE_FIELD)
            model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=cache)
            model(ids[:, :1], past_key_values=cache)  # the older name
    finally:
        logger.removeHandler(handler)
    assert getattr(out, CACHE_FIELD).get_seq_length() == 9
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []
