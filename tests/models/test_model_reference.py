"""GrowMemForCausalLM against a plain float64 re-implementation from its config and weights.

tests/reference.py runs embedding -> blocks (x + mixer(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)))
-> final RMSNorm -> lm_head (tied or not) with the memory layer's reference and a per-query
RoPE softmax attention. Compared at 1e-10: the logits of memory models, of the Transformer++
and of hybrids (attention layers, a sliding window), unpadded and padded (real tokens equal
the row's reference, padding logits are 0), the loss with labels (shifted cross-entropy,
-100 ignored), and decoding without generate: a left-padded prefill, then pieces of 1-3
tokens with the growing [B, past + T] mask. Every 1-D parameter (norm weights, gate biases,
decay rates, conv biases) is drawn at random, and the init std is large (0.5), so the model
depends on the whole context.
"""

from __future__ import annotations

import pytest
import torch

from growmem.models import CACHE_FIELD, GrowMemForCausalLM
from tests.helpers import growmem_config, rel_err
from tests.reference import causal_lm_reference, shifted_cross_entropy

VOCAB, T = 23, 19
TOL = 1e-10
# (rule, aggregation, config overrides): memory models of both families, the Transformer++,
# hybrids; tied and untied heads; non-default memory options that the config must pass on
CASES = [
    ("gated_delta", "grm", {}),
    ("swla", "loglinear", dict(head_dim=5, summary="sum", conv_size=2)),
    (
        "titans",
        "ssc",
        dict(
            tie_word_embeddings=False,
            init="independent",
            decay_to="zero",
            max_grad_norm=0.8,
            top_k=1,
            gate_scale=0.7,
        ),
    ),
    ("dla", "mean", dict(tie_word_embeddings=False, norm=False, use_short_conv=False)),
    ("attention", "none", {}),
    ("attention", "none", dict(tie_word_embeddings=False, attn_window=4, rope_theta=30.0)),
    ("attention", "none", dict(attn_conv_size=3)),
    ("delta", "soup", dict(num_hidden_layers=3, attn_layers=[0, 2], attn_window=3)),
    ("decay", "residual", dict(attn_layers=[1], qk_norm=False, tie_word_embeddings=False)),
]
CASE_IDS = [
    f"{r}-{a}" + ("-untied" if e.get("tie_word_embeddings") is False else "")
    + ("-hybrid" if e.get("attn_layers") else "")
    + ("-window" if e.get("attn_window") else "")
    + ("-conv" if e.get("attn_conv_size") else "")
    for r, a, e in CASES
]  # fmt: skip


