"""Tests of growmem.tasks.mqar: layout, labels and their shift, seeds, splits and accuracy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from growmem.tasks import IGNORE_INDEX
from growmem.tasks.mqar import (
    PAD_ID,
    MQARConfig,
    generate_mqar,
    mqar_accuracy,
    mqar_accuracy_by_slice,
    mqar_splits,
)

V, T, K, N = 64, 48, 6, 50


def config(**overrides) -> MQARConfig:
    fields = dict(vocab_size=V, seq_len=T, num_kv_pairs=K, num_examples=N)
    return MQARConfig(**{**fields, **overrides})


def test_shapes_and_dtypes():
    data = generate_mqar(config(), seed=0)
    assert set(data) == {"input_ids", "labels"}
    for tensor in data.values():
        assert tensor.shape == (N, T) and tensor.dtype == torch.long
    assert data["input_ids"].min() >= 0 and data["input_ids"].max() < V


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_layout_and_labels(random_non_queries):
    data = generate_mqar(config(random_non_queries=random_non_queries), seed=1)
    x, y = data["input_ids"], data["labels"]
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        keys, values = row_x[0 : 2 * K : 2], row_x[1 : 2 * K : 2]
        assert len(set(keys)) == K and len(set(values)) == K
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        pairs = dict(zip(keys, values, strict=True))
        labelled = [t for t, label in enumerate(row_y) if label != IGNORE_INDEX]
        assert len(labelled) == K
        assert all(t > 2 * K for t in labelled)
        for t in labelled:
            # the previous input is a key of the prefix; the label is its value, also the input
            assert row_y[t] == pairs[row_x[t - 1]] == row_x[t]
        assert sorted(row_x[t - 1] for t in labelled) == sorted(keys)  # each key queried once
        if not random_non_queries:
            pair_positions = {p for t in labelled for p in (t - 1, t)}
            filler = [row_x[t] for t in range(2 * K, T) if t not in pair_positions]
            assert filler == [0] * len(filler)


def test_random_filler_uses_whole_vocab():
    data = generate_mqar(config(num_examples=200), seed=2)
    x, y = data["input_ids"], data["labels"]
    filler = torch.ones_like(x, dtype=torch.bool)
    filler[:, : 2 * K] = False
    values = y != IGNORE_INDEX
    filler &= ~values & ~torch.roll(values, -1, dims=1)  # neither a value nor its query
    assert filler.sum() == 200 * (T - 4 * K)
    assert len(torch.unique(x[filler])) == V  # every token, 0 and both halves, appears


def test_determinism_by_seed():
    a, b = generate_mqar(config(), seed=7), generate_mqar(config(), seed=7)
    c = generate_mqar(config(), seed=8)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], c["input_ids"])
    state = torch.random.get_rng_state()
    generate_mqar(config(), seed=7)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_power_law_puts_queries_early():
    def mean_query_position(power_a):
        labels = generate_mqar(config(num_examples=500, seq_len=256, power_a=power_a), 0)["labels"]
        return (labels != IGNORE_INDEX).nonzero()[:, 1].float().mean().item()

    uniform = mean_query_position(1.0)
    assert abs(uniform - (2 * K + (256 - 2 * K) / 2)) < 8  # centre of the query region
    assert mean_query_position(0.01) < uniform - 30


def test_hf_shift_trains_exactly_the_query_positions():
    data = generate_mqar(config(), seed=3)
    x, y = data["input_ids"], data["labels"]
    logits = torch.zeros(N, T, V, requires_grad=True)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1), reduction="sum")
    loss.backward()
    trained = logits.grad.abs().sum(-1) > 0  # [N, T] positions whose prediction is trained
    query_positions = torch.zeros(N, T, dtype=torch.bool)
    query_positions[:, :-1] = y[:, 1:] != IGNORE_INDEX
    assert torch.equal(trained, query_positions)
    assert trained.sum() == N * K
    assert torch.isin(x[trained], x[:, 0 : 2 * K : 2]).all()  # every trained input is a key


def test_accuracy_on_hand_built_logits():
    labels = torch.tensor([[-100, -100, 5, -100], [-100, 7, -100, 9]])
    logits = torch.zeros(2, 4, 10)
    logits[0, 1, 5] = 1.0  # position 1 predicts token 2 = 5: right
    logits[1, 0, 3] = 1.0  # position 0 predicts token 1 = 7: wrong
    logits[1, 2, 9] = 1.0  # position 2 predicts token 3 = 9: right
    assert mqar_accuracy(logits, labels) == pytest.approx(2 / 3)
    assert mqar_accuracy(logits.argmax(-1), labels) == pytest.approx(2 / 3)
    unshifted = torch.zeros(2, 4, 10)
    unshifted[0, 2, 5] = unshifted[1, 1, 7] = unshifted[1, 3, 9] = 1.0  # aligned with labels
    assert mqar_accuracy(unshifted, labels) == 0.0


def test_accuracy_of_oracles_on_generated_data():
    data = generate_mqar(config(), seed=4)
    x, y = data["input_ids"], data["labels"]
    next_token = torch.roll(x, -1, dims=1)  # prediction at t = input t + 1
    assert mqar_accuracy(next_token, y) == 1.0
    assert mqar_accuracy(x, y) == 0.0  # the key itself is never its value


def test_accuracy_errors():
    labels = torch.full((2, 5), IGNORE_INDEX)
    with pytest.raises(ValueError, match="labels"):
        mqar_accuracy(torch.zeros(2, 5, dtype=torch.long), labels)
    labels[0, 2] = 1
    with pytest.raises(ValueError, match="outputs"):
        mqar_accuracy(torch.zeros(2, 4, 3), labels)
    with pytest.raises(ValueError, match="outputs"):
        mqar_accuracy(torch.zeros(2, 4, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="labels"):
        mqar_accuracy(torch.zeros(5, dtype=torch.long), labels[0])


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(num_examples=0), "num_examples"),
        (dict(seq_len=4 * K - 1), "seq_len"),
        (dict(vocab_size=2 * K + 1), "vocab_size"),
        (dict(power_a=0.0), "power_a"),
        (dict(power_a=float("nan")), "power_a"),
    ],
)
def test_config_validation(overrides, name):
    with pytest.raises(ValueError, match=name):
        config(**overrides)


def test_smallest_valid_config():
    c = config(vocab_size=2 * K + 2, seq_len=4 * K, num_examples=3)
    y = generate_mqar(c, seed=0)["labels"]
    assert ((y != IGNORE_INDEX).sum(1) == K).all()
    with pytest.raises(ValueError, match="seed"):
        generate_mqar(c, seed=-1)


def test_splits_disjoint_streams_and_slices():
    train = [config(num_examples=40), config(seq_len=32, num_kv_pairs=4, num_examples=30)]
    test = [config(num_examples=20), config(seq_len=64, num_kv_pairs=8, num_examples=10)]
    splits = mqar_splits(train, test, seed=0)
    x, y = splits.train["input_ids"], splits.train["labels"]
    assert x.shape == y.shape == (70, T)
    assert (x[40:, 32:] == PAD_ID).all() and (y[40:, 32:] == IGNORE_INDEX).all()
    assert ((y != IGNORE_INDEX).sum(1) == torch.tensor([K] * 40 + [4] * 30)).all()
    assert [s.key for s in splits.test] == [(T, K), (64, 8)]
    assert [s.input_ids.shape for s in splits.test] == [(20, T), (10, 64)]
    same_config = splits.test[0].input_ids
    assert not (x[:40, None, :] == same_config[None]).all(-1).any()  # no shared sequence
    assert not torch.equal(x[:20], same_config)  # train and test use different seeds
    again = mqar_splits(train, test, seed=0)
    assert torch.equal(again.train["input_ids"], x)
    assert not torch.equal(mqar_splits(train, test, seed=1).train["input_ids"], x)


def test_splits_accept_one_config_and_reject_bad_input():
    splits = mqar_splits(config(num_examples=5), [config(num_examples=5)], seed=3)
    assert splits.train["input_ids"].shape == (5, T)
    with pytest.raises(ValueError, match="test"):
        mqar_splits(config(), [config(), config(num_examples=3)], seed=0)
    with pytest.raises(ValueError, match="train"):
        mqar_splits([], [config()], seed=0)
    with pytest.raises(ValueError, match="test"):
        mqar_splits(config(), [], seed=0)


def test_accuracy_by_slice():
    test = [config(num_examples=21), config(seq_len=64, num_kv_pairs=8, num_examples=10)]
    slices = mqar_splits(config(num_examples=2), test, seed=0).test
    calls = []

    def oracle(input_ids):
        calls.append(input_ids.shape[0])
        return F.one_hot(torch.roll(input_ids, -1, dims=1), V).float()  # logits [B, T, V]

    assert mqar_accuracy_by_slice(oracle, slices, batch_size=8) == {(T, K): 1.0, (64, 8): 1.0}
    assert calls == [8, 8, 5, 8, 2]
    first_wrong = mqar_accuracy_by_slice(lambda x: torch.zeros_like(x), slices[:1])
    assert first_wrong == {(T, K): 0.0}
    with pytest.raises(ValueError, match="batch_size"):
        mqar_accuracy_by_slice(oracle, slices, batch_size=0)
