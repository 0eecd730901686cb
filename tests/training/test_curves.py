"""``growmem plot``: learning curves of runs from their metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import yaml

from growmem.cli import main
from growmem.training.curves import plot_runs, smooth

from .common import TINY_MODEL


def fake_run(folder, losses, evals, model=None):
    """A run folder with a metrics.jsonl of training lines (steps 1..) and evaluations."""
    folder.mkdir(parents=True)
    lines = [{"step": s, "loss": v, "lr": 1e-3} for s, v in enumerate(losses, 1)]
    lines += [{"step": s, "eval": e} for s, e in evals]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if model is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    return folder


def mqar_eval(accuracy, slices):
    rows = [
        {"seq_len": 32, "num_kv_pairs": k, "accuracy": a}
        for k, a in zip((2, 4), slices, strict=True)
    ]
    return {"accuracy": accuracy, "slices": rows}


def test_two_runs_draw_loss_and_eval_curves_per_slice(tmp_path):
    evals = [(0, mqar_eval(0.1, [0.2, 0.0])), (4, mqar_eval(0.5, [0.7, 0.3]))]
    a = fake_run(tmp_path / "a", [3.0, 2.5, 2.0, 1.8], evals, model=TINY_MODEL)
    b = fake_run(tmp_path / "b", [3.1, 2.9, 2.2, 2.0], evals)
    fig = plot_runs([a, b], tmp_path / "out" / "curves.png")
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    loss_ax, eval_ax = fig.axes
    assert len(loss_ax.lines) == 4  # raw and smoothed, per run
    raw = loss_ax.lines[0]
    assert list(raw.get_xdata()) == [1, 2, 3, 4] and list(raw.get_ydata()) == [3.0, 2.5, 2.0, 1.8]
    assert len(eval_ax.lines) == 6  # per run: all slices, and each of the 2 slices
    assert list(eval_ax.lines[0].get_ydata()) == [0.1, 0.5]
    assert list(eval_ax.lines[1].get_ydata()) == [0.2, 0.7]
    labels = [text.get_text() for text in loss_ax.get_legend().get_texts()]
    assert labels == ["a (gated_delta@16)", "b"]  # the model spec from config.yaml
    assert eval_ax.get_ylabel() == "accuracy"


def test_lm_run_draws_the_evaluation_loss(tmp_path):
    run = fake_run(tmp_path / "lm", [5.0, 4.0], [(0, {"loss": 5.5, "perplexity": 244.0})])
    fig = plot_runs([run], tmp_path / "curves.png")
    _, eval_ax = fig.axes
    assert eval_ax.get_ylabel() == "evaluation loss (nats/token)"
    assert [list(line.get_ydata()) for line in eval_ax.lines] == [[5.5]]


def test_a_run_without_evaluations_has_the_loss_axis_only(tmp_path):
    run = fake_run(tmp_path / "r", [2.0, 1.0], [])
    assert len(plot_runs([run], tmp_path / "c.png").axes) == 1


def test_smooth_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.25 + 0.75 * 2) / 0.75])
    assert smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_plot_command(tmp_path, capsys):
    run = fake_run(tmp_path / "r", [2.0, 1.0], [(2, mqar_eval(0.5, [0.5, 0.5]))])
    out = tmp_path / "curves.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plot", str(run), "--smoothing", "1"])
    assert "expected a number in [0, 1)" in capsys.readouterr().err
