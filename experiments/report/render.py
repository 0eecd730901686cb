"""Markdown of docs/results.md: settings, tables, figures, verdicts and commands.

Sections read their numbers from ``tables`` and ``verdicts``; how a setting was calibrated
and what the numbers mean are dated notes under docs/notes/, linked from here, not text in
this code.
"""

from __future__ import annotations

import statistics

from experiments.report.load import MQARSetting
from experiments.report.tables import (
    BUDGET_MINUTES,
    CROSSED,
    SOLVED,
    BenchTable,
    CostRow,
    Curve,
    GridTable,
    LMRow,
    MQARRow,
    MultikeyTables,
    NIAHTables,
    Stat,
)

# The dated notes a section links to (paths relative to docs/).
NOTES = {
    "capacity": "notes/2026-12-capacity-calibration.md",
    "mqar": "notes/2026-11-mqar-calibration.md",
    "niah": "notes/2026-11-niah-calibration.md",
    "niah_multikey": "notes/2026-12-niah-multikey-calibration.md",
    "cost": "notes/2026-11-experiment-budget.md",
    "reading": "notes/2026-12-capacity-results.md",
    "speed": "notes/2026-11-speed-log.md",
}


def stat(s: Stat) -> str:
    """mean ± std over seeds (the mean alone for one seed)."""
    return f"{s.mean:.3f}" if s.std is None else f"{s.mean:.3f} ± {s.std:.3f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table (cells already formatted)."""
    return [
        f"| {' | '.join(header)} |",
        "|" + "---|" * len(header),
        *(f"| {' | '.join(str(c) for c in row)} |" for row in rows),
    ]


def seeds_text(seeds) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def note_link(key: str, what: str) -> str:
    return f"{what}: [{NOTES[key]}]({NOTES[key]})."


def not_measured(command: str) -> list[str]:
    return [f"Not measured yet: run `{command}`.", ""]


def control_intro() -> str:
    """What the `mqar` experiment is now: the setting without capacity pressure."""
    return (
        "The no-pressure control: 2 heads of 64 dimensions hold 8 pairs with room to spare "
        "(with no training, the base memory, uniform averaging and an oracle that reads the "
        "right segment all recall 1.00 at D = 64, P = 8), so Memory Caching has nothing to add "
        "here. Its training always uses 8 pairs, whose 16-token context fills the first "
        "segment exactly, so no training query falls in that segment, the one holding the "
        "pairs; on the 4-pair test slice many do. " + note_link("capacity", "The probe")
    )


def small_state_intro() -> str:
    """What the `mqar_small_state` experiment is now: an earlier, superseded setting."""
    return (
        "An earlier setting with a state too small for the pairs, superseded by "
        "`mqar_capacity` above: trained with 16 pairs only (no training query falls in a "
        "segment that holds pairs), growmem's former default gates (1/√D), 3 seeds not paired, "
        "no held-out generator seed."
    )


def mqar_setting(s: MQARSetting, pairs: list[int], seq_len: int) -> str:
    preset = f"the `{s.task}` task base" + (
        f" with `{' '.join(s.extra_overrides)}`" if s.extra_overrides else ""
    )
    titans = ""
    if s.titans:
        mini_batch, eta_max, lr = s.titans
        titans = (
            f"; titans: mini-batch {mini_batch}, inner learning rate at most {eta_max:g}, "
            f"AdamW {lr:g}"
        )
    filler = "random tokens" if s.random_filler else "token 0"
    return (
        f"Setting: {preset}: {s.layers} layers, d_model {s.hidden_size}, {s.heads} heads, "
        f"vocabulary {s.vocab_size}, sequences of {seq_len} tokens with {filler} between the "
        f"queries, trained with {s.num_kv_pairs} key-value pairs and tested with {pairs}; "
        f"segment {s.segment_size} for Memory Caching (top-2 for ssc{titans}). AdamW {s.lr:g}, "
        f"batch {s.batch_size}, {s.steps} steps; Transformer++ {s.transformer_heads} head(s) "
        f"and {s.transformer_steps} steps at {s.transformer_lr:g}, because softmax attention "
        "passes MQAR's phase transition much later. Accuracy of the value predictions on "
        f"{s.num_test_examples} test sequences per setting, mean ± std over seeds. Command: "
        f"`python -m experiments.sweep {s.experiment} && python -m experiments.report`."
    )


