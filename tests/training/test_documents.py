"""Resets at document boundaries (task.reset_at_documents): a packed document reads as if it
were alone, in float64, for memories with cached segments, a deep rule, attention and a
hybrid, and equals the same document decoded token by token."""

from __future__ import annotations

import json

import pytest
import torch

from growmem.cli import main
from growmem.models import CACHE_FIELD, GrowMemForCausalLM
from growmem.train import train
from growmem.training.documents import DocumentResets, document_starts, split_documents
from tests.helpers import rel_err, tiny_lm

from .common import loss_lines, text_corpus, tiny_config

VOCAB, EOS = 29, 28
CASES = [
    ("gated_delta", "grm", {}),
    ("titans", "ssc", {}),
    ("attention", "none", {}),
    ("swla", "soup", {"attn_layers": [0], "attn_window": 3}),
]


def make_model(rule, aggregation, **overrides) -> GrowMemForCausalLM:
    return tiny_lm(rule, aggregation, VOCAB, **overrides)


def documents(*lengths: int, seed: int = 0) -> list[torch.Tensor]:
    """Documents of the given lengths, each ending with EOS (no EOS inside)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.cat([torch.randint(0, EOS, (n - 1,), generator=gen), torch.tensor([EOS])])
        for n in lengths
    ]


@pytest.mark.parametrize("rule, aggregation, extra", CASES, ids=[c[0] for c in CASES])
@torch.no_grad()
def test_a_packed_document_reads_as_if_alone_and_as_decoded(rule, aggregation, extra):
    model = make_model(rule, aggregation, **extra)
    # row 0: the tail of a document, then two whole ones (9 tokens: more than 2 segments of 4)
    # row 1: one document; row 2: three documents
    row0, row1, row2 = documents(3, 9, 6, seed=1), documents(18), documents(5, 5, 8, seed=2)
    ids = torch.stack([torch.cat(row0), torch.cat(row1), torch.cat(row2)])  # [3, 18]
    logits = DocumentResets(model, EOS)(input_ids=ids).logits  # [3, 18, V]
    packed = model(input_ids=ids).logits
    for r, row in enumerate((row0, row1, row2)):
        start = 0
        for doc in row:
            alone = model(input_ids=doc[None]).logits[0]
            here = logits[r, start : start + len(doc)]
            assert rel_err(here, alone) < 1e-12, (r, start)
            start += len(doc)
    # without resets the second document of row 0 sees the first one
    assert rel_err(packed[0, 3:12], logits[0, 3:12]) > 1e-3
    # one document: read as without resets, to rounding (its row is computed in a batch of
    # another shape, whose kernels need not round alike on every CPU)
    assert rel_err(logits[1], packed[1]) < 1e-12
    # the second document of row 0 decoded token by token from the initial state
    doc, cache, steps = row0[1], None, []
    for t in range(len(doc)):
        out = model(input_ids=doc[None, t : t + 1], cache=cache, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        steps.append(out.logits[0, -1])
    assert rel_err(torch.stack(steps), logits[0, 3:12]) < 1e-12


def test_document_starts_and_split():
    ids = torch.tensor([[5, EOS, 6, 7, EOS], [EOS, 1, 2, 3, 4]])
    starts = document_starts(ids, EOS)
    assert starts.tolist() == [[1, 0, 1, 0, 0], [1, 1, 0, 0, 0]]
    doc_ids, mask, doc, pos = split_documents(ids, starts)
    assert doc_ids.tolist() == [[5, EOS, 0, 0], [6, 7, EOS, 0], [EOS, 0, 0, 0], [1, 2, 3, 4]]
    assert torch.equal(doc_ids[doc, pos], ids) and mask.sum() == ids.numel()
    with pytest.raises(ValueError, match="every row must start a document"):
        split_documents(ids, torch.zeros_like(ids, dtype=torch.bool))


def test_training_with_resets_differs_and_resumes(tmp_path):
    # documents much shorter than a block: every block holds several
    corpus = text_corpus(tmp_path / "corpus", num_train=12, num_val=2, chars=40)
    task = {"name": "lm", "corpus": str(corpus), "seq_len": 64, "eval_blocks": 2}
    settings = {"steps": 3, "checkpoint_every": 2}
    plain, reset = tmp_path / "plain", tmp_path / "reset"
    train(tiny_config(plain, task=task, train=settings))
    config = tiny_config(reset, task={**task, "reset_at_documents": True}, train=settings)
    assert train(config, stop_after=2) is None
    with pytest.raises(ValueError, match="another model or task"):  # a reset run stays one
        train(tiny_config(reset, task=task, train=settings), resume=True)
    train(config, resume=True)
    losses = [line["loss"] for line in loss_lines(reset)]
    assert len(losses) == 3 and losses != [line["loss"] for line in loss_lines(plain)]
    # growmem eval reads the run's documents as it trained: alone (the final eval's loss)
    final = json.loads((reset / "model" / "eval.json").read_text())
    assert main(["eval", str(reset / "model"), "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval-lm.json").read_text())["loss"] == final["loss"]
