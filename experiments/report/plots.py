"""The report's figures (matplotlib, written as PNG next to docs/results.md)."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments.report.capacity import CapacityRow, StateSizeRow, curve
from experiments.report.tables import MQARRow, mc_base


def mqar_recall(path: Path, rows: list[MQARRow], pairs: list[int], seq_len: int, shown: set[str]):
    """Mean MQAR accuracy against key-value pairs for the base models, Transformer++ and the
    MC variants in ``shown`` (the best of each family), written to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row.post_training or (mc_base(row.model) and row.model not in shown):
            continue
        ax.plot(pairs, [s.mean for s in row.pairs], "o-", label=row.model)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("accuracy")
    ax.set_title(f"MQAR at {seq_len} tokens: base, best MC variant, Transformer++", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def capacity_recall(path: Path, rows: list[CapacityRow], pairs: list[int], shown: list[str]):
    """Held-out MQAR accuracy against key-value pairs, mean ± std over seeds (a band), for the
    models in ``shown`` (in that order), written to ``path``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in (r for name in shown for r in rows if r.model == name):
        mean = [s.mean for s in row.pairs]
        std = [s.std or 0.0 for s in row.pairs]
        (line,) = ax.plot(pairs, mean, "o-", label=f"{row.model} ({row.seeds} seeds)")
        low = [m - s for m, s in zip(mean, std, strict=True)]
        high = [m + s for m, s in zip(mean, std, strict=True)]
        ax.fill_between(pairs, low, high, color=line.get_color(), alpha=0.15)
    ax.axhline(1 / 32, color="grey", ls=":", lw=1, label="chance (1/32)")
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("held-out accuracy")
    ax.set_xticks(pairs)
    ax.set_title("mqar_capacity: base, best MC variant, Transformer++ (mean ± std)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def capacity_curves(path: Path, runs: dict[str, list[dict]], accuracy: list[str], gated: list[str]):
    """Two panels from the evaluations during training, means over seeds: overall accuracy
    against step for the models ``accuracy``, and layer 0's normalised gate entropy against
    step for the models ``gated``."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    palette = plt.get_cmap("tab10")
    color = {m: palette(i % 10) for i, m in enumerate(runs)}  # a model's colour in both panels
    for ax, models, metric in (
        (left, accuracy, lambda e: e["accuracy"]),
        (right, gated, lambda e: e["gates"]["layers"][0]["entropy"]),
    ):
        for model in models:
            steps, values = curve(runs[model], metric)
            if steps:  # results without a history (the sweep's first cells) have no curve
                seeds = sum("history" in r for r in runs[model])
                ax.plot(steps, values, ".-", color=color[model], label=f"{model} ({seeds})")
    left.axhline(1 / 32, color="grey", ls=":", lw=1)
    left.set_ylabel("accuracy (all pairs)")
    left.set_title("learning curves (the run's own test examples; seeds in brackets)", fontsize=9)
    right.set_ylabel("gate entropy, layer 0 (1 = uniform)")
    right.set_title("routing over training", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    _save(fig, path)


def state_size(path: Path, rows: list[StateSizeRow]):
    """Held-out accuracy against head dimension (at the most pairs, and overall), a line per
    series with ± std bars and Transformer++ as a horizontal reference."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = list(dict.fromkeys(r.series for r in rows if r.head_dim is not None))
    for ax, metric, title in (
        (axes[0], "hardest", f"{rows[0].hardest_pairs} pairs"),
        (axes[1], "overall", "all pairs"),
    ):
        for name in series:
            found = [r for r in rows if r.series == name]
            stats = [getattr(r, metric) for r in found]
            ax.errorbar(
                [r.head_dim for r in found],
                [s.mean for s in stats],
                yerr=[s.std or 0.0 for s in stats],
                fmt="o-",
                capsize=3,
                label=name,
            )
        references = [r for r in rows if r.head_dim is None]
        for r, style in zip(references, itertools.cycle(("--", ":", "-."))):
            ax.axhline(getattr(r, metric).mean, color="k", ls=style, lw=1, label=r.series)
        ax.set_xscale("log", base=2)
        dims = sorted({r.head_dim for r in rows if r.head_dim is not None})
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("head dimension D (state D x D per head and layer)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
