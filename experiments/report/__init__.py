"""Build docs/results.md (settings, tables, plots, verdicts) from the JSON under results/.

    python -m experiments.report

Reads results/experiments/*/*/seed*.json (experiments.sweep) and the benchmarks' JSON
(results/*.json); a section whose data is missing says so. Modules: ``load`` (result files
and the sweep's settings), ``tables`` and ``capacity`` (structured rows), ``verdicts`` (the
paper's claims judged), ``render``, ``render_capacity`` and ``render_verdicts`` (markdown),
``plots`` (figures).
"""

from __future__ import annotations

from experiments.report import (
    capacity,
    load,
    plots,
    render,
    render_capacity,
    render_verdicts,
    tables,
    verdicts,
)
from experiments.report.load import Sources
from experiments.sweep import SEEDS

EXPERIMENTS = [
    "mqar_capacity",
    "mqar_state_size",
    "mqar_capacity_long",
    "mqar",
    "mqar_small_state",
    "niah",
    "niah_multikey",
    "niah_multikey_long",
    "niah_uuid",
    "lm",
]
# seeds the capacity experiments are reported over (paired): as many as the sweep runs
PAIRED_SEEDS = len(SEEDS["mqar_capacity"])


def capacity_section(src: Sources, lines: list[str]) -> capacity.Runs:
    """mqar_capacity: setting, held-out table, paired comparisons, routing and plots, appended
    to ``lines``; returns its runs (empty before any result)."""
    runs = src.experiment("mqar_capacity")
    lines += ["### A state too small for the pairs (`mqar_capacity`)", ""]
    command = render.sweep_command("mqar_capacity", PAIRED_SEEDS)
    if not runs:
        lines += render.not_measured(command)
        return runs
    pairs = capacity.tested_pairs(runs)
    seq_len = load.held_out(next(iter(runs.values()))[0])["slices"][0]["seq_len"]
    setting = load.mqar_setting("mqar_capacity")
    settings, chosen = load.gate_settings()
    held_out = " ".join(load.held_out_arguments())
    rows = capacity.capacity_rows(runs)
    scores = capacity.seed_scores(runs)
    lines += [
        render_capacity.setting(
            setting, pairs, seq_len, held_out, chosen, load.ssc_gates(), command
        ),
        "",
        render.note_link("capacity", "The no-training probe and the calibration runs"),
        "",
        *render_capacity.main_table(rows, pairs),
        render_capacity.main_footnote(setting.eval_every),
        *render.unfinished(
            "mqar_capacity", runs, load.missing_models("mqar_capacity", runs), PAIRED_SEEDS
        ),
        "",
    ]
    comparisons, ablation = capacity.mc_comparisons(scores), capacity.gate_ablation(scores)
    if comparisons:
        lines += render_capacity.mc_table(comparisons)
    demo_mc = capacity.gated_cell("grm", chosen)
    demo = capacity.demo_seeds(scores, "gated_delta", demo_mc)
    if demo:
        lines += render_capacity.demo_table(demo, "gated_delta", demo_mc)
    if any(found for _, found in ablation):
        lines += render_capacity.gate_table(ablation, settings)
    routing = capacity.routing_rows(runs)
    if routing:
        lines += render_capacity.routing_table(routing)
    best = tables.best_mc(scores)
    shown = [m for b in verdicts.FAMILIES if b in runs for m in (b, best.get(b)) if m]
    shown += [m for m in runs if load.is_transformer(m)]
    plots.capacity_recall(src.img / "mqar_capacity_recall.png", rows, pairs, shown)
    family = [m for m in runs if m == "gated_delta" or tables.mc_base(m) == "gated_delta"]
    gated = [r.model for r in routing if r.layer == 0]
    plots.capacity_curves(src.img / "mqar_capacity_curves.png", runs, family, gated)
    lines += [
        "![held-out accuracy against key-value pairs](img/mqar_capacity_recall.png)",
        "",
        "![learning curves and gate entropy over training](img/mqar_capacity_curves.png)",
        "",
    ]
    return runs


