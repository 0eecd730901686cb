"""growmem.evaluate: scoring rules checked against stub models whose answers are known."""

from __future__ import annotations

import re
from types import SimpleNamespace

import torch

from growmem.evaluate import evaluate_niah
from growmem.tasks import ByteTokenizer


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