def mqar_table(rows: list[MQARRow], pairs: list[int]) -> list[str]:
    header = ["model", "seeds", "crossed", *(f"{p} pairs" for p in pairs), "all", "tokens/s"]
    cells = []
    for row in rows:
        if row.post_training:
            label, crossed, speed = (
                f"{row.model}, post-training MC (`{row.post_training}`)",
                ("(same models)"),
                "-",
            )
        else:
            label, speed = row.model, f"{row.tokens_per_s:,.0f}"
            crossed = "-" if row.crossed is None else row.crossed
        cells.append([label, row.seeds, crossed, *map(stat, row.pairs), stat(row.overall), speed])
    return table(header, cells)


def crossed_footnote(trained_pairs: int) -> str:
    return (
        f"\n*crossed*: seeds past MQAR's phase transition, i.e. with accuracy of at least "
        f"{CROSSED} at the training setting ({trained_pairs} pairs). A seed either "
        "crosses or stays near chance, so a mean over few seeds mostly counts crossings."
    )


def sweep_command(experiment: str, seeds: int | None = None) -> str:
    """The sweep's command for ``experiment``; ``seeds``: run seeds 0 .. seeds-1 rather than
    the sweep's default seeds."""
    command = f"python -m experiments.sweep {experiment}"
    return command if seeds is None else f"{command} --seeds {' '.join(map(str, range(seeds)))}"


def unfinished(experiment: str, runs: dict, missing: list[str], seeds: int | None = None):
    """Lines naming models with fewer seeds than ``seeds`` (None: the sweep's default 3) and
    models without any result, with the command that runs them."""
    command = sweep_command(experiment, seeds)
    seeds = 3 if seeds is None else seeds
    lines = []
    few = [m for m, results in runs.items() if len(results) < seeds]
    if few:
        lines.append(
            f"\nFewer than {seeds} seeds so far for {len(few)} of {len(runs)} models (the seeds "
            f"column); `{command}` finishes them."
        )
    if missing:
        lines.append(
            f"\nNot run yet in this setting: {', '.join(f'`{m}`' for m in missing)} "
            f"(`{command}` runs them)."
        )
    return lines


def grid_section(tables: tuple[GridTable, GridTable], slices, segment: int) -> list[str]:
    lengths = sorted({n for n, _ in slices})
    pairs = sorted({k for _, k in slices})
    extrapolation, load = tables
    lines = [
        f"The same models (trained at 64 tokens with 8 pairs), tested on {len(slices)} slices "
        f"of `growmem eval --lengths {' '.join(map(str, lengths))} --kv-pairs "
        f'{" ".join(map(str, pairs))}`. "post-training MC" evaluates a base model with '
        f"`--post-training-mc {segment}`: segments of {segment} tokens cached and averaged "
        "uniformly at inference only, no training.",
        "",
        f"Length extrapolation at {extrapolation.columns[0][1]} pairs:",
        "",
        *_grid_table(extrapolation, [f"{n} tokens" for n, _ in extrapolation.columns]),
        "",
        f"Memory load at {load.columns[0][0]} tokens:",
        "",
        *_grid_table(load, [f"{k} pairs" for _, k in load.columns]),
        "",
    ]
    return lines


def _grid_table(grid: GridTable, header: list[str]) -> list[str]:
    rows = [[label, seeds, *map(stat, cells)] for label, seeds, cells in grid.rows]
    return table(["model", "seeds", *header], rows)


