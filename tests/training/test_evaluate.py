"""growmem.evaluate: scoring rules checked against stub models whose answers are known, and
evaluation on the model's device."""

from __future__ import annotations

import contextlib
import math
import re
from types import SimpleNamespace

import pytest
import torch

from growmem.evaluate import evaluate_lm, evaluate_mqar, evaluate_niah, model_device
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import ByteTokenizer, MQARConfig, TokenBlocks, mqar_splits

from .common import TINY_MODEL


class NextTokenOracle(torch.nn.Module):
    """Teacher-forced, it predicts every next input token (so it knows the answer once the
    answer is in its input); generating, it appends ``generated`` whatever the prompt."""

    def __init__(self, vocab_size: int, generated: list[int]):
        super().__init__()
        self.vocab_size, self.generated = vocab_size, generated

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        targets = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)  # [B, T]
        return SimpleNamespace(logits=torch.nn.functional.one_hot(targets, self.vocab_size).float())

    def generate(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        return torch.cat([input_ids, torch.tensor([self.generated])], dim=1)


def test_niah_exact_match_and_token_accuracy_are_scored_separately():
    tokenizer = ByteTokenizer()
    wrong = tokenizer.encode(" no idea")
    model = NextTokenOracle(tokenizer.vocab_size, wrong)
    results = evaluate_niah(model, tokenizer, variant=1, lengths=[400, 500], num_examples=2, seed=0)
    assert results["accuracy"] == 0.0  # what it generates is never the needle
    assert results["token_accuracy"] == 1.0  # teacher-forced it predicts every answer token
    assert [r["token_accuracy"] for r in results["lengths"]] == [1.0, 1.0]


class NeedleCopier(NextTokenOracle):
    """Generating, it copies the needle's value from the prompt and goes on with more digits,
    as a model never trained to end its answer does; it honours ``max_new_tokens``."""

    def __init__(self, tokenizer: ByteTokenizer):
        super().__init__(tokenizer.vocab_size, [])
        self.tokenizer = tokenizer

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        value = re.search(r"is: (\d+)\.", self.tokenizer.decode(input_ids[0].tolist()))[1]
        answer = self.tokenizer.encode(f" {value}99")[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)


def test_niah_generation_stops_at_the_answer_length():
    tokenizer = ByteTokenizer()
    model = NeedleCopier(tokenizer)
    results = evaluate_niah(model, tokenizer, variant=1, lengths=[400], num_examples=3, seed=0)
    assert results["accuracy"] == 1.0  # the digits after the value are not generated


class KeyedCopier(NextTokenOracle):
    """Generating, it reads the question's key and copies the value of the needle with that
    key (``distractor=False``) or of a needle with another key (``distractor=True``)."""

    def __init__(self, tokenizer: ByteTokenizer, distractor: bool):
        super().__init__(tokenizer.vocab_size, [])
        self.tokenizer, self.distractor = tokenizer, distractor

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_) -> torch.Tensor:
        prompt = self.tokenizer.decode(input_ids[0].tolist())
        asked = re.search(r"special magic number for ([a-z-]+) mentioned", prompt)[1]
        needles = re.findall(r"numbers for ([a-z]+-[a-z]+) is: (\d+)\.", prompt)
        values = [v for k, v in needles if (k != asked) == self.distractor]
        assert values, f"no needle to copy (distractor={self.distractor})"
        answer = self.tokenizer.encode(f" {values[0]}")[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)


@pytest.mark.parametrize("distractor, expected", [(False, 1.0), (True, 0.0)])
def test_multikey_niah_scores_the_queried_needle_only(distractor, expected):
    tokenizer = ByteTokenizer()
    model = KeyedCopier(tokenizer, distractor)
    results = evaluate_niah(
        model, tokenizer, variant=1, lengths=[700, 900], num_examples=3, seed=0, num_needles=3
    )
    assert results["accuracy"] == expected
    assert [r["accuracy"] for r in results["lengths"]] == [expected, expected]
    # a distractor's value is counted as a mix-up of the needles
    assert [r["distractor_rate"] for r in results["lengths"]] == [1 - expected] * 2
    assert results["num_needles"] == 3


class ShortSighted(NeedleCopier):
    """Copies the needle's value in prompts of at most ``reach`` tokens, else says nothing."""

    def __init__(self, tokenizer: ByteTokenizer, reach: int):
        super().__init__(tokenizer)
        self.reach = reach

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        if input_ids.shape[1] <= self.reach:
            return super().generate(input_ids, max_new_tokens, **kwargs)
        return torch.cat([input_ids, torch.zeros(1, max_new_tokens, dtype=torch.long)], dim=1)


