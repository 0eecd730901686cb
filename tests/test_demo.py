"""growmem.demo end to end with tiny settings: trains the four models, prints the table,
writes the plot, and a rerun reuses the finished runs."""

from __future__ import annotations

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
        assert f"| {name} | " in out
        assert f"training {name}" in out
    assert "| model | 4 | 8 | 12 | 16 | all |" in out
    assert (tmp_path / "mqar_demo.png").stat().st_size > 0
    assert demo.main(args) == 0  # everything trained: nothing is retrained
    assert "training" not in capsys.readouterr().out