def state_size_section(src: Sources, capacity_runs: capacity.Runs, lines: list[str]) -> None:
    """mqar_state_size: held-out accuracy against head dimension, table and plot."""
    lines += ["### Accuracy against state size (`mqar_state_size`)", ""]
    runs = src.experiment("mqar_state_size")
    command = render.sweep_command("mqar_capacity mqar_state_size", PAIRED_SEEDS)
    if not runs:
        lines += render.not_measured(command)
        return
    both = {"mqar_capacity": capacity_runs, "mqar_state_size": runs}
    rows = capacity.state_size_rows(both, load.state_size_cells())
    head_dim = load.mqar_setting("mqar_capacity").head_dim
    lines += [
        render_capacity.state_size_intro(" ".join(load.held_out_arguments()), head_dim, command),
        "",
        *render_capacity.state_size_table(rows),
        *_probe_lines(src, rows),
        *render.unfinished(
            "mqar_state_size", runs, load.missing_models("mqar_state_size", runs), PAIRED_SEEDS
        ),
        "",
        "![held-out accuracy against state size](img/mqar_state_size.png)",
        "",
    ]
    plots.state_size(src.img / "mqar_state_size.png", rows)


def long_section(src: Sources, lines: list[str]) -> None:
    """mqar_capacity_long: the base and the default grm of mqar_capacity trained longer."""
    lines += ["### Longer training (`mqar_capacity_long`)", ""]
    runs = src.experiment("mqar_capacity_long")
    command = render.sweep_command("mqar_capacity_long", PAIRED_SEEDS)
    if not runs:
        lines += render.not_measured(command)
        return
    steps = load.cell_config("mqar_capacity_long", "gated_delta").train.steps
    rows = capacity.capacity_rows(runs)
    lines += [
        render_capacity.long_intro(steps, load.mqar_setting("mqar_capacity").steps, command),
        "",
        *render_capacity.main_table(rows, capacity.tested_pairs(runs)),
        *render.unfinished(
            "mqar_capacity_long",
            runs,
            load.missing_models("mqar_capacity_long", runs),
            PAIRED_SEEDS,
        ),
        "",
    ]
    comparisons = capacity.mc_comparisons(capacity.seed_scores(runs))
    if comparisons:
        lines += render_capacity.mc_table(comparisons)


def _probe_lines(src: Sources, rows: list[capacity.StateSizeRow]) -> list[str]:
    """The no-training probe's recall at the state-size view's head dimensions, where run."""
    segment_size = load.mqar_setting("mqar_capacity").segment_size
    pairs = rows[0].hardest_pairs
    recalls = {
        d: found
        for d in sorted({r.head_dim for r in rows if r.head_dim is not None})
        if (probe := src.capacity_probe(d, segment_size))
        and (found := capacity.probe_recall(probe, pairs))
    }
    return ["", render_capacity.probe_line(recalls, pairs, segment_size)] if recalls else []


def mqar_section(
    src: Sources, experiment: str, heading: str, lines: list[str], intro: str | None = None
) -> list:
    """One MQAR experiment's setting, table and plot, appended to ``lines``.

    Returns:
        [(where, {model: {seed: accuracy}})] for the verdicts (empty before any result).
    """
    runs = src.experiment(experiment)
    lines += [heading, ""]
    if intro:
        lines += [intro, ""]
    if not runs:
        lines += render.not_measured(f"python -m experiments.sweep {experiment}")
        return []
    first = next(iter(runs.values()))[0]["eval"]["slices"]
    pairs, seq_len = [s["num_kv_pairs"] for s in first], first[0]["seq_len"]
    setting = load.mqar_setting(experiment)
    rows = tables.mqar_rows(runs, pairs, setting.num_kv_pairs)
    lines += [
        render.mqar_setting(setting, pairs, seq_len),
        "",
        render.note_link("mqar", "How this setting was chosen (calibration runs and probes)"),
        "",
        *render.mqar_table(rows, pairs),
    ]
    if setting.num_kv_pairs in pairs:
        lines.append(render.crossed_footnote(setting.num_kv_pairs))
    lines += [*render.unfinished(experiment, runs, load.missing_models(experiment, runs)), ""]
    best = set(tables.best_mc(tables.mqar_seed_scores(runs)).values())
    plots.mqar_recall(src.img / f"{experiment}_recall.png", rows, pairs, seq_len, best)
    lines += [f"![MQAR accuracy against key-value pairs](img/{experiment}_recall.png)", ""]
    where = f"`{experiment}` at {seq_len} tokens"
    if setting.extra_overrides:
        where += f", {setting.head_dim}-dimensional heads, {setting.num_kv_pairs} pairs"
    return [(where, tables.mqar_seed_scores(runs))]


