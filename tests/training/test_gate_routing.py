"""Gate diagnostics: ``record_gates`` captures the weights Memory Caching uses (checked against
the gate equation written out here), ``mqar_gate_routing`` scores known weights exactly, and
``niah_gate_routing`` asks for the needle's copy of each answer token."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from growmem.evaluate import (
    _copy_sources,
    _gate_stats,
    _pair_segments,
    mqar_gate_routing,
    niah_gate_routing,
)
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.ops.caching import memory_caching
from growmem.ops.caching.gates import GateRecord, record_gates
from growmem.ops.spec import Caching, MatrixMemory
from growmem.tasks import ByteTokenizer, MQARConfig, mqar_splits, niah_dataset

from ..helpers import make_inputs, make_u


def expected_gamma(u, k, S, scale):
    """γ [B, H, T, N + 1] of grm written out per token: softmax over the visible caches'
    logits scale·<u_t, mean of segment i's keys> and the online one (the causal mean of the
    open segment's keys); hidden caches get weight 0."""
    B, T, H, _ = u.shape
    N = (T - 1) // S
    gamma = torch.zeros(B, H, T, N + 1, dtype=u.dtype)
    for t in range(T):
        s = t // S
        summaries = [k[:, i * S : (i + 1) * S].mean(1) for i in range(s)]  # [B, H, D] each
        summaries.append(k[:, s * S : t + 1].mean(1))
        logits = torch.stack([(u[:, t] * c).sum(-1) * scale for c in summaries], -1)
        weights = torch.softmax(logits, -1)  # [B, H, s + 1]
        gamma[:, :, t, :s] = weights[..., :-1]
        gamma[:, :, t, -1] = weights[..., -1]
    return gamma


def test_recorded_grm_weights_follow_the_gate_equation():
    B, T, H, D, S, scale = 2, 13, 3, 5, 4, 0.7
    q, k, v, gates, _ = make_inputs("gated_delta", B, T, H, D, D)
    u = make_u(B, T, H, D)
    caching = Caching("grm", segment_size=S, gate_scale=scale, gate_norm="none")
    with record_gates() as records:
        memory_caching(q, k, v, u, memory=MatrixMemory("gated_delta"), caching=caching, gates=gates)
    assert len(records) == 1
    record = records[0]
    assert record.idx is None and record.num_caches == (T - 1) // S
    expected = expected_gamma(u, k, S, scale)
    N = record.num_caches
    got = torch.cat([record.gamma[..., :N], record.gamma[..., -1:]], -1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # outside the block nothing more is recorded
    memory_caching(q, k, v, u, memory=MatrixMemory("gated_delta"), caching=caching, gates=gates)
    assert len(records) == 1


def test_recorded_ssc_candidates_are_the_top_k_caches():
    B, T, H, D, S = 1, 17, 2, 4, 4
    q, k, v, gates, _ = make_inputs("gated_delta", B, T, H, D, D, seed=3)
    u = make_u(B, T, H, D, seed=3)
    caching = Caching("ssc", segment_size=S, top_k=2, gate_scale=1.0, gate_norm="none")
    with record_gates() as records:
        memory_caching(q, k, v, u, memory=MatrixMemory("gated_delta"), caching=caching, gates=gates)
    (record,) = records
    full = expected_gamma(u, k, S, 1.0)  # the same logits, before selection
    t = T - 1  # sees all 4 caches
    logits = full[0, :, t, :-1].log()
    top = logits.topk(2, -1).indices.sort(-1).values
    assert torch.equal(record.idx[0, :, t].sort(-1).values, top)


def test_gate_stats_of_known_weights():
    # segments of 1 token: token t sees caches 0 .. t-1 (token 0 none); 2 caches at most
    gamma = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25]]
    gamma = torch.tensor(gamma, dtype=torch.float64)[None, None]  # [1, 1, T, N + 1]
    rec = GateRecord(gamma, None, None, torch.tensor([0, 1, 2]), 2)
    # queries at token 1 (pair in segment 0) and token 2 (pair in segment 1)
    stats = _gate_stats(rec, 1, torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([0, 1]))
    h1 = 0.0  # token 1: all weight on cache 0
    h2 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert stats["tokens"] == 2
    assert stats["entropy"] == pytest.approx(h1 + h2)
    assert stats["online_weight"] == pytest.approx(0.0 + 0.25)
    assert stats["queries"] == 2
    assert stats["right_weight"] == pytest.approx(1.0 + 0.25)
    assert stats["right_top"] == 1  # token 2's largest weight is cache 0, not cache 1
    assert stats["chance"] == pytest.approx(1 / 2 + 1 / 3)


