"""What the report is built from: the sweep's result JSON, the benchmarks' JSON, and the
settings of the sweep's cells (task base, model spec and overrides, resolved).

Every read of a result file or a cell's configuration goes through this module, so a change
of the sweep or of the run configuration has one place to land.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# {row label: {seed: {(seq_len, num_kv_pairs): accuracy}}}: MQAR accuracy per slice
Grid = dict[str, dict[int, dict[tuple[int, int], float]]]


@dataclass(frozen=True)
class Sources:
    """Where the report reads (``root``/results) and writes (``root``/docs)."""

    root: Path = ROOT

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def docs(self) -> Path:
        return self.root / "docs"

    @property
    def img(self) -> Path:
        return self.docs / "img"

    def json(self, *parts: str) -> dict | None:
        """results/``parts`` parsed, or None when the file does not exist (not run yet)."""
        path = self.results.joinpath(*parts)
        return json.loads(path.read_text()) if path.is_file() else None

    def experiment(self, name: str) -> dict[str, list[dict]]:
        """{model: [result per seed]} of a swept experiment, in the order the sweep defines
        its models; models without any result are left out."""
        runs = defaultdict(list)
        for path in sorted((self.results / "experiments" / name).glob("*/seed*.json")):
            result = json.loads(path.read_text())
            runs[result["model"]].append(result)
        return {m: runs[m] for m in cell_names(name) if runs.get(m)}


def cell_names(experiment: str) -> list[str]:
    """The sweep's model names of ``experiment``, in its order."""
    from experiments.sweep import EXPERIMENTS

    return [c.name for c in EXPERIMENTS[experiment]()]


def missing_models(experiment: str, runs: dict[str, list[dict]]) -> list[str]:
    """The sweep's models of ``experiment`` without any result yet."""
    return [name for name in cell_names(experiment) if name not in runs]


def cell_by_name(experiment: str, name: str):
    """The sweep's Cell called ``name`` in ``experiment`` (None if it has none)."""
    from experiments.sweep import EXPERIMENTS

    return next((c for c in EXPERIMENTS[experiment]() if c.name == name), None)


def cell_config(experiment: str, name: str):
    """The resolved RunConfig of one sweep cell (its task base, model spec and overrides)."""
    from experiments.sweep import cell_config as sweep_cell_config

    return sweep_cell_config(experiment, cell_by_name(experiment, name))


def training_minutes(experiment: str, result: dict) -> float:
    """Minutes one cell of ``experiment`` trained, from its steps and mean token rate: a cell
    resumed, or trained elsewhere and adopted, has no wall time of its own in its JSON."""
    config = cell_config(experiment, result["model"])
    tokens = config.train.batch_size * config.task.seq_len  # per step
    return result["steps"] * tokens / result["tokens_per_s"] / 60


@dataclass(frozen=True)
class MQARSetting:
    """What the MQAR section states about one experiment's training setting."""

    experiment: str
    task: str  # the task base the cells train from
    extra_overrides: tuple[str, ...]  # the base cell's overrides
    layers: int
    hidden_size: int
    heads: int
    head_dim: int
    vocab_size: int
    random_filler: bool
    num_kv_pairs: int
    segment_size: int
    lr: float
    batch_size: int
    steps: int
    num_test_examples: int
    transformer_heads: int
    transformer_steps: int
    transformer_lr: float
    titans: tuple[int, float, float] | None  # (mini_batch, eta_max, lr) when swept


def mqar_setting(experiment: str) -> MQARSetting:
    """The setting of MQAR experiment ``experiment`` from its cells' resolved configs."""
    base = cell_config(experiment, "gated_delta")
    tpp = cell_config(experiment, "Transformer++")
    cell = cell_by_name(experiment, "gated_delta")
    model, task, train = base.model, base.task, base.train
    titans = None
    if cell_by_name(experiment, "titans"):
        deep = cell_config(experiment, "titans")
        memory = deep.model["memory"]
        titans = (memory["mini_batch"], memory["eta_max"], deep.train.lr)
    return MQARSetting(
        experiment=experiment,
        task=cell.task,
        extra_overrides=tuple(cell.overrides),
        layers=model["num_hidden_layers"],
        hidden_size=model["hidden_size"],
        heads=model["num_heads"],
        head_dim=model["hidden_size"] // model["num_heads"],
        vocab_size=task.vocab_size,
        random_filler=task.random_non_queries,
        num_kv_pairs=task.num_kv_pairs,
        segment_size=model["memory"]["caching"]["segment_size"],
        lr=train.lr,
        batch_size=train.batch_size,
        steps=train.steps,
        num_test_examples=task.num_test_examples,
        transformer_heads=tpp.model["num_heads"],
        transformer_steps=tpp.train.steps,
        transformer_lr=tpp.train.lr,
        titans=titans,
    )


def niah_setting_config():
    """(the gated_delta cell, its RunConfig, Transformer++'s TrainSettings) of S-NIAH."""
    return (
        cell_by_name("niah", "gated_delta"),
        cell_config("niah", "gated_delta"),
        cell_config("niah", "Transformer++").train,
    )


def niah_views(niah: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Every S-NIAH model's evaluations over seeds, and each extra evaluation of it
    (labelled ``"model, args"``)."""
    views = {}
    for model, results in niah.items():
        views[model] = [r["eval"] for r in results]
        for name in results[0]["evals"]:
            views[f"{model}, {name}"] = [r["evals"][name] for r in results]
    return views


def mqar_grid(runs: dict[str, list[dict]]) -> Grid:
    """Accuracy beyond the training setting (the sweep's MQAR_GRID evaluation of every model,
    and MQAR_POST_TRAINING_MC of the base models, labelled ``"model, post-training MC"``)."""
    from experiments.sweep import MQAR_GRID, MQAR_POST_TRAINING_MC

    grid, post = " ".join(MQAR_GRID), " ".join(MQAR_POST_TRAINING_MC)
    by_seed: Grid = {}
    for model, results in runs.items():
        for key, label in ((grid, model), (post, f"{model}, post-training MC")):
            found = {
                r["seed"]: {
                    (p["seq_len"], p["num_kv_pairs"]): p["accuracy"]
                    for p in r["evals"][key]["slices"]
                }
                for r in results
                if key in r["evals"]
            }
            if found:
                by_seed[label] = found
    return by_seed


def post_training_segment() -> int:
    """Segment length of the MQAR grid's post-training Memory Caching."""
    from experiments.sweep import MQAR_POST_TRAINING_MC

    return int(MQAR_POST_TRAINING_MC[-1])
