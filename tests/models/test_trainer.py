"""The Hugging Face Trainer with GrowMemForCausalLM: gradient accumulation gives the loss and the
gradients of one large batch (the model takes the Trainer's ``num_items_in_batch``), and neither
training nor evaluation logs a warning. One optimizer step of a tiny float64 model on CPU.

Needs accelerate (the Trainer's dependency, installed with lm-eval's Hugging Face backend).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers

pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments

from growmem.models import GrowMemConfig, GrowMemForCausalLM
from tests.helpers import memory_config, rel_err

VOCAB = 31


def make_model() -> GrowMemForCausalLM:
    torch.manual_seed(0)
    config = GrowMemConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_heads=2,
        memory=memory_config(segment_size=4, chunk_size=4),
    )
    return GrowMemForCausalLM(config).double()


def examples() -> list[dict[str, torch.Tensor]]:
    """8 sequences of 12 tokens whose first 1..8 labels are -100: batches of 2 hold different
    numbers of targets, so a mean of per-batch means is not the mean over all targets."""
    gen = torch.Generator().manual_seed(0)
    data = []
    for i in range(8):
        ids = torch.randint(0, VOCAB, (12,), generator=gen)
        labels = ids.clone()
        labels[: i + 1] = -100
        data.append({"input_ids": ids, "labels": labels})
    return data


class KeepGradients(TrainerCallback):
    """Copies the gradients the optimizer is about to apply."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.gradients = {n: p.grad.clone() for n, p in model.named_parameters()}


def one_step(tmp_path, batch_size: int, accumulation: int):
    """One optimizer step over the 8 examples, then an evaluation on them in one batch; returns
    (logged loss, gradients, eval loss, the trained model)."""
    keep = KeepGradients()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"run_{accumulation}"),
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        max_grad_norm=0.0,  # no clipping: it would hide a wrong gradient scale
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    data = examples()
    trainer = Trainer(
        model=make_model(), args=args, train_dataset=data, eval_dataset=data, callbacks=[keep]
    )
    result = trainer.train()
    return result.training_loss, keep.gradients, trainer.evaluate()["eval_loss"], trainer.model


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    data = examples()
    model = make_model()
    stacked = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    mean_loss = model(**stacked).loss  # mean over the 8 rows' targets
    mean_loss.backward()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    transformers.utils.logging.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_1, grads_1, _, _ = one_step(tmp_path, batch_size=8, accumulation=1)
            loss_4, grads_4, eval_loss, trained = one_step(tmp_path, batch_size=2, accumulation=4)
    finally:
        logger.removeHandler(handler)
    # the Trainer logs the loss in fp32
    assert loss_1 == pytest.approx(mean_loss.item(), rel=1e-6)
    assert loss_4 == pytest.approx(mean_loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert rel_err(grads_1[name], p.grad) < 1e-12, name
        assert rel_err(grads_4[name], p.grad) < 1e-6, name
    with torch.no_grad():
        assert eval_loss == pytest.approx(trained.eval()(**stacked).loss.item(), rel=1e-12)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []


def test_prediction_with_the_cache_on_returns_logits_only(tmp_path):
    """With use_cache=True the outputs hold the cache, which the Trainer must leave out of the
    predictions (config.keys_to_ignore_at_inference names it as the installed version does)."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=8,
        use_cache=True,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    model = make_model()
    data = examples()
    prediction = Trainer(model=model, args=args).predict(data)
    stacked = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        expected = model.eval()(**stacked)
    assert prediction.predictions.shape == (8, 12, VOCAB)
    assert rel_err(torch.from_numpy(prediction.predictions), expected.logits) < 1e-12
    assert prediction.metrics["test_loss"] == pytest.approx(expected.loss.item(), rel=1e-12)