def grid_section(src: Sources, lines: list[str]) -> load.Grid:
    """MQAR beyond the training setting: longer sequences and more key-value pairs."""
    grid = load.mqar_grid(src.experiment("mqar"))
    lines += ["#### The control beyond its training setting: longer sequences, more pairs", ""]
    if not grid:
        lines += render.not_measured("python -m experiments.sweep mqar")
        return {}
    slices = tables.grid_slices(grid)
    lines += render.grid_section(tables.grid_tables(grid), slices, load.post_training_segment())
    return grid


def niah_section(niah: dict, lines: list[str]) -> None:
    lines += ["## 2. S-NIAH extrapolation", ""]
    if not niah:
        lines += render.not_measured("python -m experiments.sweep niah")
        return
    found = tables.niah_tables(niah)
    lines += [
        render.niah_setting(*load.niah_setting_config(), found),
        "",
        render.note_link("niah", "How this setting was chosen (calibration runs and probes)"),
        "",
        *render.niah_tables(found),
    ]


def split_niah(src: Sources, lines: list[str], experiment: str, title: str):
    """The heading of an S-NIAH section split at the training length, appended to ``lines``;
    its runs and tables, or None (after saying how to run it) before any result."""
    runs = src.experiment(experiment)
    lines += [f"### {title} (`{experiment}`)", ""]
    if not runs:
        lines += render.not_measured(render.sweep_command(experiment, PAIRED_SEEDS))
        return None
    return runs, tables.multikey_tables(runs, experiment)


def within_lines(
    experiment: str,
    runs,
    found,
    setting: str,
    prior: str = "chance about 0.21",
    loss: bool = True,
) -> list[str]:
    """The setting, the link to its calibration and the tables within the training length
    (``prior`` and ``loss`` as in ``render.niah_tables``)."""
    within = ", ".join(map(str, found.within.lengths))
    return [
        setting,
        "",
        render.note_link("niah_multikey", "How this setting was chosen (calibration runs)"),
        "",
        f"Within the training length ({within} tokens):",
        "",
        *render.niah_tables(found.within, loss=loss, prior=prior),
        *render.unfinished(experiment, runs, load.missing_models(experiment, runs), PAIRED_SEEDS),
        "",
    ]


def niah_multikey_section(src: Sources, lines: list[str], experiment: str, title: str) -> None:
    """Multi-key S-NIAH (``experiment``: niah_multikey, or its longer training): within the
    training length for every model, paired with the base, and beyond it only for the models
    that solve it."""
    measured = split_niah(src, lines, experiment, title)
    if measured is None:
        return
    runs, found = measured
    setting = render.multikey_setting(
        experiment, *load.niah_setting_config(experiment), found.within
    )
    lines += within_lines(experiment, runs, found, setting)
    mixups = src.json("experiments", "niah_mixups.json")
    lines += render.multikey_mixups(mixups, experiment, found.needles)
    comparisons = capacity.mc_comparisons(found.scores)
    if comparisons:
        within = ", ".join(map(str, found.within.lengths))
        measure = f"exact match within the training length, mean over {within} tokens"
        lines += render_capacity.mc_table(comparisons, measure)
    lines += render.multikey_beyond(found)


