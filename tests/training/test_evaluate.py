"""growmem.evaluate: scoring rules checked against stub models whose answers are known."""

from __future__ import annotations

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