def make_model(rule: str, aggregation: str, **overrides) -> GrowMemForCausalLM:
    """2 layers, width 12, 2 heads of 6, segments of 4, mini-batches of 3, float64, every 1-D
    parameter random (norm weights around 1, dt_bias around -1, the rest around 0)."""
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=12,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=6,
        intermediate_size=20,
        aggregation=aggregation,
        segment_size=4,
        chunk_size=4,
        mini_batch=3,
        eta_max=0.5,
        conv_size=3,
        norm_eps=1e-5,
        rope_theta=500.0,
        initializer_range=0.5,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    config = growmem_config(rule, **{**settings, **overrides})
    model = GrowMemForCausalLM(config).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                mean = 1.0 if "norm" in name else -1.0 if name.endswith("dt_bias") else 0.0
                p.copy_(mean + 0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def reference(model: GrowMemForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return causal_lm_reference(model.state_dict(), model.config, ids)


def random_ids(B: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
@torch.no_grad()
def test_logits_and_loss_equal_reference(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    ids = random_ids(3, T, seed=2)
    ref = reference(model, ids)
    assert torch.isfinite(ref).all()
    labels = ids.clone()
    labels[0, 3] = labels[1, :5] = labels[2, -1] = -100
    out = model(ids, labels=labels)
    assert rel_err(out.logits, ref) < TOL
    assert rel_err(out.loss, shifted_cross_entropy(ref, labels)) < TOL
    assert rel_err(ref[0, -1], ref[1, -1]) > 1e-2  # the rows' contexts differ, and show

    # padding: left, right and in the middle; row r's real tokens are the first n of ids[r]
    mask = torch.ones_like(ids)
    mask[0, :6] = mask[1, 12:] = mask[2, 2:5] = 0
    real = mask.bool()
    padded = torch.full_like(ids, 7)
    for r in range(3):
        padded[r, real[r]] = ids[r, : int(real[r].sum())]
    logits = model(padded, attention_mask=mask).logits
    for r in range(3):
        assert rel_err(logits[r, real[r]], ref[r, : int(real[r].sum())]) < TOL
    assert torch.all(logits[~real] == 0)


@pytest.mark.parametrize(("rule", "aggregation", "extra"), CASES, ids=CASE_IDS)
@torch.no_grad()
def test_left_padded_prefill_then_decoding_equals_reference(rule, aggregation, extra):
    """Without generate: a left-padded prefill (rows of 9, 4 and 6 real tokens), then pieces
    of 1-3 tokens through forward with the cache and the whole mask so far [B, past + T]."""
    model = make_model(rule, aggregation, **extra)
    lengths, pieces = [9, 4, 6], [1, 2, 1, 3]
    ids, new = random_ids(3, 9, seed=3), random_ids(3, sum(pieces), seed=4)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, 9 - n :] = 1
    out = model(ids * mask, attention_mask=mask, use_cache=True)
    logits = [out.logits]
    start = 0
    for n in pieces:
        mask = torch.cat([mask, torch.ones_like(new[:, :n])], 1)
        cache = getattr(out, CACHE_FIELD)
        out = model(new[:, start : start + n], attention_mask=mask, cache=cache, use_cache=True)
        logits.append(out.logits)
        start += n
    logits = torch.cat(logits, 1)
    sequences = torch.cat([ids, new], 1)
    for r in range(3):
        real = mask[r].bool()
        expected = reference(model, sequences[r : r + 1, real])[0]
        assert rel_err(logits[r, real], expected) < TOL
        assert torch.all(logits[r, ~real] == 0)


def decode(model, cache, mask, tokens, pieces):
    """Feed ``tokens`` [B, n] in ``pieces`` after ``cache`` (whose slots have ``mask``), with
    the whole mask so far; returns (logits [B, n, V], the cache, the mask)."""
    logits, start = [], 0
    for n in pieces:
        mask = torch.cat([mask, torch.ones_like(tokens[:, :n])], 1)
        out = model(tokens[:, start : start + n], attention_mask=mask, cache=cache, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        logits.append(out.logits)
        start += n
    return torch.cat(logits, 1), cache, mask


# a matrix memory, a deep one (its open mini-batch is part of the cache), windowed attention
# (its cache drops slots) and a hybrid of both
REORDER = [0, 2, 5, 6]


@pytest.mark.parametrize(
    ("rule", "aggregation", "extra"),
    [CASES[i] for i in REORDER],
    ids=[CASE_IDS[i] for i in REORDER],
)
@torch.no_grad()
def test_cache_reordered_while_decoding_equals_reference(rule, aggregation, extra):
    """GrowMemCache.reorder_cache / batch_select_indices / batch_repeat_interleave between
    decoding steps, as beam search does: after a left-padded prefill and 2 decoded tokens, the
    rows of the reordered batch continue with tokens of their own (rows copied from one row
    get different tokens, so a copy that shared state with another would show) and their
    logits equal the reference of their whole sequences."""
    model = make_model(rule, aggregation, **extra)
    ids, before = random_ids(3, 9, seed=5), random_ids(3, 2, seed=6)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # rows 0 and 1 stream as one row group, row 2 on its own
    operations = [
        ("reorder_cache", torch.tensor([2, 0, 2, 1]), [2, 0, 2, 1]),
        ("batch_select_indices", torch.tensor([2, 0]), [2, 0]),
        ("batch_repeat_interleave", 2, [0, 0, 1, 1, 2, 2]),
    ]
    for method, argument, rows in operations:
        cache = getattr(model(ids * mask, attention_mask=mask, use_cache=True), CACHE_FIELD)
        _, cache, seen = decode(model, cache, mask, before, [1, 1])
        getattr(cache, method)(argument)
        assert cache.batch_size == len(rows) and cache.get_seq_length() == 11
        after = random_ids(len(rows), 3, seed=7)
        logits, _, _ = decode(model, cache, seen[rows], after, [1, 2])
        for r in set(rows):  # the copies of row r have equal lengths: one reference call
            copies = [i for i, source in enumerate(rows) if source == r]
            context = torch.cat([ids[r, mask[r].bool()], before[r]])
            sequences = torch.cat([context.expand(len(copies), -1), after[copies]], 1)
            expected = reference(model, sequences)[:, -3:]
            assert rel_err(logits[copies], expected) < TOL, (method, r)
