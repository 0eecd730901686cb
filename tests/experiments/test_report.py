"""experiments.report builds docs/results.md from result JSON: tables, plot, verdicts."""

from __future__ import annotations

import json

import pytest

from experiments import report, sweep


def fake_result(model: str, accuracies: list[float], seed: int) -> dict:
    slices = [
        {"seq_len": 64, "num_kv_pairs": k, "accuracy": a}
        for k, a in zip((4, 8, 12, 16), accuracies, strict=True)
    ]
    return {
        "model": model,
        "seed": seed,
        "tokens_per_s": 1000.0,
        "eval": {"accuracy": sum(accuracies) / 4, "slices": slices},
        "evals": {},
    }


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(report, "IMG", tmp_path / "docs" / "img")
    (tmp_path / "docs").mkdir()
    accuracies = {
        "Transformer++": [0.9, 0.9, 0.8, 0.7],
        "gated_delta": [0.1, 0.1, 0.1, 0.1],
        "gated_delta+residual": [0.2, 0.2, 0.1, 0.1],
        "gated_delta+grm": [0.6, 0.5, 0.4, 0.3],
        "gated_delta+ssc": [0.5, 0.4, 0.3, 0.2],
    }
    for model, acc in accuracies.items():
        for seed in (0, 1):
            path = tmp_path / "results" / "experiments" / "mqar" / sweep.slug(model)
            path.mkdir(parents=True, exist_ok=True)
            shifted = [a + 0.01 * seed for a in acc]
            (path / f"seed{seed}.json").write_text(json.dumps(fake_result(model, shifted, seed)))
    return tmp_path


def test_report_tables_plot_and_verdicts(results_dir):
    assert report.main() == 0
    text = (results_dir / "docs" / "results.md").read_text()
    assert "| gated_delta+grm | 2 | 0.605 ± 0.007 |" in text  # mean ± std over two seeds
    assert (results_dir / "docs" / "img" / "mqar_recall.png").stat().st_size > 0
    assert "gated_delta: base 0.105, best MC (gated_delta+grm) 0.455, Transformer++" in text
    assert "gated_delta: grm 0.455 vs residual 0.155: reproduced" in text
    assert "ssc keeps 71% of grm's gain): reproduced" in text
    assert "**5. MC training throughput" in text and "not measured yet" in text
    assert "Not measured yet: run `python -m experiments.sweep niah`" in text


def test_every_sweep_cell_has_a_distinct_result_path():
    for name, cells in sweep.EXPERIMENTS.items():
        paths = [sweep.result_path(name, c, 0) for c in cells()]
        assert len(set(paths)) == len(paths), name