def niah_setting(cell, config, transformer_train, tables: NIAHTables) -> str:
    model, task, train = config.model, config.task, config.train
    loss = "every token of an example" if task.train_on_prompt else "the answer's tokens"
    minutes = tables.minutes
    span = _minutes_span(minutes)
    models = len(tables.final_loss)
    return (
        f"Setting: `growmem train {cell.task} --model {cell.model}` with "
        f"`{' '.join(cell.overrides)}`: "
        f"{model['num_hidden_layers']} layers, d_model {model['hidden_size']}, "
        f"{model['num_heads']} heads, {task.tokenizer} tokens; S-NIAH-{task.variant} (a 7-digit "
        f"value hidden in a repeated noise haystack), trained at {task.seq_len} tokens with the "
        f"loss on {loss}, {task.num_train_examples:,} examples (each seen once), AdamW "
        f"{train.lr:g}, batch {train.batch_size}, {train.steps} steps (Transformer++: "
        f"{transformer_train.steps} steps at {transformer_train.lr:g}); segment "
        f"{model['memory']['caching']['segment_size']} for Memory Caching. Exact match of the "
        "value generated greedily for as many tokens as the answer has (the models are not "
        "trained to end "
        "it), and the teacher-forced accuracy of the answer's 8 tokens (a space and 7 digits; "
        f"chance about (1 + 7 x 0.1) / 8 = 0.21), over {task.num_eval_examples} needle depths "
        "per length. Command: `python -m experiments.sweep niah && python -m "
        f"experiments.report`. Training takes {span} minutes a cell on one thread (from the "
        f"cells' token rates), {sum(minutes) / len(minutes) * models / 2:.0f} minutes a seed "
        "with two cells at a time."
    )


def niah_tables(tables: NIAHTables, loss: bool = True, prior: str = "chance about 0.21"):
    """The exact-match and answer-token tables (``prior``: what guessing scores on the
    latter), and with ``loss`` the last training losses against the 7 digits' prior."""
    lines = []
    for rows, title in (
        (tables.exact, "Exact match of the generated value"),
        (tables.tokens, f"Answer-token accuracy, teacher-forced ({prior})"),
    ):
        cells = [[label, seeds, *map(stat, per_length)] for label, seeds, per_length in rows]
        lines += [f"{title}:", "", *table(["model", "seeds", *map(str, tables.lengths)], cells)]
        lines.append("")
    if not loss:
        return lines
    losses = ", ".join(f"{model} {stat(s)}" for model, s in tables.final_loss)
    lines += [
        "Training loss on the answer's tokens at the last step (a batch of 16 unseen "
        f"examples; the digits' prior gives 7 ln(10) / 8 = 2.01): {losses}.",
        "",
    ]
    return lines


def _minutes_span(minutes) -> str:
    low, high = min(minutes), max(minutes)
    return f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"


def multikey_setting(experiment: str, cell, config, transformer_train, tables: NIAHTables) -> str:
    model, task, train = config.model, config.task, config.train
    counts = task.num_needles if isinstance(task.num_needles, list) else [task.num_needles]
    needles = max(counts) if task.eval_num_needles is None else task.eval_num_needles
    if task.curriculum_steps is None:
        schedule = f"{'/'.join(map(str, counts))} needles per example"
    else:
        stages = [f"{k} from step {s}" for k, s in zip(counts, task.curriculum_steps, strict=True)]
        schedule = f"needles per example by step: {', '.join(stages)}"
    return (
        f"Setting: `growmem train {cell.task} --model {cell.model}` with "
        f"`{' '.join(cell.overrides)}`: {model['num_hidden_layers']} layers, d_model "
        f"{model['hidden_size']}, {model['num_heads']} heads, tokens of {task.tokenizer!r} (the "
        "task's BPE: a word per token, a digit per token); S-NIAH-"
        f"{task.variant} with {needles} needles (RULER's niah_multikey_1 style: distinct keys and "
        "7-digit values in the repeated noise haystack; the question asks for one), trained at "
        f"{task.seq_len} tokens, {schedule} ({task.num_train_examples:,} fresh examples per "
        f"stage), loss on the answer's tokens, AdamW {train.lr:g}, batch {train.batch_size}, "
        f"{train.steps} steps (Transformer++: {transformer_train.steps} steps at "
        f"{transformer_train.lr:g}); segment {model['memory']['caching']['segment_size']} for "
        f"Memory Caching. Evaluated with {needles} needles: exact match of the value generated "
        "greedily, and the teacher-forced accuracy of the answer's 8 tokens (chance about 0.21), "
        f"over {task.num_eval_examples} needle depths per length. Command: `python -m "
        f"experiments.sweep {experiment} && python -m experiments.report`. Training takes "
        f"{_minutes_span(tables.minutes)} minutes a cell on one thread (from the cells' token "
        "rates)."
    )


# A UUID's characters (31-37 tokens in the task's BPE: a digit a token, letters one or a few).
# Accuracy a model reaches per character from the format alone: 4 dashes and the version digit
# are fixed, the variant digit is one of 4, the other 30 characters one of 16.
UUID_LENGTH = 36
UUID_PRIOR = (5 + 1 / 4 + 30 / 16) / UUID_LENGTH


def uuid_setting(
    cell, config, attention, tables: NIAHTables, probe: tuple[float, float] | None
) -> str:
    """The niah_uuid setting: ``cell`` and ``config`` the base's, ``attention`` the
    Transformer++ cell's RunConfig, ``probe`` the no-training probe's (memory, oracle cache)
    recall of UUID_LENGTH pairs (one a character) at this head size and segment (None: not run)."""
    model, task, train = config.model, config.task, config.train
    head, segment = model["head_dim"], model["memory"]["caching"]["segment_size"]
    command = (
        f"`growmem probe capacity --head-dim {head} --segment-size {segment} --pairs "
        f"{UUID_LENGTH} --filler 0 --draws 50 --out results/probe/niah_uuid`"
    )
    if probe is None:
        headroom = f"The no-training probe at this head size is not run yet: {command}."
    else:
        memory, oracle = probe
        headroom = (
            f"The no-training probe at this head size ({UUID_LENGTH} random pairs, one a "
            f"character, one write a token, segment {segment}; {command}) recalls "
            f"{memory:.2f} from the memory and {oracle:.2f} from an oracle that reads the right "
            f"segment's cache: {oracle / memory:.1f}x headroom."
        )
    return (
        f"Setting: `growmem train {cell.task} --model {cell.model}` with "
        f"`{' '.join(cell.overrides)}`: {model['num_hidden_layers']} layers, d_model "
        f"{model['hidden_size']}, {model['num_heads']} heads of {head} (a {head} x {head} memory "
        "per head and layer), the task's BPE "
        f"(a digit a token, letters one or a few); S-NIAH-{task.variant} style (RULER's "
        f"niah_single_3): one needle whose value is a UUID ({UUID_LENGTH} characters), a copy "
        "the state must hold "
        f"through the haystack after it, trained at {task.seq_len} tokens on "
        f"{task.num_train_examples:,} fresh examples, loss on the answer's tokens, AdamW "
        f"{train.lr:g}, batch {train.batch_size}, {train.steps} steps (Transformer++ with the "
        f"short convolution: {attention.train.steps} steps at {attention.train.lr:g}); segment "
        f"{segment} for Memory Caching. {headroom} Exact match of the UUID generated greedily, "
        "and the teacher-forced accuracy of its tokens (the format alone gives about "
        f"{UUID_PRIOR:.2f} a character), over "
        f"{task.num_eval_examples} needle depths per length. Command: `python -m "
        "experiments.sweep niah_uuid && python -m experiments.report`. Training takes "
        f"{_minutes_span(tables.minutes)} minutes a cell on one thread (from the cells' token "
        "rates)."
    )


def niah_curves(curves: list[Curve], lengths: str) -> list[str]:
    """Answer-token accuracy over training, mean ± std over seeds."""
    steps = sorted(set().union(*(c.steps for c in curves)))
    rows = []
    for c in curves:
        at = dict(zip(c.steps, c.accuracy, strict=True))
        rows.append([c.model, c.seeds, *(stat(at[s]) if s in at else "-" for s in steps)])
    return [
        f"Answer-token accuracy over training (teacher-forced, mean of {lengths} tokens; step 0 "
        "is the initial model):",
        "",
        *table(["model", "seeds", *(f"step {s}" for s in steps)], rows),
        "",
    ]


def multikey_mixups(mixups: dict | None, experiment: str, needles: int) -> list[str]:
    """Where the answers within the training length come from (experiments.niah_mixups, when
    run for ``experiment``): the queried value, another needle's, or neither."""
    measured = (mixups or {}).get("experiments", {}).get(experiment, {})
    if not measured.get("cells"):
        return []
    lengths = ", ".join(map(str, measured["lengths"]))
    lines = [
        f"Where the greedy answers come from (mean over seeds and {lengths} tokens; `python -m "
        "experiments.niah_mixups`): the queried needle's value (exact match), another needle's "
        "value (the model read a needle, but not the one asked for), or neither. A model that "
        f"copies one of the {needles} needles at random scores {1 / needles:.2f} / "
        f"{1 - 1 / needles:.2f} / 0, and teacher-forced (handed the right first digit, it "
        "copies the right needle from there) about (7 + 1/K) / 8 = "
        f"{(7 + 1 / needles) / 8:.2f} of the answer's 8 tokens: the answer-token accuracy "
        "above cannot tell it from a model that reads the needle asked for.",
        "",
        "| model | seeds | queried value | another needle's value | neither |",
        "|---|---|---|---|---|",
    ]
    for model, seeds in measured["cells"].items():
        right = statistics.mean(s["accuracy"] for s in seeds.values())
        mixed = statistics.mean(s["distractor_rate"] for s in seeds.values())
        lines.append(
            f"| {model} | {len(seeds)} | {right:.3f} | {mixed:.3f} | {1 - right - mixed:.3f} |"
        )
    return [*lines, ""]


