"""growmem.demo end to end with tiny settings: trains the models, prints the table next to the
probe, writes the plot, and a rerun reuses the finished runs; bad overrides and failed trainings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from growmem import demo

TINY = [
    "train.steps=2",
    "train.checkpoint_every=0",
    "train.warmup_steps=1",
    "train.batch_size=4",
    "task.num_train_examples=32",
    "task.num_test_examples=4",
    "model.hidden_size=16",
    "model.num_hidden_layers=1",
]


def test_demo_trains_reports_and_reuses_runs(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--jobs", "2", *(a for s in TINY for a in ("--set", s))]
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    for name in demo.MODELS:
        assert f"training {name}" in out
    assert (
        "| pairs | probe: base memory | probe: oracle cache | gated_delta | gated_delta+grm |"
        in out
    )
    rows = [line for line in out.splitlines() if line.startswith("| 16 | ")]
    base, oracle = (float(x) for x in rows[0].split(" | ")[1:3])
    assert 0 < base < oracle <= 1  # 16 pairs overflow an 8 x 8 memory; the right cache holds 4
    assert "gated_delta+grm gates: layer 0: entropy" in out
    assert (tmp_path / "mqar_demo.png").stat().st_size > 0
    for spec in demo.MODELS.values():  # scored on the held-out examples, as the sweep's cells
        held_out = demo.run_folder(tmp_path, spec) / "held_out" / "eval-mqar.json"
        assert held_out.is_file()
    assert demo.main(args) == 0  # everything trained: nothing is retrained
    assert not [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("training")
    ]


def test_bad_override_is_refused_before_any_training(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "demo"), "--set", "train.lr=-1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["growmem demo: error: train.lr must be > 0.0 and finite, got -1.0"]
    assert not (tmp_path / "demo").exists()
    with pytest.raises(SystemExit) as exit:
        demo.main(["--jobs", "0"])
    assert exit.value.code == 2
    assert "argument --jobs: expected an integer >= 1" in capsys.readouterr().err


def test_a_failed_training_stops_the_others(tmp_path, capsys, monkeypatch):
    started = []

    def fake_launch(spec, out, overrides):
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "train.log", "a")  # noqa: SIM115 -- closed by run_all
        if spec == demo.MODELS["gated_delta"]:
            code = "print('growmem train: error: out of ideas'); raise SystemExit(2)"
        else:
            code = "import time; time.sleep(120)"
        process = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=log)
        process.log = log
        started.append(process)
        return process

    monkeypatch.setattr(demo, "launch", fake_launch)
    assert demo.main(["--out", str(tmp_path), "--jobs", "2"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("growmem demo: error: training gated_delta failed")
    assert "(growmem train: error: out of ideas)" in error
    assert len(started) == 2 and started[1].poll() is not None  # stopped, not left running
