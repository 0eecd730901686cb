"""The capacity-limited MQAR experiments (mqar_capacity, mqar_state_size) as structured rows.

Every number is read from the held-out evaluation (``load.held_out``: the same examples for
every model and seed), except the learning curves and the routing at step 0, which only the
evaluations during training (``history``, on the run's own test stream) have. Seeds pair:
one seed gives every cell the same initial weights (the gates' own parameters aside) and the
same batches, so cells are compared seed by seed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from experiments.report.load import gate_settings, held_out, is_transformer, training_minutes
from experiments.report.tables import Stat, mc_base

# Held-out overall accuracy at and above which a seed has learned the task (chance is 1/32).
LEARNED = 0.2
# The gate setting the gate ablation compares every other one with: growmem's former default.
GATE_REFERENCE = "1/sqrt(D)"
# The demo's outcome in one seed: the base stays below LEARNED and Memory Caching recovers
# recall, at least RECOVERED_RATIO times the base's accuracy and RECOVERED_GAIN above it.
RECOVERED_RATIO = 2.0
RECOVERED_GAIN = 0.1

Runs = dict[str, list[dict]]  # {model: [result per seed]}
Scores = dict[str, dict[int, float]]  # {model: {seed: held-out overall accuracy}}


def seed_scores(runs: Runs) -> Scores:
    """{model: {seed: held-out overall accuracy}}."""
    return {m: {r["seed"]: held_out(r)["accuracy"] for r in rs} for m, rs in runs.items()}


def tested_pairs(runs: Runs) -> list[int]:
    """The numbers of key-value pairs of the held-out slices."""
    first = next(iter(runs.values()))[0]
    return [s["num_kv_pairs"] for s in held_out(first)["slices"]]


def crossing_step(history: list[dict], threshold: float = LEARNED) -> int | None:
    """The first step whose evaluation during training reached ``threshold`` overall
    accuracy; None if none did."""
    return next((h["step"] for h in history if h["eval"]["accuracy"] >= threshold), None)


@dataclass(frozen=True)
class CapacityRow:
    """A model of mqar_capacity: held-out accuracy per number of pairs and overall.

    ``learned``: seeds with held-out overall accuracy of at least LEARNED. ``crossings``:
    per seed with a recorded history, the step its curve first reached LEARNED (None: never).
    """

    model: str
    seeds: int
    pairs: tuple[Stat, ...]
    overall: Stat
    learned: int
    crossings: tuple[int | None, ...]
    tokens_per_s: float
    minutes: float  # mean minutes of a cell's training (its tokens at its measured rate)

    @property
    def crossing_step(self) -> float | None:
        """Median crossing step over the seeds whose curve reached LEARNED (None: none)."""
        reached = [s for s in self.crossings if s is not None]
        return statistics.median(reached) if reached else None


def capacity_rows(runs: Runs, experiment: str = "mqar_capacity") -> list[CapacityRow]:
    """One row per model of ``experiment``, in the order of ``runs`` (the sweep's)."""
    rows = []
    for model, results in runs.items():
        evals = [held_out(r) for r in results]
        n = len(evals[0]["slices"])
        rows.append(
            CapacityRow(
                model=model,
                seeds=len(results),
                pairs=tuple(Stat.of(e["slices"][i]["accuracy"] for e in evals) for i in range(n)),
                overall=Stat.of(e["accuracy"] for e in evals),
                learned=sum(e["accuracy"] >= LEARNED for e in evals),
                crossings=tuple(crossing_step(r["history"]) for r in results if "history" in r),
                tokens_per_s=statistics.mean(r["tokens_per_s"] for r in results),
                minutes=statistics.mean(training_minutes(experiment, r) for r in results),
            )
        )
    return rows


@dataclass(frozen=True)
class Paired:
    """``model`` against ``reference`` on the seeds both have, seed by seed."""

    model: str
    reference: str
    seeds: tuple[int, ...]
    model_scores: tuple[float, ...]  # per seed in ``seeds``
    reference_scores: tuple[float, ...]

    @property
    def differences(self) -> Stat:
        """model - reference per seed."""
        return Stat.of(a - b for a, b in zip(self.model_scores, self.reference_scores, strict=True))

    @property
    def difference(self) -> float:
        return self.differences.mean

    @property
    def model_score(self) -> float:
        return statistics.mean(self.model_scores)

    @property
    def reference_score(self) -> float:
        return statistics.mean(self.reference_scores)

    @property
    def better(self) -> int:
        """Seeds where the model scores above the reference."""
        return sum(d > 0 for d in self.differences.values)


def paired(scores: Scores, model: str, reference: str, seeds=None) -> Paired | None:
    """``model`` against ``reference`` on the seeds both have (and, if given, in ``seeds``);
    None when they share none."""
    shared = set(scores.get(model, {})) & set(scores.get(reference, {}))
    if seeds is not None:
        shared &= set(seeds)
    if not shared:
        return None
    order = tuple(sorted(shared))
    return Paired(
        model,
        reference,
        order,
        tuple(scores[model][s] for s in order),
        tuple(scores[reference][s] for s in order),
    )


def mc_comparisons(scores: Scores) -> list[Paired]:
    """Every Memory Caching cell against its base model, in the order of ``scores``."""
    found = (paired(scores, m, base) for m in scores if (base := mc_base(m)))
    return [p for p in found if p is not None]


def gate_ablation(scores: Scores) -> list[tuple[str, Paired | None]]:
    """(gate label, the grm cell with those gates against the one with GATE_REFERENCE), for
    every gate setting of the sweep that has results (None for the reference itself)."""
    labels = list(gate_settings()[0])
    if GATE_REFERENCE not in labels:
        raise ValueError(f"GATE_REFERENCE {GATE_REFERENCE!r} is not one of the sweep's {labels}")
    reference = gated_cell("grm", GATE_REFERENCE)
    rows = []
    for label in labels:
        cell = gated_cell("grm", label)
        if cell not in scores:
            continue
        rows.append((label, None if label == GATE_REFERENCE else paired(scores, cell, reference)))
    return rows


@dataclass(frozen=True)
class DemoSeed:
    """The demo's two models (the base and Memory Caching with the default gates) in one seed
    of the sweep: held-out accuracies and which parts of the demo's outcome hold."""

    seed: int
    base: float
    mc: float

    @property
    def base_fails(self) -> bool:
        return self.base < LEARNED

    @property
    def mc_recovers(self) -> bool:
        return self.mc >= RECOVERED_RATIO * self.base and self.mc >= self.base + RECOVERED_GAIN

    @property
    def mc_learned(self) -> bool:
        return self.mc >= LEARNED

    @property
    def outcome(self) -> bool:
        """The demo's outcome: a base that fails and Memory Caching that recovers recall."""
        return self.base_fails and self.mc_recovers


def demo_seeds(scores: Scores, base: str, mc: str) -> list[DemoSeed]:
    """The demo's pair (``base`` and ``mc``, mqar_capacity cells) seed by seed, on the seeds
    both have."""
    found = paired(scores, mc, base)
    if found is None:
        return []
    return [
        DemoSeed(seed, b, m)
        for seed, m, b in zip(found.seeds, found.model_scores, found.reference_scores, strict=True)
    ]


def gated_cell(aggregation: str, gates: str, base: str = "gated_delta") -> str:
    """The mqar_capacity cell of ``base`` with a gated ``aggregation`` (grm, ssc) and the gate
    setting ``gates`` (a label of the sweep's GATES)."""
    return f"{base}+{aggregation}, {gates}"


@dataclass(frozen=True)
class RoutingRow:
    """How one gated layer's gates route, at step 0 (``start``: None without history) and on
    the held-out evaluation at the end; every metric of ``evaluate.mqar_gate_routing``, as a
    Stat over seeds."""

    model: str
    layer: int
    seeds: int
    start: dict[str, Stat] | None
    end: dict[str, Stat]


def routing_rows(runs: Runs) -> list[RoutingRow]:
    """A row per gated layer of every model whose held-out evaluation reports gates."""
    rows = []
    for model, results in runs.items():
        end = [held_out(r)["gates"] for r in results if held_out(r).get("gates")]
        if not end:
            continue
        start = [
            h["eval"]["gates"]
            for r in results
            for h in r.get("history", [])
            if h["step"] == 0 and h["eval"].get("gates")
        ]
        for layer in range(len(end[0]["layers"])):
            rows.append(
                RoutingRow(
                    model,
                    layer,
                    len(end),
                    _layer_stats(start, layer) if start else None,
                    _layer_stats(end, layer),
                )
            )
    return rows


def _layer_stats(gates: list[dict], layer: int) -> dict[str, Stat]:
    names = gates[0]["layers"][layer]
    return {k: Stat.of(g["layers"][layer][k] for g in gates) for k in names}


def curve(results: list[dict], metric: Callable[[dict], float]) -> tuple[list[int], list[float]]:
    """(steps, mean of ``metric(eval)`` over the seeds with a history) at the steps every such
    seed has; empty without history."""
    histories = [{h["step"]: h["eval"] for h in r["history"]} for r in results if "history" in r]
    if not histories:
        return [], []
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    return steps, [statistics.mean(metric(h[s]) for h in histories) for s in steps]


def probe_recall(probe: dict, pairs: int) -> tuple[float, float] | None:
    """(the memory's own, the oracle cache's) recall of ``pairs`` pairs in a no-training
    capacity probe (None: the probe did not test that many pairs)."""
    if pairs not in probe["pairs"]:
        return None
    at = probe["pairs"].index(pairs)
    recall = {s["name"]: s["recall"][at] for s in probe["series"]}
    return recall["base"], recall["oracle"]


@dataclass(frozen=True)
class StateSizeRow:
    """Held-out accuracy of one series at one head dimension (None: Transformer++, whose
    state, the key-value cache, has no D x D form)."""

    series: str
    head_dim: int | None
    seeds: int
    hardest_pairs: int  # the most pairs tested
    hardest: Stat  # accuracy at hardest_pairs
    overall: Stat


def state_size_rows(
    runs: dict[str, Runs], cells: dict[str, dict[int, tuple[str, str]]]
) -> list[StateSizeRow]:
    """Rows of the state-size view, by series then head dimension, and Transformer++ of
    mqar_capacity as the reference.

    Args:
        runs: {experiment: its runs} for mqar_capacity and mqar_state_size.
        cells: ``load.state_size_cells()``: {series: {head_dim: (experiment, cell)}}.
    """

    def row(series, head_dim, results):
        evals = [held_out(r) for r in results]
        pairs = [s["num_kv_pairs"] for s in evals[0]["slices"]]
        hardest = pairs.index(max(pairs))
        return StateSizeRow(
            series,
            head_dim,
            len(evals),
            pairs[hardest],
            Stat.of(e["slices"][hardest]["accuracy"] for e in evals),
            Stat.of(e["accuracy"] for e in evals),
        )

    rows = [
        row(series, head_dim, found)
        for series, sizes in cells.items()
        for head_dim, (experiment, name) in sizes.items()
        if (found := runs.get(experiment, {}).get(name))
    ]
    rows += [
        row(model, None, results)
        for model, results in runs.get("mqar_capacity", {}).items()
        if is_transformer(model)
    ]
    return rows
