"""The training loop's arithmetic checked exactly on tiny real runs: the learning-rate schedule
and the rate of every update, gradient clipping at the optimizer step, the weight-decay groups,
and the logged loss (and its gradient) recomputed by hand from the step's batch and weights.

A hook on every optimizer step records what the update is about to use: each group's rate and
weight decay, the global norm of the gradients, and the model's weights before the update
(those the step's loss was computed with).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import growmem.train as train_module
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import IGNORE_INDEX
from growmem.train import build_optimizer, train, warmup_cosine
from growmem.training.config import RunConfig, TrainSettings
from growmem.training.data import build_task_data

from .common import loss_lines, text_corpus, tiny_config


@dataclass
class StepRecord:
    """What one optimizer step was about to use."""

    lrs: list[float]  # per parameter group
    weight_decays: list[float]
    grad_norm: float  # global L2 norm of the gradients the update reads
    weights: dict[str, torch.Tensor]  # the model's state before the update


@dataclass
class Recorder:
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    steps: list[StepRecord] = field(default_factory=list)


@pytest.fixture
def recorder(monkeypatch):
    """Record every optimizer step of the runs of a test (see the module docstring)."""
    record = Recorder()
    build = train_module.build_optimizer

    def recording_build(model, settings):
        record.model = model
        record.optimizer, scheduler = build(model, settings)
        return record.optimizer, scheduler

    def before_step(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads]))
        record.steps.append(
            StepRecord(
                lrs=[g["lr"] for g in optimizer.param_groups],
                weight_decays=[g["weight_decay"] for g in optimizer.param_groups],
                grad_norm=float(norm),
                weights={k: v.detach().clone() for k, v in record.model.state_dict().items()},
            )
        )

    monkeypatch.setattr(train_module, "build_optimizer", recording_build)
    handle = register_optimizer_step_pre_hook(before_step)
    yield record
    handle.remove()


# ---------------------------------------------------------------- learning rate


def schedule(step: int, warmup: int, total: int, floor: float) -> float:
    """The documented factor of 0-based step ``step``: linear warmup reaching 1 at the last
    warmup step, then half a cosine from 1 (first step after warmup) to ``floor`` (step
    ``total`` and after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


def test_warmup_cosine_at_chosen_steps():
    factor = warmup_cosine(warmup=4, total=12, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # inside warmup
    assert factor(4) == 1.0  # first step after warmup: the cosine starts at its top
    assert factor(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)), abs=1e-15)
    assert factor(8) == pytest.approx(0.55, abs=1e-15)  # half way: the mean of 1 and the floor
    assert factor(11) == pytest.approx(0.1 + 0.45 * (1 + math.cos(7 * math.pi / 8)), abs=1e-15)
    assert factor(12) == pytest.approx(0.1, abs=1e-15)  # the floor at the end ...
    assert factor(13) == factor(100) == factor(12)  # ... and after it
    for s in range(30):
        assert factor(s) == pytest.approx(schedule(s, 4, 12, 0.1), abs=1e-15), s
    no_warmup = warmup_cosine(warmup=0, total=10, min_ratio=0.0)
    assert no_warmup(0) == 1.0 and no_warmup(5) == pytest.approx(0.5, abs=1e-15)
    assert no_warmup(10) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("log_every", [1, 4])
def test_every_logged_lr_is_the_rate_of_its_update(tmp_path, recorder, log_every):
    """Line ``step: s`` (1-based) logs the rate step s's update used: lr * factor(s - 1)."""
    settings = {"steps": 10, "warmup_steps": 3, "min_lr_ratio": 0.2, "lr": 0.01}
    config = tiny_config(tmp_path / "run", train={**settings, "log_every": log_every})
    train(config)
    lines = loss_lines(tmp_path / "run")
    logged = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] if log_every == 1 else [4, 8, 10]
    assert [m["step"] for m in lines] == logged
    assert len(recorder.steps) == 10
    for m in lines:
        rate = 0.01 * schedule(m["step"] - 1, 3, 10, 0.2)
        assert m["lr"] == pytest.approx(rate, rel=1e-12), m
    for s, record in enumerate(recorder.steps):
        rate = 0.01 * schedule(s, 3, 10, 0.2)
        assert record.lrs == pytest.approx([rate, rate], rel=1e-12), s
        assert record.weight_decays == [config.train.weight_decay, 0.0]


# ---------------------------------------------------------------- gradient clipping