def niah_uuid_section(src: Sources, lines: list[str]) -> dict[str, dict[int, float]]:
    """S-NIAH-3 style (``niah_uuid``): a UUID copy within the training length for every model,
    paired with the base on exact match and on answer-token accuracy, the learning curves, and
    extrapolation only for the models that solve the training length. Returns the answer-token
    accuracy within it, {model: {seed: score}} (empty when not run), which claims 1-3 judge."""
    experiment = "niah_uuid"
    measured = split_niah(src, lines, experiment, "A UUID needle: a copy the state must hold")
    if measured is None:
        return {}
    runs, found = measured
    prior = f"the UUID format alone gives about {render.UUID_PRIOR:.2f}"
    config = load.cell_config(experiment, "gated_delta")
    segment = config.model["memory"]["caching"]["segment_size"]
    probe = src.capacity_probe(config.model["head_dim"], segment, folder=experiment, filler=0)
    setting = render.uuid_setting(
        load.cell_by_name(experiment, "gated_delta"),
        config,
        load.cell_config(experiment, "Transformer++, short conv"),
        found.within,
        probe and capacity.probe_recall(probe, render.UUID_LENGTH),
    )
    # the loss line compares with the digits' prior: not this task's
    lines += within_lines(experiment, runs, found, setting, prior, loss=False)
    within = ", ".join(map(str, found.within.lengths))
    lines += render.niah_curves(tables.niah_curves(runs, found.within.lengths), within)
    lines += render.niah_routing(src.json("experiments", "niah_mixups.json"), experiment)
    exact = capacity.mc_comparisons(found.scores)
    compared = {name for p in exact for name in (p.model, p.reference)}
    if any(any(found.scores[name].values()) for name in compared):
        lines += render_capacity.mc_table(exact, f"exact match, mean over {within} tokens")
    elif exact:
        lines += [
            "No recurrent model generates a whole UUID in any seed (exact match 0 within the "
            "training length), so Memory Caching and its base are compared on answer tokens.",
            "",
        ]
    tokens = capacity.mc_comparisons(found.token_scores)
    if tokens:
        measure = f"answer-token accuracy, mean over {within} tokens"
        lines += render_capacity.mc_table(tokens, measure)
    lines += render.multikey_beyond(found, prior)
    return found.token_scores


def lm_section(src: Sources, lines: list[str]):
    """The LM setting and tables; returns the LM claim's findings (``verdicts.lm_claim``)."""
    runs = src.experiment("lm")
    lines += ["## 3. Language modelling on the standard library source", ""]
    if not runs:
        lines += render.not_measured("python -m experiments.sweep lm")
        return [], None
    config = load.cell_config("lm", "gated_delta")
    segment = config.model["memory"]["caching"]["segment_size"]
    lines += [render.lm_setting(config), ""]
    lines += render.lm_tables(tables.lm_rows(runs), segment)
    return verdicts.lm_claim(tables.lm_seed_bits(runs), config.task.seq_len, segment)


def efficiency_section(src: Sources, lines: list[str]) -> dict | None:
    """Model throughput and decoding, then the ops' speed; returns the throughput data."""
    lines += ["## 4. Efficiency", ""]
    train, decode = src.json("train_throughput.json"), src.json("models_decode.json")
    if train:
        lines += render.throughput(train, tables.throughput_table(train))
    if decode:
        lines += render.decode(decode, tables.decode_table(decode))
    ops = op_speed(src)
    lines += ops
    if not (train or decode or ops):
        lines += render.not_measured("make bench")
    return train


def op_speed(src: Sources) -> list[str]:
    """The ops against causal SDPA in the same interleaved rounds (benchmarks/*.py)."""
    lines = []
    scans = src.json("linear_memory.json")
    if scans:
        bench = tables.ratio_table(scans["rows"], "T", "sdpa_s", "rules", "ratio_vs_sdpa")
        title = (
            "Memory scans, fwd+bwd (`results/linear_memory.json`, `python -m "
            f"benchmarks.bench_linear_memory`, {render.threads(scans['machine']['threads'])})"
        )
        lines += render.ratios(title, bench, "T", "SDPA")
    for name in ("memory_caching.json", "memory_caching_loglinear.json"):
        data = src.json(name)
        if not data:
            continue
        where = (
            f"`results/{name}`, rule {data['setting']['rule']}, segment "
            f"{data['setting']['segment_size']}, {render.threads(data['machine']['threads'])}"
        )
        bench = tables.ratio_table(data["train"], "T", "sdpa_s", "aggregations", "ratio_vs_sdpa")
        lines += render.ratios(f"Memory Caching fwd+bwd ({where})", bench, "T", "SDPA")
        bench = tables.ratio_table(
            data["decode"], "context", "sdpa_step_s", "aggregations", "step_ratio_vs_sdpa"
        )
        lines += render.ratios(
            f"Memory Caching decode step ({where})", bench, "context", "SDPA step", micro=True
        )
    deep = src.json("deep_memory.json")
    if deep:
        bench = tables.ratio_table(deep["rows"], "T", "sdpa_s", "cells", "ratio_vs_sdpa")
        title = (
            "Deep memories with Memory Caching, fwd+bwd (`results/deep_memory.json`, segment "
            f"{deep['setting']['segment_size']}, mini-batch {deep['setting']['mini_batch']}, "
            f"{render.threads(deep['machine']['threads'])})"
        )
        lines += render.ratios(title, bench, "T", "SDPA")
    if not lines:
        return []
    return [
        "### Speed of the ops",
        "",
        "Each a ratio to causal `scaled_dot_product_attention` timed in the same interleaved "
        "rounds; fp32, B=1, H=4, D=64 (`make bench` reruns them). "
        + render.note_link("speed", "How and when they were measured"),
        "",
        *lines,
    ]


def build(src: Sources) -> str:
    """The text of docs/results.md (and its figures under docs/img)."""
    lines = [
        "# Results: the paper's claims tested at CPU scale",
        "",
        "Generated by `python -m experiments.report` from the JSON under `results/` "
        "(`make results` reruns the missing experiments first). Small models, a 2-core CPU, "
        "minutes of training per cell: these test the direction of each claim, not the "
        "paper's numbers.",
        "",
    ]
    lines += ["## 1. MQAR: recall against memory", ""]
    capacity_runs = capacity_section(src, lines)
    state_size_section(src, capacity_runs, lines)
    long_section(src, lines)
    trained = mqar_section(
        src, "mqar", "### No-pressure control (`mqar`)", lines, render.control_intro()
    )
    grid = grid_section(src, lines)
    trained += mqar_section(
        src,
        "mqar_small_state",
        "### An earlier small-state setting (`mqar_small_state`)",
        lines,
        render.small_state_intro(),
    )
    niah = src.experiment("niah")
    niah_section(niah, lines)
    niah_multikey_section(src, lines, "niah_multikey", "Four needles, one asked")
    niah_multikey_section(src, lines, "niah_multikey_long", "Four needles, longer training")
    uuid = niah_uuid_section(src, lines)
    lm = lm_section(src, lines)
    train = efficiency_section(src, lines)
    costs = [tables.cost_row(n, runs) for n in EXPERIMENTS if (runs := src.experiment(n))]
    if costs:
        lines += render.cost(costs)
    lines += render_verdicts.verdict_section(
        verdicts.capacity_claims(capacity.seed_scores(capacity_runs)),
        verdicts.claims_1_to_3([*trained, *verdicts.load_view(grid)]),
        [
            *verdicts.mqar_extrapolation(grid),
            *([verdicts.niah_extrapolation(niah)] if niah else []),
        ],
        verdicts.throughput(train),
        lm,
        uuid=verdicts.capacity_claims(
            uuid, learned=verdicts.NIAH_TOKENS_LEARNED, keep_gates=load.gate_settings()[1]
        ),
    )
    return "\n".join(lines)


def main(root=None) -> int:
    src = Sources() if root is None else Sources(root)
    path = src.docs / "results.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build(src))
    print(f"wrote {path}")
    return 0
