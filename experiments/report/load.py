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

TRANSFORMER = "Transformer++"


def is_transformer(model: str) -> bool:
    """Whether ``model`` is a Transformer++ cell: ``"Transformer++"`` (trained as the other
    cells) or a variant named ``"Transformer++, ..."`` (e.g. trained for the steps it needs)."""
    return model == TRANSFORMER or model.startswith(f"{TRANSFORMER},")


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

    def capacity_probe(
        self, head_dim: int, segment_size: int, folder: str = "", filler: int = 1
    ) -> dict | None:
        """The no-training capacity probe of a gated_delta memory at this head dimension and
        segment (``growmem probe capacity``, its JSON under results/probe/``folder``), or None
        when not run with this ``filler``: 1 is MQAR's layout (a pair takes 2 tokens and one
        write), 0 one write a token (a copied sequence)."""
        name = f"capacity_gated_delta_continuous_d{head_dim}_seg{segment_size}.json"
        found = self.json("probe", *([folder] if folder else []), name)
        return found if found and found["settings"]["filler"] == filler else None

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
    eval_every: int  # steps between the evaluations during training
    num_test_examples: int
    transformer_heads: int
    transformer_steps: int
    transformer_lr: float
    # the other Transformer++ cells: (name, steps, learning rate, short-convolution taps or
    # None), e.g. trained for longer
    transformer_variants: tuple[tuple[str, int, float, int | None], ...]
    titans: tuple[int, float, float] | None  # (mini_batch, eta_max, lr) when swept


def mqar_setting(experiment: str) -> MQARSetting:
    """The setting of MQAR experiment ``experiment`` from its cells' resolved configs."""
    from experiments.sweep import EXPERIMENTS

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
        # an explicit head_dim (mqar_capacity) or, unset, the width split over the heads
        head_dim=model.get("head_dim") or model["hidden_size"] // model["num_heads"],
        vocab_size=task.vocab_size,
        random_filler=task.random_non_queries,
        num_kv_pairs=task.num_kv_pairs,
        segment_size=model["memory"]["caching"]["segment_size"],
        lr=train.lr,
        batch_size=train.batch_size,
        steps=train.steps,
        eval_every=train.eval_every,
        num_test_examples=task.num_test_examples,
        transformer_heads=tpp.model["num_heads"],
        transformer_steps=tpp.train.steps,
        transformer_lr=tpp.train.lr,
        transformer_variants=tuple(
            (c.name, config.train.steps, config.train.lr, config.model.get("attn_conv_size"))
            for c in EXPERIMENTS[experiment]()
            if is_transformer(c.name) and c.name != TRANSFORMER
            for config in [cell_config(experiment, c.name)]
        ),
        titans=titans,
    )


def niah_setting_config(experiment: str = "niah"):
    """(the gated_delta cell, its RunConfig, Transformer++'s TrainSettings) of an S-NIAH
    experiment."""
    return (
        cell_by_name(experiment, "gated_delta"),
        cell_config(experiment, "gated_delta"),
        cell_config(experiment, "Transformer++").train,
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


def held_out_arguments() -> list[str]:
    """The ``growmem eval`` arguments of the held-out evaluation (the sweep's HELD_OUT: a
    generator seed no training used, the same examples for every model and seed)."""
    from experiments.sweep import HELD_OUT

    return list(HELD_OUT)


def held_out(result: dict) -> dict:
    """The evaluation of a run on the held-out examples (``held_out_arguments``)."""
    return result["evals"][" ".join(held_out_arguments())]


def gate_settings() -> tuple[dict[str, dict[str, str]], str]:
    """(the sweep's gate settings GATES: {label: {model.memory key: value}}, in order; the
    label of the chosen ones)."""
    from experiments.sweep import CHOSEN_GATES, GATES

    return GATES, CHOSEN_GATES


def ssc_gates() -> str:
    """The gate label of the mqar_capacity ssc cell (the sweep's SSC_GATES)."""
    from experiments.sweep import SSC_GATES

    return SSC_GATES


def state_size_cells() -> dict[str, dict[int, tuple[str, str]]]:
    """{series: {head dimension: (experiment, cell name)}} of the state-size view: every
    mqar_state_size cell is ``"series, D=<head_dim>"``; the mqar_capacity cell named ``series``
    is the series at the capacity experiment's own head dimension."""
    series: dict[str, dict[int, tuple[str, str]]] = {}
    for name in cell_names("mqar_state_size"):
        head_dim = cell_config("mqar_state_size", name).model["head_dim"]
        label = name.removesuffix(f", D={head_dim}")
        if label == name:
            raise ValueError(f"mqar_state_size cell {name!r}: expected a name ending ', D=<D>'")
        series.setdefault(label, {})[head_dim] = ("mqar_state_size", name)
    for label, sizes in series.items():
        if cell_by_name("mqar_capacity", label) is None:
            raise ValueError(f"state-size series {label!r} has no mqar_capacity cell of that name")
        sizes[cell_config("mqar_capacity", label).model["head_dim"]] = ("mqar_capacity", label)
    return {label: dict(sorted(sizes.items())) for label, sizes in series.items()}
