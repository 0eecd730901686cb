"""Learning curves of runs from their metrics.jsonl (``growmem plot RUN [RUN ...]``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from growmem.training.config_files import load_yaml
from growmem.training.rundir import CONFIG_FILE, METRICS_FILE

# The rows of an evaluation drawn as curves of their own, and how each row is named.
_SLICES = {
    "slices": lambda row: f"T={row['seq_len']} kv={row['num_kv_pairs']}",  # MQAR
    "lengths": lambda row: f"T={row['length']}",  # S-NIAH
}


def read_curves(run: Path | str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The training lines and the evaluation records of a run folder's metrics.jsonl.

    Raises:
        FileNotFoundError: the folder has no metrics.jsonl.
        ValueError: a line that is not a JSON record with a step (its number named).
    """
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no {METRICS_FILE}: not a run folder")
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: not a metrics record")
        if "eval" in record:
            evals.append(record)
        elif "loss" in record:
            train.append(record)
    return train, evals


def run_label(run: Path | str) -> str:
    """The run folder's name and, when its config.yaml says, its model spec."""
    run = Path(run)
    try:
        from growmem.models import GrowMemConfig
        from growmem.models.model_spec import spec_of

        path = run / CONFIG_FILE
        model = load_yaml(path.read_bytes(), str(path)).get("model") or {}
        spec = str(spec_of(GrowMemConfig(vocab_size=1, **model)))
    except (OSError, ValueError, TypeError, AttributeError):
        return run.name  # no readable config: the name alone
    return f"{run.name} ({spec})"


def smooth(values: list[float], weight: float) -> list[float]:
    """An exponential moving average with TensorBoard's debiasing (the first values are not
    pulled towards 0).

    Args:
        values: the raw series.
        weight: in [0, 1); 0 returns the series itself.
    """
    if not 0 <= weight < 1:
        raise ValueError(f"weight: expected a number in [0, 1), got {weight}")
    out, average = [], 0.0
    for n, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def eval_metric(evals: list[dict[str, Any]]) -> str | None:
    """The evaluation's headline metric: "accuracy" (MQAR, S-NIAH) or "loss" (LM)."""
    for metric in ("accuracy", "loss"):
        if evals and all(metric in record["eval"] for record in evals):
            return metric
    return None


def eval_curves(evals: list[dict[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}``: "all" (the headline metric), then one curve per row
    of the evaluation (MQAR slice, S-NIAH length) when it has several."""
    curves: dict[str, list[tuple[int, float]]] = {"all": []}
    for record in evals:
        results = record["eval"]
        curves["all"].append((record["step"], results[metric]))
        for key, name in _SLICES.items():
            rows = results.get(key) or []
            for row in rows if len(rows) > 1 else []:
                curves.setdefault(name(row), []).append((record["step"], row[metric]))
    return curves


def plot_runs(runs: list[Path | str], out: Path | str, smoothing: float = 0.9):
    """Draw the training loss (smoothed, and raw in a faint line) and the evaluation curves
    (accuracy, or the LM's evaluation loss, by step; a thin dashed line per evaluation
    slice where there are several) of one or several runs into a PNG.

    Args:
        runs: run folders (each with a metrics.jsonl).
        out: the PNG to write (its folder is created).
        smoothing: the moving average's weight (`smooth`).
    Returns: the matplotlib Figure (closed; its axes and lines can still be read).

    Raises:
        FileNotFoundError, ValueError: a folder without metrics, a damaged line, runs with
            nothing to draw.
    """
    if not runs:
        raise ValueError("runs: expected at least one run folder")
    curves = [(run_label(run), *read_curves(run)) for run in runs]
    if not any(train or evals for _, train, evals in curves):
        raise ValueError(f"runs: no metrics to draw in {[str(r) for r in runs]}")
    metrics = {eval_metric(evals) for _, _, evals in curves if evals}
    metrics.discard(None)
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(6 * (1 + len(metrics)), 4.5))
    axes = list(axes) if metrics else [axes]
    loss_ax, eval_axes = axes[0], dict(zip(sorted(metrics), axes[1:], strict=True))
    for index, (label, train, evals) in enumerate(curves):
        color = f"C{index % 10}"
        if train:
            steps = [line["step"] for line in train]
            losses = [line["loss"] for line in train]
            loss_ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            loss_ax.plot(steps, smooth(losses, smoothing), color=color, label=label)
        metric = eval_metric(evals)
        if metric is None:
            continue
        for name, points in eval_curves(evals, metric).items():
            steps, values = zip(*points, strict=True)
            if name == "all":
                eval_axes[metric].plot(steps, values, "o-", color=color, label=label)
            else:
                eval_axes[metric].plot(
                    steps, values, "--", color=color, alpha=0.6, linewidth=0.8, label=name
                )
    loss_ax.set(xlabel="step", ylabel="training loss (nats/token)", title="training loss")
    for metric, ax in eval_axes.items():
        ylabel = "accuracy" if metric == "accuracy" else "evaluation loss (nats/token)"
        ax.set(xlabel="step", ylabel=ylabel, title=f"evaluation {metric}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig
