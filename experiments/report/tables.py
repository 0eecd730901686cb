"""The report's tables as structured rows: numbers over seeds, no formatting.

Every builder takes loaded results (``load``) and returns dataclasses; ``render`` turns them
into markdown. The tests check these rows.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from experiments.report.load import Grid, is_transformer, niah_views, training_minutes

# MQAR accuracy at the training setting above which a seed has passed the phase transition.
CROSSED = 0.5
# minutes an experiment may take on this 2-core CPU, the budget the settings were sized to
BUDGET_MINUTES = 60


@dataclass(frozen=True)
class Stat:
    """One table cell: a metric's values over seeds."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values) -> Stat:
        return cls(tuple(values))

    @property
    def mean(self) -> float:
        return statistics.mean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation; None for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass(frozen=True)
class MQARRow:
    """A model's MQAR accuracy per number of key-value pairs at the training length.

    ``crossed`` is None when the trained pairs are not among the tested ones;
    ``post_training`` names the evaluation (``--post-training-mc N``) of a post-training MC
    row, which shares the base model's seeds and has no token rate."""

    model: str
    seeds: int
    crossed: int | None
    pairs: tuple[Stat, ...]
    overall: Stat
    tokens_per_s: float | None = None
    post_training: str | None = None


def mqar_rows(runs: dict[str, list[dict]], pairs: list[int], trained_pairs: int) -> list[MQARRow]:
    """Rows of an MQAR experiment's table, post-training MC rows after their base model's
    (only evaluations on the test slices themselves; the grid's are in ``grid_rows``)."""
    trained = pairs.index(trained_pairs) if trained_pairs in pairs else None
    rows = []
    for model, results in runs.items():
        crossed = (
            None
            if trained is None
            else sum(r["eval"]["slices"][trained]["accuracy"] >= CROSSED for r in results)
        )
        rows.append(
            MQARRow(
                model=model,
                seeds=len(results),
                crossed=crossed,
                pairs=_slice_stats([r["eval"] for r in results], len(pairs)),
                overall=Stat.of(r["eval"]["accuracy"] for r in results),
                tokens_per_s=statistics.mean(r["tokens_per_s"] for r in results),
            )
        )
        for key in results[0]["evals"]:
            evals = [r["evals"][key] for r in results if key in r["evals"]]
            if (
                not key.startswith("--post-training-mc")
                or [s["num_kv_pairs"] for s in evals[0]["slices"]] != pairs
            ):
                continue
            rows.append(
                MQARRow(
                    model=model,
                    seeds=len(evals),
                    crossed=None,
                    pairs=_slice_stats(evals, len(pairs)),
                    overall=Stat.of(e["accuracy"] for e in evals),
                    post_training=key,
                )
            )
    return rows


def _slice_stats(evals: list[dict], n: int) -> tuple[Stat, ...]:
    return tuple(Stat.of(e["slices"][i]["accuracy"] for e in evals) for i in range(n))


def mqar_seed_scores(runs: dict[str, list[dict]]) -> dict[str, dict[int, float]]:
    """{model: {seed: overall MQAR accuracy}} for the verdicts."""
    return {m: {r["seed"]: r["eval"]["accuracy"] for r in rs} for m, rs in runs.items()}


def mc_base(model: str) -> str | None:
    """The base model of a Memory Caching variant ``"base+aggregation"``; None for a base
    model and for the Transformer++ cells."""
    return model.split("+")[0] if "+" in model and not is_transformer(model) else None


def best_mc(scores: dict[str, dict[int, float]]) -> dict[str, str]:
    """{base model: its best Memory Caching variant}, by mean accuracy over seeds.

    Args:
        scores: {model: {seed: accuracy}}.
    """
    mean = {m: statistics.mean(s.values()) for m, s in scores.items()}
    best: dict[str, str] = {}
    for model, acc in mean.items():
        base = mc_base(model)
        if base and (base not in best or acc > mean[best[base]]):
            best[base] = model
    return best


@dataclass(frozen=True)
class GridTable:
    """MQAR accuracy on ``columns`` (seq_len, num_kv_pairs) slices, one row per label."""

    columns: tuple[tuple[int, int], ...]
    rows: tuple[tuple[str, int, tuple[Stat, ...]], ...]  # (label, seeds, cells)


def grid_tables(grid: Grid) -> tuple[GridTable, GridTable]:
    """(length extrapolation at the most pairs every length has, memory load at the longest
    length) of the MQAR grid."""
    slices = sorted(next(iter(next(iter(grid.values())).values())))
    lengths = sorted({n for n, _ in slices})
    pairs = sorted({k for _, k in slices})
    fixed_k = max(k for k in pairs if all((n, k) in slices for n in lengths))
    longest = max(lengths)

    def table(columns):
        rows = tuple(
            (label, len(seeds), tuple(Stat.of(s[c] for s in seeds.values()) for c in columns))
            for label, seeds in grid.items()
        )
        return GridTable(tuple(columns), rows)

    return table([(n, fixed_k) for n in lengths]), table([(longest, k) for k in pairs])