def test_niah_lengths_within_and_beyond_the_training_length():
    """Lengths up to the training length are "within" it, longer ones "beyond"; each group has
    its own means, and the overall means stay over every length."""
    tokenizer = ByteTokenizer()
    model = ShortSighted(tokenizer, reach=450)  # solves the lengths it was "trained" at
    lengths = [400, 450, 600, 800]
    results = evaluate_niah(
        model, tokenizer, variant=1, lengths=lengths, num_examples=2, seed=0, train_length=450
    )
    assert [r["regime"] for r in results["lengths"]] == ["within", "within", "beyond", "beyond"]
    assert [r["accuracy"] for r in results["lengths"]] == [1.0, 1.0, 0.0, 0.0]
    assert (results["within_accuracy"], results["beyond_accuracy"]) == (1.0, 0.0)
    assert results["accuracy"] == 0.5 and results["train_length"] == 450
    assert results["within_token_accuracy"] == results["beyond_token_accuracy"] == 1.0

    only_within = evaluate_niah(
        model, tokenizer, variant=1, lengths=[400], num_examples=1, seed=0, train_length=450
    )
    assert "within_accuracy" in only_within and "beyond_accuracy" not in only_within
    unknown = evaluate_niah(model, tokenizer, variant=1, lengths=[400], num_examples=1, seed=0)
    assert "regime" not in unknown["lengths"][0]
    assert "distractor_rate" not in unknown["lengths"][0]  # one needle: nothing to mix up
    assert not {"train_length", "within_accuracy", "beyond_accuracy"} & set(unknown)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="train_length"):
            evaluate_niah(
                model, tokenizer, variant=1, lengths=[400], num_examples=1, seed=0, train_length=bad
            )


# ---------------------------------------------------------------- the model's device


class OnFakeGPU(torch.Tensor):
    """A CPU tensor that stands for one moved to a GPU (see the fake_gpu fixture); what is
    computed from it is one too."""


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU without a GPU: ``Tensor.to("cuda...")`` marks the tensor (``OnFakeGPU``)
    instead of moving it, and ``torch.autocast`` records its device type. Returns that list
    of device types."""
    to = torch.Tensor.to

    def marking_to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            return self.as_subclass(OnFakeGPU)
        return to(self, *args, **kwargs)

    autocasts = []

    def recording_autocast(device_type, *args, **kwargs):
        autocasts.append(device_type)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.Tensor, "to", marking_to)
    monkeypatch.setattr(torch, "autocast", recording_autocast)
    return autocasts


def on_fake_gpu(model: torch.nn.Module, monkeypatch) -> list[bool]:
    """Make ``model`` report cuda:0 as its device and record, for every call of its forward
    and generate, whether every tensor argument was moved there."""
    cuda = property(lambda self: torch.device("cuda", 0))
    monkeypatch.setattr(type(model), "device", cuda, raising=False)
    moved = []

    def recording(method):
        def call(*args, **kwargs):
            tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
            moved.append(bool(tensors) and all(isinstance(t, OnFakeGPU) for t in tensors))
            return method(*args, **kwargs)

        return call

    model.forward = recording(model.forward)
    if hasattr(model, "generate"):
        model.generate = recording(model.generate)
    return moved


def tiny_model(vocab_size: int) -> GrowMemForCausalLM:
    torch.manual_seed(0)
    return GrowMemForCausalLM(GrowMemConfig(vocab_size=vocab_size, **TINY_MODEL))


def test_mqar_and_lm_inputs_reach_the_model_on_its_device(fake_gpu, monkeypatch):
    model = tiny_model(vocab_size=259)
    moved = on_fake_gpu(model, monkeypatch)
    splits = mqar_splits(
        [MQARConfig(vocab_size=32, seq_len=32, num_kv_pairs=2, num_examples=4)],
        [MQARConfig(vocab_size=32, seq_len=32, num_kv_pairs=2, num_examples=4)],
        seed=0,
    )
    results = evaluate_mqar(model, splits.test, batch_size=2, bf16=True)
    assert 0.0 <= results["accuracy"] <= 1.0
    assert moved == [True, True]  # two batches
    blocks = TokenBlocks.from_documents(["the memory of a model " * 20] * 3, ByteTokenizer(), 32)
    results = evaluate_lm(model, blocks, batch_size=2, bf16=True)
    assert results["blocks"] > 2 and math.isfinite(results["loss"])
    assert moved[2:] and all(moved)
    assert set(fake_gpu) == {"cuda"}  # autocast for the model's device type


def test_niah_inputs_reach_the_model_on_its_device(fake_gpu, monkeypatch):
    tokenizer = ByteTokenizer()
    model = NextTokenOracle(tokenizer.vocab_size, tokenizer.encode(" 1"))
    moved = on_fake_gpu(model, monkeypatch)
    results = evaluate_niah(
        model, tokenizer, variant=1, lengths=[400], num_examples=2, seed=0, bf16=True
    )
    assert results["token_accuracy"] == 1.0
    assert moved == [True] * 4  # forward and generate of two examples
    assert set(fake_gpu) == {"cuda"}


def test_model_device():
    assert model_device(tiny_model(32)) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2).to(torch.float64)) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters
    on_meta = torch.nn.Linear(2, 2, device="meta")
    assert model_device(on_meta) == torch.device("meta")