def test_clipping_bounds_the_update_and_the_log_keeps_the_raw_norm(tmp_path, recorder):
    """Convention: ``grad_norm`` is the global norm before clipping; the update reads
    gradients of norm <= grad_clip (``clip_grad_norm_`` scales by clip / (norm + 1e-6))."""
    clip = 0.01
    train(tiny_config(tmp_path / "clipped", train={"grad_clip": clip}))
    clipped, lines = recorder.steps[:], loss_lines(tmp_path / "clipped")
    assert len(clipped) == len(lines) == 6
    for record, m in zip(clipped, lines, strict=True):
        assert m["grad_norm"] > 10 * clip  # the raw norm exceeds the clip: it is in force
        assert record.grad_norm <= clip * (1 + 1e-6)
        expected = clip * m["grad_norm"] / (m["grad_norm"] + 1e-6)
        assert record.grad_norm == pytest.approx(expected, rel=1e-5)

    recorder.steps.clear()
    train(tiny_config(tmp_path / "raw", train={"grad_clip": 0.0}))  # 0: no clipping
    raw = loss_lines(tmp_path / "raw")
    for record, m in zip(recorder.steps, raw, strict=True):
        assert record.grad_norm == pytest.approx(m["grad_norm"], rel=1e-5)
    # both runs start from the same weights and batch: step 1's logged norm is the same
    # raw norm, whether or not the run clips
    assert lines[0]["grad_norm"] == pytest.approx(raw[0]["grad_norm"], rel=1e-6)
    assert lines[0]["loss"] == raw[0]["loss"]


# ---------------------------------------------------------------- weight decay groups


def layer(i: int, *names: str) -> set[str]:
    return {f"model.layers.{i}.{name}" for name in names}


MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
NORMS = ("mixer_norm.weight", "mlp_norm.weight")
ATTENTION = tuple(f"mixer.{p}_proj.weight" for p in "qkvo")

# Weight matrices (projections, the gates' projections included: s_proj, the summary keys' of
# the default gates) decay; embeddings (input
# and untied output), norms, biases, the per-head gate parameters A_log and dt_bias, the gated
# aggregations' temperature (a default), the depthwise convolution's kernel and the deep
# memories' initial weights W1_0, W2_0 do not.
GROUP_CASES = {
    "swla-grm-hybrid": (
        {
            "memory": {"rule": "swla", "caching": {"aggregation": "grm", "segment_size": 8}},
            "num_hidden_layers": 2,
            "attn_layers": [1],
            "tie_word_embeddings": False,
        },
        layer(0, *MLP, *(f"mixer.{p}_proj.weight" for p in ("in", "a", "b", "l", "o", "s")))
        | layer(1, *MLP, *ATTENTION),
        {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        | layer(0, *NORMS, "mixer.A_log", "mixer.dt_bias", "mixer.conv.weight")
        | layer(0, "mixer.conv.bias", "mixer.b_proj.bias", "mixer.l_proj.bias")
        | layer(0, "mixer.o_norm.weight", "mixer.gate_log_temperature")
        | layer(1, *NORMS),
    ),
    "titans": (
        {
            "memory": {"rule": "titans", "mini_batch": 4, "caching": {"aggregation": "soup"}},
            "num_hidden_layers": 1,
        },
        layer(0, *MLP, *(f"mixer.{p}_proj.weight" for p in ("in", "eta", "a", "b", "o", "s"))),
        {"model.embed_tokens.weight", "model.norm.weight"}
        | layer(0, *NORMS, "mixer.W1_0", "mixer.W2_0", "mixer.A_log", "mixer.dt_bias")
        | layer(0, "mixer.conv.weight", "mixer.conv.bias", "mixer.eta_proj.bias")
        | layer(0, "mixer.b_proj.bias", "mixer.o_norm.weight", "mixer.gate_log_temperature"),
    ),
    "transformer++": (
        {"memory": None, "num_hidden_layers": 2},
        layer(0, *MLP, *ATTENTION) | layer(1, *MLP, *ATTENTION),
        {"model.embed_tokens.weight", "model.norm.weight"} | layer(0, *NORMS) | layer(1, *NORMS),
    ),
}


def group_names(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    assert all(len(g) == len(set(g)) for g in groups)  # no parameter twice
    return [set(g) for g in groups]


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_weight_decay_groups_by_name(case):
    overrides, decay, no_decay = GROUP_CASES[case]
    model_args = {"hidden_size": 16, "num_heads": 2, **overrides}
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **model_args))
    optimizer, _ = build_optimizer(model, TrainSettings(weight_decay=0.05))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert group_names(optimizer, model) == [decay, no_decay]
    # a frozen parameter is in neither group
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    optimizer, _ = build_optimizer(model, TrainSettings(weight_decay=0.05))
    assert group_names(optimizer, model) == [decay - layer(0, "mlp.up_proj.weight"), no_decay]


