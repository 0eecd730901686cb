"""Markdown of the capacity-limited MQAR experiments (mqar_capacity, mqar_state_size): the
setting, the held-out table, the paired comparisons, the gates' routing and the state-size
view, from the rows of ``capacity``."""

from __future__ import annotations

from experiments.report.capacity import (
    GATE_REFERENCE,
    LEARNED,
    RECOVERED_GAIN,
    RECOVERED_RATIO,
    CapacityRow,
    DemoSeed,
    Paired,
    RoutingRow,
    StateSizeRow,
)
from experiments.report.load import MQARSetting
from experiments.report.render import stat, table


def _numbers(values) -> str:
    """'2, 4, 8 and 16'."""
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def setting(
    s: MQARSetting,
    pairs: list[int],
    seq_len: int,
    held_out: str,
    chosen: str,
    ssc: str,
    command: str,
) -> str:
    """The training and evaluation setting of mqar_capacity.

    Args:
        s: ``load.mqar_setting("mqar_capacity")``.
        pairs: the tested numbers of key-value pairs.
        seq_len: the sequence length.
        held_out: the ``growmem eval`` arguments of the held-out evaluation.
        chosen: the label of the chosen gates (the library's default; titans+grm's).
        ssc: the label of the ssc cell's gates.
        command: the sweep's command that runs every cell and seed.
    """
    trained = s.num_kv_pairs if isinstance(s.num_kv_pairs, list) else [s.num_kv_pairs]
    titans = ""
    if s.titans:
        mini_batch, eta_max, lr = s.titans
        titans = f"; titans: mini-batch {mini_batch}, inner learning rate at most {eta_max:g}"
        titans += f", AdamW {lr:g}"
    return (
        f"Setting: the `{s.task}` task base: {s.layers} layers, d_model {s.hidden_size}, "
        f"{s.heads} heads of {s.head_dim} dimensions (state {s.head_dim} x {s.head_dim} per "
        f"head and layer), vocabulary {s.vocab_size}, sequences of {seq_len} tokens, trained "
        f"on a mixture of {_numbers(trained)} key-value pairs (so queries fall in every "
        f"segment) and tested with {_numbers(pairs)}; segment {s.segment_size} for Memory "
        f"Caching ({s.segment_size // 2} pairs a segment; top-2 for ssc{titans}). AdamW "
        f"{s.lr:g}, batch {s.batch_size}, {s.steps} steps; Transformer++ "
        f"{s.transformer_heads} head(s), {s.transformer_steps} steps at {s.transformer_lr:g}"
        f"{_transformer_variants(s)}. "
        "Every gated cell pins all of its gate settings (the gate ablation's rows below; ssc "
        f"uses `{ssc}`, titans+grm and the state-size view `{chosen}`, the ablation's choice and "
        "the library's default). A seed gives the cells of one base model the same "
        "initial weights (the gates' own parameters aside) and every cell the same batches, so "
        "cells are compared seed by seed. Accuracy on held-out examples (`growmem eval "
        f"{held_out}`: {s.num_test_examples} sequences per number of pairs from a generator "
        "seed no training used, the same for every model and seed), mean ± std over seeds. "
        f"Command: `{command} && python -m experiments.report`."
    )


def _transformer_variants(s: MQARSetting) -> str:
    """'; `Transformer++, 8000 steps`: 8000 steps at 0.003' for the other Transformer++ cells
    (and the taps of their short convolution on q, k and v, where they have one)."""
    return "".join(
        f"; `{name}`: {steps} steps at {lr:g}"
        + ("" if conv is None else f" with a short convolution of {conv} taps on q, k and v")
        for name, steps, lr, conv in s.transformer_variants
    )


def _crossing(row: CapacityRow) -> str:
    if not row.crossings:
        return "n/a"  # no seed recorded its curve
    if row.crossing_step is None:
        return "-"
    reached = sum(s is not None for s in row.crossings)
    return f"{row.crossing_step:.0f} ({reached}/{len(row.crossings)})"