def grid_slices(grid: Grid) -> list[tuple[int, int]]:
    """Every (seq_len, num_kv_pairs) slice of the grid."""
    return sorted(next(iter(next(iter(grid.values())).values())))


@dataclass(frozen=True)
class NIAHTables:
    """S-NIAH per evaluation length: exact match and teacher-forced answer-token accuracy
    per view (a model or one of its extra evaluations), and each model's last training loss."""

    lengths: tuple[int, ...]
    exact: tuple[tuple[str, int, tuple[Stat, ...]], ...]  # (label, seeds, per length)
    tokens: tuple[tuple[str, int, tuple[Stat, ...]], ...]
    final_loss: tuple[tuple[str, Stat], ...]
    minutes: tuple[float, ...]  # training minutes of every cell


def niah_tables(niah: dict[str, list[dict]], experiment: str = "niah") -> NIAHTables:
    lengths = tuple(r["length"] for r in next(iter(niah.values()))[0]["eval"]["lengths"])
    views = niah_views(niah)

    def metric(name):
        return tuple(
            (
                label,
                len(evals),
                tuple(Stat.of(e["lengths"][i][name] for e in evals) for i in range(len(lengths))),
            )
            for label, evals in views.items()
        )

    return NIAHTables(
        lengths=lengths,
        exact=metric("accuracy"),
        tokens=metric("token_accuracy"),
        final_loss=tuple(
            (m, Stat.of(r["final_loss"] for r in results)) for m, results in niah.items()
        ),
        minutes=tuple(training_minutes(experiment, r) for rs in niah.values() for r in rs),
    )


# A model solves S-NIAH at its training length when its exact match there, mean over seeds,
# reaches this; only such models have their extrapolation reported (issue: a model that fails
# within its training length says nothing about lengths beyond it).
SOLVED = 0.9


@dataclass(frozen=True)
class MultikeyTables:
    """Multi-key S-NIAH split at the training length: the tables within it (every model), the
    tables beyond it (only the models that solve the training length; None if none does or no
    length lies beyond), and each model's exact match within, mean over those lengths, per seed
    (for paired comparisons)."""

    train_length: int
    needles: int  # the evaluation's needle count
    within: NIAHTables
    beyond: NIAHTables | None
    solved: tuple[str, ...]
    scores: dict[str, dict[int, float]]  # {model: {seed: mean exact match within}}
    token_scores: dict[str, dict[int, float]]  # {model: {seed: mean answer-token acc. within}}


def multikey_tables(
    runs: dict[str, list[dict]], experiment: str = "niah_multikey"
) -> MultikeyTables:
    full = niah_tables(runs, experiment)
    train_length = next(iter(runs.values()))[0]["eval"]["train_length"]
    within = [i for i, n in enumerate(full.lengths) if n <= train_length]
    beyond = [i for i, n in enumerate(full.lengths) if n > train_length]
    at_train = full.lengths.index(train_length)
    solved = tuple(label for label, _, cells in full.exact if cells[at_train].mean >= SOLVED)

    def columns(indices: list[int], keep: tuple[str, ...] | None = None) -> NIAHTables:
        def pick(rows):
            return tuple(
                (label, seeds, tuple(cells[i] for i in indices))
                for label, seeds, cells in rows
                if keep is None or label in keep
            )

        return dataclasses.replace(
            full,
            lengths=tuple(full.lengths[i] for i in indices),
            exact=pick(full.exact),
            tokens=pick(full.tokens),
        )

    def seed_scores(name: str) -> dict[str, dict[int, float]]:
        return {
            model: {
                r["seed"]: statistics.mean(r["eval"]["lengths"][i][name] for i in within)
                for r in results
            }
            for model, results in runs.items()
        }

    return MultikeyTables(
        train_length=train_length,
        needles=next(iter(runs.values()))[0]["eval"]["num_needles"],
        within=columns(within),
        beyond=columns(beyond, solved) if solved and beyond else None,
        solved=solved,
        scores=seed_scores("accuracy"),
        token_scores=seed_scores("token_accuracy"),
    )


@dataclass(frozen=True)
class Curve:
    """One model's answer-token accuracy over training (teacher-forced, mean over the lengths
    within the training length), at the steps every seed evaluated."""

    model: str
    seeds: int
    steps: tuple[int, ...]
    accuracy: tuple[Stat, ...]