def test_the_training_run_optimizes_those_groups(tmp_path, recorder):
    """With the run's AdamW settings (none of them torch's defaults)."""
    adamw = {"weight_decay": 0.03, "betas": [0.8, 0.9], "eps": 1e-7}
    train(tiny_config(tmp_path / "run", train={"steps": 1, **adamw}))
    groups = recorder.optimizer.param_groups
    assert isinstance(recorder.optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-7 for g in groups)
    decay, no_decay = group_names(recorder.optimizer, recorder.model)
    assert decay == layer(0, *MLP, *(f"mixer.{p}_proj.weight" for p in ("in", "a", "b", "o")))
    assert "model.embed_tokens.weight" in no_decay and "model.layers.0.mixer.A_log" in no_decay
    assert decay | no_decay == {n for n, _ in recorder.model.named_parameters()}


# ---------------------------------------------------------------- the logged loss


def hand_loss_and_grad_norm(
    config: RunConfig, vocab_size: int, weights: dict, batch: dict
) -> tuple[float, float]:
    """The mean cross-entropy over the labelled next tokens of the whole batch, at
    ``weights``, in float64, and the global norm of its gradient."""
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=vocab_size, **config.model)).double()
    model.load_state_dict(
        {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    )
    model.train()
    ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
    log_probs = logits[:, :-1].log_softmax(-1)  # [B, T - 1, V]: position t predicts t + 1
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX
    nll = -log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]  # [B, T - 1]
    loss = nll[labelled].sum() / labelled.sum()
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    return float(loss.detach()), float(torch.linalg.vector_norm(torch.stack(grads)))


def loss_case(name: str, tmp_path: Path) -> dict:
    """Run sections of the loss checks: grad_accum > 1 everywhere, micro-batches with unequal
    numbers of labelled tokens (MQAR with 1 or 4 pairs, NIAH answers only), every position
    labelled (LM) or the prompt too (NIAH train_on_prompt)."""
    niah = {
        "name": "niah",
        "variant": 1,
        "seq_len": 400,
        "num_train_examples": 6,
        "eval_lengths": [400],
        "num_eval_examples": 1,
    }
    return {
        "mqar": {"task": {"num_kv_pairs": [1, 4]}, "train": {"batch_size": 2, "grad_accum": 3}},
        "lm": {
            "task": {"name": "lm", "corpus": str(text_corpus(tmp_path / "corpus")), "seq_len": 32},
            "train": {"batch_size": 2, "grad_accum": 2},
        },
        "niah-answer": {"task": niah, "train": {"batch_size": 1, "grad_accum": 2}},
        "niah-prompt": {
            "task": {**niah, "train_on_prompt": True},
            "train": {"batch_size": 1, "grad_accum": 2},
        },
    }[name]


@pytest.mark.parametrize("case", ["mqar", "lm", "niah-answer", "niah-prompt"])
def test_logged_loss_is_the_batch_mean_token_cross_entropy(tmp_path, recorder, case):
    """The loss normaliser is the number of labelled next tokens of the global batch (all
    micro-batches together), and the update's gradient is that mean's gradient."""
    sections = loss_case(case, tmp_path)
    out = tmp_path / "run"
    config = tiny_config(out, task=sections["task"], train={"steps": 3, **sections["train"]})
    train(config)
    settings = config.train
    data = build_task_data(config.task, settings.seed, out)
    lines = loss_lines(out)
    assert len(lines) == len(recorder.steps) == 3
    for step, (m, record) in enumerate(zip(lines, recorder.steps, strict=True)):
        global_batch = settings.batch_size * settings.grad_accum
        batch = data.train.batch_at(step, global_batch, seed=settings.seed)
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        if case == "lm":  # every next token is labelled
            assert labelled == batch["input_ids"][:, 1:].numel()
        loss, grad_norm = hand_loss_and_grad_norm(config, data.vocab_size, record.weights, batch)
        assert m["loss"] == pytest.approx(loss, rel=1e-5), (step, labelled)
        assert m["grad_norm"] == pytest.approx(grad_norm, rel=1e-4), step