def main_table(rows: list[CapacityRow], pairs: list[int]) -> list[str]:
    header = [
        "model",
        "seeds",
        *(f"{p} pairs" for p in pairs),
        "all",
        "learned",
        "crossing step",
        "tokens/s",
        "min/cell",
    ]
    cells = [
        [
            r.model,
            r.seeds,
            *map(stat, r.pairs),
            stat(r.overall),
            f"{r.learned}/{r.seeds}",
            _crossing(r),
            f"{r.tokens_per_s:,.0f}",
            f"{r.minutes:.1f}",
        ]
        for r in rows
    ]
    return table(header, cells)


def main_footnote(eval_every: int) -> str:
    return (
        f"\n*learned*: seeds with held-out accuracy (all pairs) of at least {LEARNED} "
        "(chance is 1/32 = 0.031). *crossing step*: the first step at which a seed's learning "
        f"curve (evaluations every {eval_every} steps on the run's own test examples, step 0 "
        f"before training) reached {LEARNED}, median over the seeds that reached it (in "
        "brackets: those seeds / the seeds with a recorded curve); '-': none did. *min/cell*: "
        "minutes of a cell's training, its tokens at its measured rate (evaluations not "
        "included), one thread with another cell beside it."
    )


def _paired_cells(p: Paired) -> list[str]:
    spread = p.differences.std
    return [
        len(p.seeds),
        f"{p.model_score:.3f}",
        f"{p.reference_score:.3f}",
        f"{p.difference:+.3f}" + ("" if spread is None else f" ± {spread:.3f}"),
        f"{p.better}/{len(p.seeds)}",
    ]


def mc_table(found: list[Paired], measure: str = "held-out accuracy, all pairs") -> list[str]:
    """Every Memory Caching cell against its base, seed by seed, on ``measure``."""
    header = ["model", "base", "seeds", "model acc.", "base acc.", "difference", "better in"]
    return [
        f"Memory Caching against its base, seed by seed ({measure}; "
        "*difference*: mean ± std over seeds of model - base; *better in*: seeds where the "
        "model scores higher):",
        "",
        *table(header, [[p.model, p.reference, *_paired_cells(p)] for p in found]),
        "",
    ]


def demo_table(rows: list[DemoSeed], base: str, mc: str) -> list[str]:
    """The demo's outcome seed by seed: does the base fail and Memory Caching recover?"""

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    held = sum(r.outcome for r in rows)
    learned = sum(r.mc_learned for r in rows)
    body = [
        [r.seed, f"{r.base:.3f}", f"{r.mc:.3f}", yes(r.base_fails), yes(r.mc_recovers)]
        for r in rows
    ]
    header = ["seed", f"{base} acc.", f"{mc} acc.", "base fails", "MC recovers"]
    return [
        f"The demo's outcome over seeds (`make demo` trains {base} and, with the library's "
        f"default gates, the cell `{mc}` as this sweep's seed 0; held-out accuracy, all pairs). "
        f"*base fails*: below "
        f"{LEARNED}; *MC recovers*: at least {RECOVERED_RATIO:g}x the base and "
        f"{RECOVERED_GAIN:+g} above it. The outcome (both) holds in **{held}/{len(rows)}** "
        f"seeds; Memory Caching reaches {LEARNED} in {learned}/{len(rows)}.",
        "",
        *table(header, body),
        "",
    ]


def gate_table(rows: list[tuple[str, Paired | None]], settings: dict[str, dict]) -> list[str]:
    """The gate ablation: every gate setting of gated_delta+grm against GATE_REFERENCE."""
    header = ["gates", "model.memory settings", "seeds", "acc.", "reference acc.", "difference"]
    cells = []
    for label, found in rows:
        pinned = " ".join(f"{k}={v}" for k, v in settings[label].items())
        if found is None:
            cells.append([label, pinned, "(reference)", "", "", "", ""])
        else:
            cells.append([label, pinned, *_paired_cells(found)])
    return [
        f"Gate ablation: gated_delta+grm with each gate setting against `{GATE_REFERENCE}` "
        "(growmem's former default, r = ⟨u, c⟩ / √D), seed by seed. The gate settings a row "
        "does not name are pinned as the reference's (`experiments.sweep.gate_overrides`): no "
        "normalisation, scale 1/√D, no temperature, no online bias, summaries of the memory "
        "keys, with gradient:",
        "",
        *table([*header, "better in"], cells),
        "",
    ]


