"""experiments.niah_mixups on a trained (tiny) niah_multikey cell."""

from __future__ import annotations

import json
import subprocess
import sys

from experiments import niah_mixups, sweep


def test_within_lengths_are_the_evaluation_lengths_up_to_the_training_length():
    assert niah_mixups.within_lengths("niah_multikey") == [192, 256]
    assert niah_mixups.within_lengths("niah_multikey_long") == [192, 256]


def train_tiny(runs, experiment: str, cell, *settings: str):
    """Train a shrunken ``cell`` of ``experiment`` as the sweep would, into ``runs``; returns
    its run folder."""
    out = runs / experiment / sweep.slug(cell.name) / "seed0"
    tiny = [
        "train.steps=2",
        "train.batch_size=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "task.num_train_examples=4",
        "model.hidden_size=16",
        "model.num_hidden_layers=1",
        *settings,
    ]
    arguments = sweep.train_arguments(cell, out, seed=0)
    extra = [a for s in tiny for a in ("--set", s)]
    subprocess.run([sys.executable, "-m", "growmem.cli", *arguments, *extra], check=True)
    return out


def test_mixups_of_a_trained_cell_agree_with_its_own_evaluation(tmp_path):
    cell = next(c for c in sweep.EXPERIMENTS["niah_multikey"]() if c.name == "gated_delta")
    settings = ("task.num_eval_examples=3", "task.curriculum_steps=[0, 1]")
    out = train_tiny(tmp_path, "niah_multikey", cell, *settings)
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


def test_a_gated_uuid_cell_gets_its_routing_and_other_experiments_keep_their_entries(tmp_path):
    cell = next(c for c in sweep.EXPERIMENTS["niah_uuid"]() if c.model == "gated_delta+grm")
    train_tiny(tmp_path, "niah_uuid", cell, "task.num_eval_examples=2")
    result = tmp_path / "mixups.json"
    earlier = {"niah_multikey": {"lengths": [192, 256], "cells": {"gated_delta": {}}}}
    result.write_text(json.dumps({"experiments": earlier}))
    argv = ["niah_uuid", "--runs", str(tmp_path), "--out", str(result)]
    assert niah_mixups.main(argv) == 0
    found = json.loads(result.read_text())["experiments"]
    assert found["niah_multikey"] == earlier["niah_multikey"]  # not measured again: kept
    seed = found["niah_uuid"]["cells"][cell.name]["0"]
    assert "distractor_rate" not in seed  # one needle
    assert seed["gates"]["lengths"] == [192, 256]
    (layer,) = seed["gates"]["layers"]
    assert 0 <= layer["right_top"] <= 1 and 0 < layer["chance"] < 1
    # another seed measured later (none trained here): seed 0's entry is kept
    assert niah_mixups.main([*argv, "--seeds", "1"]) == 0
    again = json.loads(result.read_text())["experiments"]["niah_uuid"]["cells"][cell.name]
    assert again == {"0": seed}