def niah_curves(runs: dict[str, list[dict]], lengths: tuple[int, ...]) -> list[Curve]:
    """The learning curve of every model of an S-NIAH experiment (its ``history``), on the
    evaluation ``lengths`` (those within the training length)."""
    curves = []
    for model, results in runs.items():
        by_seed = [
            {
                h["step"]: statistics.mean(
                    e["token_accuracy"] for e in h["eval"]["lengths"] if e["length"] in lengths
                )
                for h in r["history"]
            }
            for r in results
        ]
        steps = tuple(sorted(set.intersection(*(set(b) for b in by_seed))))
        accuracy = tuple(Stat.of(b[step] for b in by_seed) for step in steps)
        curves.append(Curve(model, len(results), steps, accuracy))
    return curves


@dataclass(frozen=True)
class LMRow:
    model: str
    seeds: int
    bits_per_byte: Stat
    perplexity: Stat
    tokens_per_s: float

    @property
    def ablation(self) -> bool:
        """Ablation rows are labelled ``"base+aggregation, change"``."""
        return ", " in self.model


def lm_rows(runs: dict[str, list[dict]]) -> list[LMRow]:
    return [
        LMRow(
            model=name,
            seeds=len(results),
            bits_per_byte=Stat.of(r["eval"]["bits_per_byte"] for r in results),
            perplexity=Stat.of(r["eval"]["perplexity"] for r in results),
            tokens_per_s=statistics.mean(r["tokens_per_s"] for r in results),
        )
        for name, results in runs.items()
    ]


def lm_seed_bits(runs: dict[str, list[dict]]) -> dict[str, dict[int, float]]:
    """{model: {seed: validation bits per byte}} for the verdicts."""
    return {m: {r["seed"]: r["eval"]["bits_per_byte"] for r in rs} for m, rs in runs.items()}


@dataclass(frozen=True)
class BenchTable:
    """A benchmark as a table: column keys, then (row label, one value per column)."""

    columns: tuple
    rows: tuple[tuple[str, tuple], ...]


def throughput_table(data: dict) -> BenchTable:
    """Training tokens/s per model (rows) and sequence length (columns)."""
    lengths = tuple(row["T"] for row in data["rows"])
    models = list(data["rows"][0]["models"])
    return BenchTable(
        lengths,
        tuple((m, tuple(row["models"][m]["tokens_per_s"] for row in data["rows"])) for m in models),
    )


def decode_table(data: dict) -> BenchTable:
    """(seconds per decoded token, cache bytes) per model (rows) and context (columns)."""
    contexts = tuple(row["context"] for row in data["rows"])
    models = list(data["rows"][0]["models"])
    return BenchTable(
        contexts,
        tuple(
            (
                m,
                tuple(
                    (row["models"][m]["decode_step_s"], row["models"][m]["cache_bytes"])
                    for row in data["rows"]
                ),
            )
            for m in models
        ),
    )


def ratio_table(rows: list[dict], length: str, baseline: str, group: str, key: str) -> BenchTable:
    """An op benchmark's ratios to SDPA: one row per length ``rows[i][length]``, columns the
    baseline's seconds then ``rows[i][group][name][key]`` for every name of the first row."""
    names = list(rows[0][group])
    return BenchTable(
        (baseline, *names),
        tuple(
            (
                row[length],
                (row[baseline], *(row[group].get(n, {}).get(key) for n in names)),
            )
            for row in rows
        ),
    )


@dataclass(frozen=True)
class CostRow:
    """Training minutes of one experiment, two cells at a time."""

    experiment: str
    models: int
    seeds: int
    cells: int  # (model, seed) results
    cell_minutes: float
    longest_cell: str
    longest_minutes: float

    @property
    def minutes_per_cell(self) -> float:
        return self.cell_minutes / self.cells

    @property
    def wall_minutes(self) -> float:
        return self.cell_minutes / 2

    @property
    def seed_minutes(self) -> float:
        return self.wall_minutes / self.seeds

    @property
    def over_budget(self) -> bool:
        return self.wall_minutes > BUDGET_MINUTES


def cost_row(experiment: str, runs: dict[str, list[dict]]) -> CostRow:
    minutes = {m: [training_minutes(experiment, r) for r in rs] for m, rs in runs.items()}
    longest = max(minutes, key=lambda m: max(minutes[m]))
    return CostRow(
        experiment=experiment,
        models=len(runs),
        seeds=len({r["seed"] for results in runs.values() for r in results}),
        cells=sum(len(results) for results in runs.values()),
        cell_minutes=sum(sum(v) for v in minutes.values()),
        longest_cell=longest,
        longest_minutes=max(minutes[longest]),
    )
