"""experiments.niah_mixups on a trained (tiny) niah_multikey cell."""

from __future__ import annotations

import json
import subprocess
import sys

from experiments import niah_mixups, sweep


def test_within_lengths_are_the_evaluation_lengths_up_to_the_training_length():
    assert niah_mixups.within_lengths("niah_multikey") == [192, 256]
    assert niah_mixups.within_lengths("niah_multikey_long") == [192, 256]


def test_mixups_of_a_trained_cell_agree_with_its_own_evaluation(tmp_path):
    cell = next(c for c in sweep.EXPERIMENTS["niah_multikey"]() if c.name == "gated_delta")
    out = tmp_path / "niah_multikey" / sweep.slug(cell.name) / "seed0"
    tiny = [
        "train.steps=2",
        "train.batch_size=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "task.num_train_examples=4",
        "task.num_eval_examples=3",
        "task.curriculum_steps=[0, 1]",
        "model.hidden_size=16",
        "model.num_hidden_layers=1",
    ]
    arguments = sweep.train_arguments(cell, out, seed=0)
    extra = [a for s in tiny for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "growmem.cli", *arguments, *extra], check=True)
    result = tmp_path / "mixups.json"
    assert niah_mixups.main(["--runs", str(tmp_path), "--out", str(result)]) == 0
    found = json.loads(result.read_text())
    assert "provenance" in found
    measured = found["experiments"]["niah_multikey"]
    assert measured["lengths"] == [192, 256]
    assert list(measured["cells"]) == ["gated_delta"]  # the only trained cell
    assert found["experiments"]["niah_multikey_long"]["cells"] == {}
    seed = measured["cells"]["gated_delta"]["0"]
    own = json.loads((out / "model" / "eval.json").read_text())
    assert seed["accuracy"] == own["within_accuracy"]
    assert seed["token_accuracy"] == own["within_token_accuracy"]
    assert 0.0 <= seed["distractor_rate"] <= 1.0 - seed["accuracy"]
