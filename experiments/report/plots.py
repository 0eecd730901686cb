"""The report's figures (matplotlib, written as PNG next to docs/results.md)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
