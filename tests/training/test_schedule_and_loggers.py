"""The warmup-stable-decay schedule, the loggers hook and the TensorBoard writer (a fake one:
the suite does not need the tensorboard package)."""

from __future__ import annotations

import math
import sys
from itertools import pairwise
from typing import ClassVar

import pytest

import growmem.training.loggers as loggers_module
from growmem.train import train, warmup_stable_decay
from growmem.training.loggers import TensorBoardLogger, scalars

from .common import loss_lines, read_metrics, tiny_config


def test_wsd_factor_at_key_steps():
    # 20 steps, 2 of warmup, the last round(0.25 * 20) = 5 decay: steps 15..19
    factor = warmup_stable_decay(warmup=2, total=20, min_ratio=0.1, decay_fraction=0.25)
    assert factor(0) == 0.5 and factor(1) == 1.0  # linear warmup
    assert [factor(s) for s in range(2, 16)] == [1.0] * 14  # stable, decay starts at 15
    assert factor(17) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(2 / 5)), abs=1e-12)
    assert factor(19) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(4 / 5)), abs=1e-12)
    assert factor(20) == pytest.approx(0.1, abs=1e-12)  # the floor at step total
    # monotone decay
    decay = [factor(s) for s in range(15, 21)]
    assert all(a > b for a, b in pairwise(decay))


def test_wsd_decay_never_starts_inside_the_warmup():
    factor = warmup_stable_decay(warmup=8, total=10, min_ratio=0.0, decay_fraction=0.5)
    assert [factor(s) for s in range(8)] == [(s + 1) / 8 for s in range(8)]
    assert factor(8) == 1.0 and factor(9) == pytest.approx(1 - math.sqrt(0.5))


def test_wsd_run_logs_its_learning_rates_and_resumes_on_them(tmp_path):
    settings = {
        "steps": 8,
        "warmup_steps": 2,
        "lr": 1e-2,
        "min_lr_ratio": 0.0,
        "schedule": "wsd",
        "decay_fraction": 0.5,
    }
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, train=settings))
    factor = warmup_stable_decay(2, 8, 0.0, 0.5)
    lrs = [line["lr"] for line in loss_lines(a)]
    assert lrs == pytest.approx([1e-2 * factor(s) for s in range(8)], rel=1e-12)
    assert lrs[2:5] == [1e-2] * 3 and lrs[5] < 1e-2

    config_b = tiny_config(b, train=settings)
    assert train(config_b, stop_after=3) is None
    with pytest.raises(ValueError, match=r"train.schedule 'wsd' -> 'cosine'"):
        train(tiny_config(b, train={**settings, "schedule": "cosine"}), resume=True)
    with pytest.raises(ValueError, match=r"train.decay_fraction 0.5 -> 0.25"):
        train(tiny_config(b, train={**settings, "decay_fraction": 0.25}), resume=True)
    train(config_b, resume=True)
    assert [line["lr"] for line in loss_lines(b)] == lrs
    assert [line["loss"] for line in loss_lines(b)] == [line["loss"] for line in loss_lines(a)]


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"schedule": "linear"}, "train.schedule must be one of ['cosine', 'wsd']"),
        ({"decay_fraction": 0.0}, "train.decay_fraction must be in (0.0, 1.0]"),
        ({"decay_fraction": 1.5}, "train.decay_fraction must be in (0.0, 1.0]"),
    ],
)
def test_schedule_settings_are_checked(tmp_path, setting, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        tiny_config(tmp_path, train=setting)


def test_loggers_get_every_metrics_record(tmp_path):
    records = []
    train(tiny_config(tmp_path, train={"steps": 3, "eval_every": 2}), loggers=[records.append])
    assert records == read_metrics(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 2, 3, 3]  # evaluations at 0, 2 and the end


def test_loggers_must_be_callables(tmp_path):
    with pytest.raises(TypeError, match="loggers: expected callables"):
        train(tiny_config(tmp_path), loggers=["wandb"])


def test_scalars_of_training_and_evaluation_records():
    assert scalars({"step": 4, "loss": 2.5, "lr": 0.001}) == {"train/loss": 2.5, "train/lr": 0.001}
    record = {
        "step": 4,
        "eval": {
            "accuracy": 0.5,
            "slices": [
                {"seq_len": 32, "num_kv_pairs": 2, "accuracy": 0.75},
                {"seq_len": 64, "num_kv_pairs": 4, "accuracy": 0.25},
            ],
            "gates": {"layers": [{"layer": 0, "entropy": 1.5}]},
        },
    }
    assert scalars(record) == {
        "eval/accuracy": 0.5,
        "eval/slices/seq_len=32,num_kv_pairs=2/accuracy": 0.75,
        "eval/slices/seq_len=64,num_kv_pairs=4/accuracy": 0.25,
        "eval/gates/layers/layer=0/entropy": 1.5,
    }


class FakeWriter:
    """Records what torch's SummaryWriter would be asked to write."""

    made: ClassVar[list[FakeWriter]] = []

    def __init__(self, log_dir: str, purge_step: int | None = None):
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_setting_writes_every_scalar_and_purges_on_resume(tmp_path, monkeypatch):
    FakeWriter.made = []
    monkeypatch.setattr(loggers_module, "summary_writer_class", lambda: FakeWriter)
    settings = {"steps": 4, "eval_every": 2, "tensorboard": True}
    config = tiny_config(tmp_path, train=settings)
    assert train(config, stop_after=2) is None
    (first,) = FakeWriter.made
    assert first.log_dir == str(tmp_path / "tensorboard") and first.purge_step == 0
    assert first.closed
    losses = [(step, value) for tag, value, step in first.scalars if tag == "train/loss"]
    assert losses == [(line["step"], line["loss"]) for line in loss_lines(tmp_path)]
    assert [step for tag, _, step in first.scalars if tag == "eval/accuracy"] == [0, 2]

    train(config, resume=True)
    second = FakeWriter.made[1]
    # the events a killed session wrote after step 2 would be dropped
    assert second.purge_step == 3 and second.closed
    assert [step for tag, _, step in second.scalars if tag == "train/loss"] == [3, 4]


def test_tensorboard_without_the_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # an import of it fails
    with pytest.raises(ImportError, match="pip install tensorboard"):
        train(tiny_config(tmp_path, train={"tensorboard": True}))
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work


def test_tensorboard_logger_opens_its_writer_at_the_first_record(tmp_path):
    FakeWriter.made = []
    logger = TensorBoardLogger(tmp_path / "tb", writer_class=FakeWriter)
    logger.close()  # nothing logged: no writer, nothing written
    assert FakeWriter.made == []
    logger({"step": 7, "loss": 1.0})
    logger.close()
    (writer,) = FakeWriter.made
    assert writer.purge_step == 7 and writer.scalars == [("train/loss", 1.0, 7)]


def test_a_cosine_run_resumes_with_another_decay_fraction(tmp_path):
    """decay_fraction means nothing to a cosine schedule: a resume may change it."""
    settings = {"steps": 3, "checkpoint_every": 1}
    assert train(tiny_config(tmp_path, train=settings), stop_after=1) is None
    other = tiny_config(tmp_path, train={**settings, "decay_fraction": 0.5})
    assert train(other, resume=True) == tmp_path / "model"