def niah_routing(mixups: dict | None, experiment: str) -> list[str]:
    """The gates' routing at the answer's tokens of every gated cell of ``experiment``
    (experiments.niah_mixups, when run), per layer, mean over seeds."""
    measured = (mixups or {}).get("experiments", {}).get(experiment, {})
    cells = {
        model: [s["gates"] for s in seeds.values() if "gates" in s]
        for model, seeds in measured.get("cells", {}).items()
    }
    cells = {model: gates for model, gates in cells.items() if gates}
    if not cells:
        return []
    lengths = ", ".join(map(str, next(iter(cells.values()))[0]["lengths"]))
    rows = []
    for model, gates in cells.items():
        for layer in range(len(gates[0]["layers"])):
            mean = {
                key: statistics.mean(g["layers"][layer][key] for g in gates)
                for key in ("right_top", "right_weight", "chance", "online_weight", "entropy")
            }
            rows.append(
                [model, len(gates), layer]
                + [f"{mean[k]:.3f}" for k in ("right_top", "right_weight", "chance")]
                + [f"{mean[k]:.3f}" for k in ("online_weight", "entropy")]
            )
    header = ["model", "seeds", "layer", "right cache on top", "its weight", "uniform"]
    return [
        f"Where the gates look while the answer is read (teacher-forced, {lengths} tokens; "
        "`python -m experiments.niah_mixups "
        f"{experiment}`): at each answer token whose needle copy sits in an earlier segment, "
        "how often the cache of that segment gets the largest weight, its mean weight, and "
        "that weight under uniform gates (1 / the memories weighed; for ssc, which weighs "
        "only the caches it selected and the online memory, the weight the right cache would "
        "get if it were always selected); the online memory's mean weight and the gates' "
        "entropy (1 = uniform) over all tokens that see a cache. Mean over seeds.",
        "",
        *table([*header, "online weight", "entropy"], rows),
        "",
    ]


def multikey_beyond(found: MultikeyTables, prior: str = "chance about 0.21") -> list[str]:
    """Extrapolation, only for the models that solve the training length (``prior`` as in
    `niah_tables`)."""
    if found.beyond is None:
        return [
            f"Beyond the training length: not reported, as no model solves {found.train_length} "
            f"tokens (exact match at least {SOLVED} there, mean over seeds).",
            "",
        ]
    return [
        f"Beyond the training length (extrapolation), only for the models that solve "
        f"{found.train_length} tokens (exact match at least {SOLVED} there, mean over seeds):",
        "",
        *niah_tables(found.beyond, loss=False, prior=prior),
    ]


def lm_setting(config) -> str:
    model, task, train = config.model, config.task, config.train
    tokens = train.steps * train.batch_size * task.seq_len
    return (
        f"Setting: the `lm` task base: {model['num_hidden_layers']} layers, d_model "
        f"{model['hidden_size']}, {model['num_heads']} heads, {task.tokenizer} tokens, blocks of "
        f"{task.seq_len} from the running Python's standard library source (file-level split); "
        f"segment {model['memory']['caching']['segment_size']}, top-2 for ssc. AdamW "
        f"{train.lr:g}, batch {train.batch_size}, {train.steps} steps "
        f"({tokens / 1e6:.1f}M tokens) for every model. "
        f"Validation bits per byte on {task.eval_blocks} held-out blocks (lower is better). "
        "Command: `python -m experiments.sweep lm && python -m experiments.report`."
    )