def test_gate_stats_of_routed_candidates():
    # ssc: a token of segment 4 (4 caches visible) whose candidates are caches 3 and 1
    gamma = torch.zeros(1, 1, 5, 3, dtype=torch.float64)  # [B, H, T, 2 + 1], segments of 1
    gamma[0, 0, 4] = torch.tensor([0.2, 0.7, 0.1])
    idx = torch.tensor([3, 1]).expand(1, 1, 5, 2)
    rec = GateRecord(gamma, idx, None, torch.arange(5), 4)
    pair_in = {1: (0.7, 1), 3: (0.2, 0), 2: (0.0, 0)}  # pair segment: right weight, right top
    for segment, (weight, top) in pair_in.items():
        stats = _gate_stats(rec, 1, torch.tensor([0]), torch.tensor([4]), torch.tensor([segment]))
        assert stats["right_weight"] == pytest.approx(weight) and stats["right_top"] == top
        assert stats["chance"] == pytest.approx(1 / 3)
    # a pair in the token's own segment is the online memory's: not a routing query
    stats = _gate_stats(rec, 1, torch.tensor([0]), torch.tensor([4]), torch.tensor([4]))
    assert stats["queries"] == 0


def test_pair_segments_find_the_queried_pair():
    config = MQARConfig(vocab_size=32, seq_len=32, num_kv_pairs=6, num_examples=5)
    (slice_,) = mqar_splits([config], [config], seed=0).test
    query, segment, example = _pair_segments(slice_, 4)
    assert query.numel() == 5 * 6
    ids = slice_.input_ids
    for q, s, e in zip(query.tolist(), segment.tolist(), example.tolist(), strict=True):
        key = ids[e, q]
        j = next(i for i in range(6) if ids[e, 2 * i] == key)
        assert s == (2 * j + 1) // 4 and ids[e, q + 1] == ids[e, 2 * j + 1]


def tiny(
    aggregation: str, gate_norm: str | None = None, vocab_size: int = 32, **layer
) -> GrowMemForCausalLM:
    """A fresh 2-layer model (the default gates unless ``gate_norm`` or ``layer`` say)."""
    torch.manual_seed(0)
    caching = {"aggregation": aggregation, "segment_size": 4}
    if gate_norm is not None:
        caching["gate_norm"] = gate_norm
    config = GrowMemConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_heads=2,
        memory={"rule": "gated_delta", "caching": caching, **layer},
    )
    return GrowMemForCausalLM(config)


def test_routing_of_a_model():
    config = MQARConfig(vocab_size=32, seq_len=32, num_kv_pairs=6, num_examples=8)
    slices = mqar_splits([config], [config], seed=0).test
    assert mqar_gate_routing(tiny("none"), slices) is None
    assert mqar_gate_routing(tiny("residual"), slices) is None
    # the scaled dot product's fresh gates are near uniform (u = x W_u is small)
    dot = tiny("grm", gate_norm="none", gate_temperature=None)
    routing = mqar_gate_routing(dot, slices, batch_size=3)
    assert len(routing["layers"]) == 2
    for layer in routing["layers"]:
        assert 0.9 < layer["entropy"] <= 1.0 + 1e-9
        assert layer["right_weight"] == pytest.approx(layer["chance"], abs=0.05)
        assert 0 <= layer["right_top"] <= 1
    # the default cosine gates with a temperature are sharper from the start
    routing = mqar_gate_routing(tiny("grm"), slices, batch_size=3)
    for layer in routing["layers"]:
        assert 0 < layer["entropy"] < 0.9 and 0 <= layer["right_top"] <= 1


def test_copy_sources_point_at_the_needles_copy_of_each_answer_token():
    tokenizer = ByteTokenizer()
    examples = niah_dataset(tokenizer, variant=3, length=480, num_examples=4, seed=0)
    for example in examples:
        query, segment = _copy_sources(example, 8)
        ids = example.input_ids + example.answer_ids
        A = len(example.answer_ids)
        # each query is the token before an answer token, read teacher-forced
        assert query.tolist() == list(range(len(example.input_ids) - 1, len(ids) - 1))
        assert [ids[q + 1] for q in query.tolist()] == example.answer_ids
        # the source segments hold the needle's copy of the answer, in order
        start = next(
            i for i in range(len(example.input_ids)) if ids[i : i + A] == example.answer_ids
        )
        assert segment.tolist() == [(start + j) // 8 for j in range(A)]
        assert segment[-1] < query[0] // 8  # the needle is cached by the time it is asked for
    broken = dataclasses.replace(examples[0], answer_ids=[255, 255, 255])
    with pytest.raises(ValueError, match="do not occur in the prompt"):
        _copy_sources(broken, 8)


def test_niah_routing_of_a_model():
    examples = niah_dataset(ByteTokenizer(), variant=3, length=480, num_examples=3, seed=0)
    assert niah_gate_routing(tiny("none", vocab_size=256), examples) is None
    routing = niah_gate_routing(tiny("grm", vocab_size=256), examples)
    assert len(routing["layers"]) == 2
    for layer in routing["layers"]:
        assert 0 < layer["entropy"] <= 1.0 + 1e-9 and 0 < layer["online_weight"] < 1
        assert 0 <= layer["right_top"] <= 1 and 0 < layer["chance"] < 1
        assert 0 < layer["right_weight"] < 1