def _change(start: dict | None, end: dict, name: str) -> str:
    before = "-" if start is None else f"{start[name].mean:.3f}"
    return f"{before} → {end[name].mean:.3f}"


def routing_table(rows: list[RoutingRow]) -> list[str]:
    header = ["model", "layer", "seeds", "entropy", "right_top", "chance", "online weight"]
    cells = [
        [
            r.model,
            r.layer,
            r.seeds,
            _change(r.start, r.end, "entropy"),
            _change(r.start, r.end, "right_top"),
            f"{r.end['chance'].mean:.3f}",
            _change(r.start, r.end, "online_weight"),
        ]
        for r in rows
    ]
    return [
        "How the gates route, before training (step 0, the run's own test examples) → at the "
        "end (held-out), means over seeds. *entropy*: of the gate weights over the memories a "
        "token weighs, normalised (1 = uniform, 0 = one memory); *right_top*: how often the "
        "cache of the segment holding the queried pair has the largest gate weight; *chance*: "
        "the mean of 1 / (memories weighed), right_top under random gates; *online weight*: "
        "the mean weight of the online memory.",
        "",
        *table(header, cells),
        "",
    ]


def state_size_table(rows: list[StateSizeRow]) -> list[str]:
    hardest = rows[0].hardest_pairs
    header = ["model", "head dim D", "state per head and layer", "seeds", f"{hardest} pairs"]
    cells = [
        [
            r.series,
            "-" if r.head_dim is None else r.head_dim,
            "key-value cache" if r.head_dim is None else f"{r.head_dim} x {r.head_dim}",
            r.seeds,
            stat(r.hardest),
            stat(r.overall),
        ]
        for r in rows
    ]
    return table([*header, "all"], cells)


def probe_line(recalls: dict[int, tuple[float, float]], pairs: int, segment_size: int) -> str:
    """The no-training probe beside the state-size table.

    Args:
        recalls: {head dimension: (the memory's own, the oracle cache's) recall of ``pairs``}.
        pairs: the number of pairs the recalls are of.
        segment_size: the probe's (and the trained cells') segment, in tokens.
    """
    found = ", ".join(f"D = {d}: {own:.2f} / {oracle:.2f}" for d, (own, oracle) in recalls.items())
    return (
        f"No-training probe at the same segment ({segment_size} tokens): recall of {pairs} "
        "pairs by the memory itself / by an oracle that reads the cache of the pair's segment, "
        f"{found} (`growmem probe capacity --head-dim D --segment-size {segment_size} --filler "
        "1 --draws 50 --pairs 4 8 12 16`, results/probe). Where the memory alone recalls nearly "
        "every pair, a trained base far below it failed to learn the task, not to store it."
    )


def long_intro(steps: int, capacity_steps: int, command: str) -> str:
    return (
        f"mqar_capacity's base and its grm with the default gates trained for {steps} steps "
        f"rather than {capacity_steps} (every other setting, the seeds and so the initial "
        "weights are mqar_capacity's; the learning-rate schedule spans the longer run): does "
        "the base leave MQAR's plateau given the steps, and does caching still lift it then? "
        "The no-training probe above bounds what the base's memory can hold. Held-out "
        f"evaluation as above. Command: `{command} && python -m experiments.report`."
    )


def state_size_intro(held_out: str, capacity_head_dim: int, command: str) -> str:
    return (
        "The paper's MQAR view: held-out accuracy against the size of the recurrent state, at "
        "the same pairs. The head dimension D sets the state (D x D per head and layer); "
        f"every other setting is mqar_capacity's, whose cells give D = {capacity_head_dim}. "
        "Transformer++ (mqar_capacity's) is the reference: its state, the key-value cache, "
        f"grows with the context. Held-out evaluation `growmem eval {held_out}`, mean ± std "
        f"over seeds. Command: `{command} && python -m experiments.report`."
    )