def lm_tables(rows: list[LMRow], segment_size: int) -> list[str]:
    header = ["model", "seeds", "val bits/byte", "val ppl (tokens)", "tokens/s"]

    def cells(row):
        bits, ppl = stat(row.bits_per_byte), stat(row.perplexity)
        return [row.model, row.seeds, bits, ppl, f"{row.tokens_per_s:,.0f}"]

    main = [r for r in rows if not r.ablation]
    ablations = [r for r in rows if r.ablation]
    lines = [*table(header, [cells(r) for r in main]), ""]
    if ablations:
        reference = [r for r in main if r.model == "gated_delta+grm"]
        lines += [
            f"Ablations of gated_delta+grm (reference: segment {segment_size}, continuous "
            "init, mean summaries). Log-Linear++ (`loglinear`) replaces constant segments by "
            "logarithmic ones: a token that sees n finished segments reads them as the binary "
            "decomposition of n (buckets of 8, 4, 2, 1 segments for n = 15), so it is compared "
            "with grm at the same segment 32:",
            "",
            *table(header, [cells(r) for r in reference + ablations]),
            "",
        ]
    return lines


def throughput(data: dict, bench: BenchTable) -> list[str]:
    return [
        "Training throughput (tokens/s, fwd+bwd of the whole model, batch 1, "
        f"{data['setting']['hidden']} wide, {data['setting']['layers']} layers; "
        "`python -m benchmarks.bench_train_throughput`; the models run interleaved in "
        "one process, so compare within a column: absolute numbers move with the "
        "machine's load):",
        "",
        *table(
            ["model", *(f"T={n}" for n in bench.columns)],
            [[m, *(f"{x:,.0f}" for x in values)] for m, values in bench.rows],
        ),
        "",
    ]


def decode(data: dict, bench: BenchTable) -> list[str]:
    s = data["setting"]
    return [
        f"Decoding one token after a context of n tokens (ms per token, cache MiB; hidden "
        f"{s['hidden']}, {s['layers']} layers, segment {s['segment_size']}, {s['threads']} "
        "thread; `python -m benchmarks.bench_models`):",
        "",
        *table(
            ["model", *(f"n={n}" for n in bench.columns)],
            [
                [m, *(f"{sec * 1e3:.1f} ms, {size / 2**20:.1f} MiB" for sec, size in values)]
                for m, values in bench.rows
            ],
        ),
        "",
        "![decode latency and cache size](../results/models_decode.png)",
        "",
    ]


def ratios(title: str, bench: BenchTable, length: str, baseline: str, micro: bool = False):
    """An op benchmark: the baseline's time (seconds, or µs when ``micro``), then every other
    column as a ratio to it."""

    def time(x: float) -> str:
        return f"{x * 1e6:,.0f} µs" if micro else f"{x:.3g} s"

    rows = [
        [n, time(values[0]), *("-" if x is None else f"{x:.2f}×" for x in values[1:])]
        for n, values in bench.rows
    ]
    return [f"{title}:", "", *table([length, baseline, *bench.columns[1:]], rows), ""]


def threads(n: int) -> str:
    return f"{n} thread{'s' if n > 1 else ''}"


COST_HEADER = [
    "experiment",
    "models",
    "seeds",
    "cells",
    "minutes a cell",
    "cell-minutes",
    "wall minutes",
    "a seed",
]


def cost(rows: list[CostRow]) -> list[str]:
    cells = [
        [r.experiment, r.models, r.seeds, r.cells, f"{r.minutes_per_cell:.1f}"]
        + [f"{x:.0f}" for x in (r.cell_minutes, r.wall_minutes, r.seed_minutes)]
        + [f"{r.longest_cell}, {r.longest_minutes:.0f} min"]
        for r in rows
    ]
    lines = [
        "## 5. Cost",
        "",
        "Training time of each experiment, from every cell's steps and mean token rate (one "
        "thread a cell, evaluation not included), against a budget of "
        f"{BUDGET_MINUTES} minutes an experiment on this 2-core CPU. The wall time assumes "
        "the sweep's two cells at a time.",
        "",
        *table([*COST_HEADER, "longest cell"], cells),
    ]
    over = [r for r in rows if r.over_budget]
    if over:
        lines += [
            "",
            "Over the budget: "
            + ", ".join(f"{r.experiment} ({r.wall_minutes:.0f} minutes)" for r in over)
            + ". A rerun skips the cells whose JSON exists, so `make results` can be finished "
            "across sittings. " + note_link("cost", "Why the cells take that long"),
        ]
    lines.append("")
    return lines
