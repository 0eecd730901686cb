"""The experiments behind docs/results.md: training runs over task bases, models, seeds and
overrides.

    python -m experiments.sweep [EXPERIMENT ...] [--seeds S ...] [--jobs 2] [--models NAME ...]
                                [--list]

Each cell (experiment, model, seed) trains with ``growmem train TASK --model SPEC`` into
runs/experiments/EXPERIMENT/MODEL/seedS (one thread per job) and stores its evaluation and
training time in results/experiments/EXPERIMENT/MODEL/seedS.json. Cells whose JSON exists are
skipped, so a sweep can be finished across several sittings; an interrupted cell resumes from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from growmem.evaluate import HELD_OUT_SEED
from growmem.models.model_spec import ModelSpec
from growmem.ops.aggregations import aggregation
from growmem.utils.provenance import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "experiments"
RUNS = ROOT / "runs" / "experiments"


@dataclass
class Cell:
    """One model of an experiment: a task base, a model spec, overrides, and evaluations after
    training.

    Attributes:
        name: label in tables (and, as ``slug(name)``, the cell's folder).
        task: the growmem task base (growmem/configs) the run starts from.
        model: the model spec (``growmem train TASK --model SPEC``).
        overrides: ``section.key=value`` settings on top of them.
        evals: extra ``growmem eval`` argument lists; their JSON is stored under
            ``evals[<joined args>]``.
    """

    name: str
    task: str
    model: str
    overrides: list[str] = field(default_factory=list)
    evals: list[list[str]] = field(default_factory=list)


# MQAR beyond the training setting (64 tokens, 8 pairs): 2x and 4x longer sequences and up to
# 31 pairs (the vocabulary's 31 keys), every (length, pairs) slice with length >= 4 * pairs.
MQAR_GRID = ["--lengths", "64", "128", "256", "--kv-pairs", "8", "16", "24", "31"]
# Post-training Memory Caching of a base model: mean over segments of the training segment size.
MQAR_POST_TRAINING_MC = [*MQAR_GRID, "--post-training-mc", "16"]


# Titans' MQAR settings (mini-batch 2, inner learning rate at most 0.3, AdamW 1e-3) and the
# Transformer++'s are the mqar base's per_model settings, with their calibration notes.


def _mqar() -> list[Cell]:
    cells = [Cell("Transformer++", "mqar", "transformer", evals=[MQAR_GRID])]
    for rule, aggregations in (
        ("gated_delta", ("none", "residual", "grm", "ssc")),
        ("swla", ("none", "residual", "grm", "ssc")),
        ("titans", ("none", "residual", "grm", "soup", "ssc")),
    ):
        for agg in aggregations:
            spec = rule if agg == "none" else f"{rule}+{agg}"
            evals = [MQAR_GRID, MQAR_POST_TRAINING_MC] if agg == "none" else [MQAR_GRID]
            cells.append(Cell(spec, "mqar", spec, evals=evals))
    return cells


# MQAR with a state too small for the pairs: 16 heads of 8 dimensions (an 8 x 8 matrix per head)
# must hold 16 pairs, where the `mqar` setting's 2 heads of 64 hold 8. Segment 8 caches a
# checkpoint every 4 pairs of the 32-token context.
SMALL_STATE = ["model.num_heads=16", "model.memory.caching.segment_size=8", "task.num_kv_pairs=16"]


def _mqar_small_state() -> list[Cell]:
    # 16 pairs keep one-head attention on its plateau far longer than 8 do: with 5000 steps the
    # learning rate decayed before the transition; with 12000 it crossed at step ~4300
    tpp = ["task.num_kv_pairs=16", "train.steps=12000"]
    cells = [Cell("Transformer++", "mqar", "transformer", tpp)]
    for agg in ("none", "residual", "grm", "ssc"):
        spec = "gated_delta" if agg == "none" else f"gated_delta+{agg}"
        evals = [["--post-training-mc", "8"]] if agg == "none" else []
        cells.append(Cell(spec, "mqar", spec, SMALL_STATE, evals=evals))
    return cells


# MQAR where the state is too small (the mqar_capacity task base, the demo's setting). Every
# gated cell pins all of its gate settings, so its meaning does not follow the library's
# defaults. HELD_OUT: every model is also scored on the same examples of a generator seed no
# training used (training seeds are small numbers).
HELD_OUT = ["--data-seed", str(HELD_OUT_SEED)]
GATES = {  # label: the gate settings of a gated cell
    "1/sqrt(D)": {"caching.gate_norm": "none", "caching.gate_scale": "null"},
    "raw, as the paper": {"caching.gate_norm": "none", "caching.gate_scale": "1.0"},
    "cosine, tau0 5": {
        "caching.gate_norm": "l2",
        "caching.gate_scale": "1.0",
        "gate_temperature": "5.0",
    },
    "centred cosine, tau0 5": {
        "caching.gate_norm": "centered",
        "caching.gate_scale": "1.0",
        "gate_temperature": "5.0",
    },
    "cosine, tau0 5, online bias 2": {
        "caching.gate_norm": "l2",
        "caching.gate_scale": "1.0",
        "gate_temperature": "5.0",
        "gate_online_bias": "2.0",
    },
    "cosine, tau0 5, gate keys": {
        "caching.gate_norm": "l2",
        "caching.gate_scale": "1.0",
        "gate_temperature": "5.0",
        "summary_source": "gate_keys",
    },
    "cosine, tau0 5, detached summaries": {
        "caching.gate_norm": "l2",
        "caching.gate_scale": "1.0",
        "gate_temperature": "5.0",
        "caching.detach_summaries": "true",
    },
}
# The ablation's choice, the library's default gates: the gates of titans+grm, the state-size
# view and the S-NIAH cells.
CHOSEN_GATES = "cosine, tau0 5, gate keys"
# The gates of the ssc cell: the ablation's leader when ssc was swept (its seeds 0-2); claim 3
# compares it with grm under the same gates.
SSC_GATES = "cosine, tau0 5"
UNGATED = {"gate_temperature": "null", "gate_online_bias": "null"}


def gate_overrides(label: str) -> list[str]:
    """The model.memory settings of the gates ``label`` (GATES), every option pinned."""
    settings = {
        "caching.gate_norm": "none",
        "caching.gate_scale": "null",
        "caching.detach_summaries": "false",
        "gate_temperature": "null",
        "gate_online_bias": "null",
        "summary_source": "keys",
        **GATES[label],
    }
    return [f"model.memory.{key}={value}" for key, value in settings.items()]


# 4x mqar_capacity's 2000 steps: Transformer++ sits on MQAR's plateau at 2000 (and at 4000 at
# 1e-3), and the base's failure at 2000 steps may be one of learning rather than of capacity.
LONG_STEPS = 8000
# Transformer++ with the memory layers' short convolution on q, k, v (4 taps, their
# conv_size): without it attention must learn a previous-token head first and crawls along
# MQAR's plateau (0.13-0.31 after 4000 steps, 0.27-0.31 after 8000-16000); with it, seed 0
# passed 0.99 at step 400 (docs/notes/2026-12-capacity-results.md, "Attention").
ATTENTION_CONV = 4


def _mqar_capacity() -> list[Cell]:
    ungated = [f"model.memory.{k}={v}" for k, v in UNGATED.items()]
    cells = [
        Cell("Transformer++", "mqar_capacity", "transformer", evals=[HELD_OUT]),
        Cell(
            f"Transformer++, {LONG_STEPS} steps",
            "mqar_capacity",
            "transformer",
            [f"train.steps={LONG_STEPS}", "train.lr=3e-3"],
            evals=[HELD_OUT],
        ),
        Cell(
            "Transformer++, short conv",
            "mqar_capacity",
            "transformer",
            [f"model.attn_conv_size={ATTENTION_CONV}"],
            evals=[HELD_OUT],
        ),
        Cell("gated_delta", "mqar_capacity", "gated_delta", ungated, evals=[HELD_OUT]),
        Cell("gated_delta+residual", "mqar_capacity", "gated_delta+residual", ungated, [HELD_OUT]),
    ]
    for label in GATES:
        cells.append(
            Cell(
                f"gated_delta+grm, {label}",
                "mqar_capacity",
                "gated_delta+grm",
                gate_overrides(label),
                evals=[HELD_OUT],
            )
        )
    chosen = gate_overrides(CHOSEN_GATES)
    cells += [
        Cell(
            f"gated_delta+ssc, {SSC_GATES}",
            "mqar_capacity",
            "gated_delta+ssc",
            gate_overrides(SSC_GATES),
            [HELD_OUT],
        ),
        Cell("titans", "mqar_capacity", "titans", ungated, evals=[HELD_OUT]),
        Cell(f"titans+grm, {CHOSEN_GATES}", "mqar_capacity", "titans+grm", chosen, [HELD_OUT]),
    ]
    return cells


def _mqar_capacity_long() -> list[Cell]:
    """The base and the default grm of mqar_capacity trained 4x longer: does the base cross MQAR's
    plateau given the steps, and how close does it then come to its memory's probe recall?"""
    longer = [f"train.steps={LONG_STEPS}"]
    ungated = [*longer, *(f"model.memory.{k}={v}" for k, v in UNGATED.items())]
    chosen = [*longer, *gate_overrides(CHOSEN_GATES)]
    return [
        Cell("gated_delta", "mqar_capacity", "gated_delta", ungated, [HELD_OUT]),
        Cell(
            f"gated_delta+grm, {CHOSEN_GATES}",
            "mqar_capacity",
            "gated_delta+grm",
            chosen,
            [HELD_OUT],
        ),
    ]


# The paper's MQAR view: accuracy against the state's size (head dimension D, so D x D per head
# and layer) at the same pairs; D = 8 is the mqar_capacity experiment itself.
STATE_SIZES = (4, 16, 32)


def _mqar_state_size() -> list[Cell]:
    cells = []
    for head_dim in STATE_SIZES:
        size = [f"model.head_dim={head_dim}"]
        ungated = [*size, *(f"model.memory.{k}={v}" for k, v in UNGATED.items())]
        chosen = [*size, *gate_overrides(CHOSEN_GATES)]
        cells += [
            Cell(f"gated_delta, D={head_dim}", "mqar_capacity", "gated_delta", ungated, [HELD_OUT]),
            Cell(
                f"gated_delta+grm, {CHOSEN_GATES}, D={head_dim}",
                "mqar_capacity",
                "gated_delta+grm",
                chosen,
                [HELD_OUT],
            ),
        ]
    return cells


# S-NIAH cells: the niah base's training (fresh examples every step). The recurrent cells are
# also evaluated halfway, at step 1000 (with 1000 steps in all only the cached ones had begun
# to leave the digits' prior; results/experiments/niah_calibration.json).
NIAH = ["task.num_eval_examples=10"]
NIAH_RECURRENT = [*NIAH, "train.eval_every=1000"]


def _niah() -> list[Cell]:
    post_training_mc = [["--post-training-mc", "256"]]
    return [
        Cell("Transformer++", "niah", "transformer", [*NIAH, "train.eval_every=0"]),
        Cell("gated_delta", "niah", "gated_delta", NIAH_RECURRENT, evals=post_training_mc),
        Cell("gated_delta+grm", "niah", "gated_delta+grm", NIAH_RECURRENT),
        Cell("gated_delta+ssc", "niah", "gated_delta+ssc", NIAH_RECURRENT),
    ]


# Multi-key S-NIAH (the niah_multikey task base: 4 needles in the task's BPE, one needle for
# 500 steps then four, trained at 256 tokens, evaluated within it and, reported apart, at 512;
# docs/notes/2026-12-niah-multikey-calibration.md). The gated cells pin their gate settings,
# the base its ungated ones, as mqar_capacity's.


def _niah_multikey() -> list[Cell]:
    ungated = [f"model.memory.{k}={v}" for k, v in UNGATED.items()]
    chosen = gate_overrides(CHOSEN_GATES)
    return [
        Cell("Transformer++", "niah_multikey", "transformer"),
        Cell("gated_delta", "niah_multikey", "gated_delta", ungated),
        Cell(f"gated_delta+grm, {CHOSEN_GATES}", "niah_multikey", "gated_delta+grm", chosen),
        Cell(f"gated_delta+ssc, {CHOSEN_GATES}", "niah_multikey", "gated_delta+ssc", chosen),
    ]


# 3x niah_multikey's 2000 steps: at 2000 no model solves four needles and most curves are still
# rising. Each stage draws 5500 x 16 examples, so the four-needle steps still see fresh ones.
NIAH_LONG = ["train.steps=6000", "task.num_train_examples=88000"]


def _niah_multikey_long() -> list[Cell]:
    return [
        dataclasses.replace(cell, overrides=[*NIAH_LONG, *cell.overrides])
        for cell in _niah_multikey()
    ]


# S-NIAH-3 style (the niah_uuid task base: one UUID needle, a ~35-token copy in the task's BPE,
# 2 heads of 16; trained and evaluated within 256 tokens, 512 reported apart). At 2000 steps
# neither the base nor grm had left the UUID format's prior at heads of 16, hence the base's
# 4000 steps (docs/notes/2026-12-niah-multikey-calibration.md, "One needle, a UUID").


def _niah_uuid() -> list[Cell]:
    ungated = [f"model.memory.{k}={v}" for k, v in UNGATED.items()]
    chosen = gate_overrides(CHOSEN_GATES)
    return [
        Cell(
            "Transformer++, short conv",
            "niah_uuid",
            "transformer",
            [f"model.attn_conv_size={ATTENTION_CONV}"],
        ),
        Cell("gated_delta", "niah_uuid", "gated_delta", ungated),
        Cell(f"gated_delta+grm, {CHOSEN_GATES}", "niah_uuid", "gated_delta+grm", chosen),
        Cell(f"gated_delta+ssc, {CHOSEN_GATES}", "niah_uuid", "gated_delta+ssc", chosen),
    ]


def _lm() -> list[Cell]:
    short = ["train.steps=300", "train.batch_size=8", "task.eval_blocks=32"]
    cells = [Cell("Transformer++", "lm", "transformer", short)]
    for rule in ("gated_delta", "titans"):
        for agg in ("none", "grm", "ssc"):
            spec = rule if agg == "none" else f"{rule}+{agg}"
            cells.append(Cell(spec, "lm", spec, short))
    # Ablations of gated_delta+grm (segment 128, continuous init, mean summaries). Log-Linear++
    # is grm over logarithmic buckets of segments; segment 32 gives it up to 15 segments to
    # group (the grm row with segment 32 is its constant-segment counterpart).
    for label, spec, extra in (
        ("gated_delta+grm, segment 32", "gated_delta+grm@32", []),
        ("gated_delta+grm, segment 256", "gated_delta+grm@256", []),
        ("gated_delta+grm, independent init", "gated_delta+grm", ["caching.init=independent"]),
        ("gated_delta+grm, summary sum", "gated_delta+grm", ["caching.summary=sum"]),
        ("gated_delta+loglinear, segment 32", "gated_delta+loglinear@32", []),
    ):
        cells.append(Cell(label, "lm", spec, [*short, *(f"model.memory.{e}" for e in extra)]))
    return cells


def _gates_of_then(cells: Callable[[], list[Cell]]) -> Callable[[], list[Cell]]:
    """The cells of an experiment swept before the library's gate defaults changed, its gated
    cells pinned to the gates they ran with (the scaled dot product 1/sqrt(D) over the memory
    keys, no temperature), so that a rerun repeats them."""

    def pinned() -> list[Cell]:
        out = []
        for cell in cells():
            name = ModelSpec.parse(cell.model).aggregation
            if name != "none" and aggregation(name).gated:
                cell = dataclasses.replace(
                    cell, overrides=[*cell.overrides, *gate_overrides("1/sqrt(D)")]
                )
            out.append(cell)
        return out

    return pinned


EXPERIMENTS = {
    "mqar": _gates_of_then(_mqar),
    "mqar_small_state": _gates_of_then(_mqar_small_state),
    "mqar_capacity": _mqar_capacity,
    "mqar_state_size": _mqar_state_size,
    "mqar_capacity_long": _mqar_capacity_long,
    "niah": _gates_of_then(_niah),
    "niah_multikey": _niah_multikey,
    "niah_multikey_long": _niah_multikey_long,
    "niah_uuid": _niah_uuid,
    "lm": _gates_of_then(_lm),
}


# Seeds a sweep runs by default: the capacity experiments pair five (their verdicts count
# seeds out of five), the older ones three.
DEFAULT_SEEDS = (0, 1, 2)
PAIRED = (0, 1, 2, 3, 4)
SEEDS = {
    "mqar_capacity": PAIRED,
    "mqar_state_size": PAIRED,
    "mqar_capacity_long": PAIRED,
    "niah_multikey": PAIRED,
    "niah_multikey_long": PAIRED,
    "niah_uuid": PAIRED,
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def result_path(experiment: str, cell: Cell, seed: int) -> Path:
    return RESULTS / experiment / slug(cell.name) / f"seed{seed}.json"


def _growmem(*args: str, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as f:
        subprocess.run(
            [sys.executable, "-m", "growmem.cli", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            check=True,
        )


def run_folder(experiment: str, cell: Cell, seed: int, runs: Path = RUNS) -> Path:
    """Where ``cell`` trains with ``seed`` under ``runs`` (the sweep's run folders)."""
    return runs / experiment / slug(cell.name) / f"seed{seed}"


def train_arguments(cell: Cell, out: Path, seed: int) -> list[str]:
    """The ``growmem`` arguments that train ``cell`` with ``seed`` into ``out``."""
    settings = [
        *cell.overrides,
        f"train.seed={seed}",
        f"train.out_dir={out}",
        "train.threads=1",
        "train.progress=false",
    ]
    sets = (a for s in settings for a in ("--set", s))
    return ["train", cell.task, "--model", cell.model, "--auto-resume", *sets]


def cell_config(experiment: str, cell: Cell, seed: int = 0):
    """The RunConfig the cell trains with (as ``growmem train`` resolves its arguments)."""
    from growmem import cli

    arguments = train_arguments(cell, run_folder(experiment, cell, seed), seed)
    return cli.run_config(cli.build_parser().parse_args(arguments))


def run_cell(experiment: str, cell: Cell, seed: int) -> Path:
    """Train (or resume) one cell, evaluate it, and write its result JSON atomically."""
    out = run_folder(experiment, cell, seed)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sweep.log"
    start = time.time()
    if not (out / "model" / "eval.json").is_file():
        _growmem(*train_arguments(cell, out, seed), log=log)
    seconds = time.time() - start
    evals = {}
    for extra in cell.evals:
        name = " ".join(extra)
        eval_dir = out / "evals" / slug(name)
        _growmem("eval", str(out / "model"), *extra, "--out", str(eval_dir), log=log)
        evals[name] = json.loads(next(eval_dir.glob("eval-*.json")).read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if "loss" in m]
    result = {
        "experiment": experiment,
        "model": cell.name,
        "task": cell.task,
        "model_spec": cell.model,
        "overrides": cell.overrides,
        "seed": seed,
        "steps": train_lines[-1]["step"],
        "final_loss": train_lines[-1]["loss"],
        "train_seconds_this_session": seconds,
        "tokens_per_s": sum(m["tokens_per_s"] for m in train_lines) / len(train_lines),
        "eval": json.loads((out / "model" / "eval.json").read_text()),
        "evals": evals,
        # the evaluations during training (step 0 is the initial model): learning curves, and
        # for gated models the gates' routing over training
        "history": [m for m in metrics if "eval" in m],
    }
    return write_json(result_path(experiment, cell, seed), result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="*", default=list(EXPERIMENTS))
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="seeds of every experiment (default: each experiment's SEEDS)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="cells trained at a time")
    parser.add_argument("--models", nargs="+", help="only these models (names as in --list)")
    parser.add_argument("--list", action="store_true", help="list the cells and their state")
    args = parser.parse_args(argv)
    unknown = set(args.experiments) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiments {sorted(unknown)}; choose from {list(EXPERIMENTS)}")
    names = {cell.name for exp in args.experiments for cell in EXPERIMENTS[exp]()}
    if args.models and set(args.models) - names:
        parser.error(f"unknown models {sorted(set(args.models) - names)}; see --list")
    # Seed-major, so an interrupted sweep has whole seeds rather than whole models.
    todo = [
        (exp, cell, seed)
        for exp in args.experiments
        for seed in args.seeds or SEEDS.get(exp, DEFAULT_SEEDS)
        for cell in EXPERIMENTS[exp]()
        if not args.models or cell.name in args.models
    ]
    if args.list:
        for exp, cell, seed in todo:
            done = result_path(exp, cell, seed).is_file()
            where = f"{cell.task} --model {cell.model}"
            print(
                f"{'done' if done else 'todo'}  {exp:16s} {cell.name:36s} {where:32s} seed {seed}"
            )
        return 0
    todo = [t for t in todo if not result_path(*t).is_file()]
    print(f"{len(todo)} cells to run", flush=True)
    running: list[tuple[tuple, subprocess.Popen]] = []
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            exp, cell, seed = todo.pop(0)
            command = [
                sys.executable,
                "-m",
                "experiments.sweep",
                "--cell",
                exp,
                cell.name,
                str(seed),
            ]
            print(f"start {exp} / {cell.name} / seed {seed}", flush=True)
            running.append(((exp, cell.name, seed), subprocess.Popen(command, cwd=ROOT)))
        time.sleep(2)
        for item in list(running):
            key, process = item
            if process.poll() is not None:
                running.remove(item)
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                print(f"{status} {' / '.join(map(str, key))}", flush=True)
    return 0


def run_one(experiment: str, name: str, seed: int) -> int:
    cell = next(c for c in EXPERIMENTS[experiment]() if c.name == name)
    print(run_cell(experiment, cell, seed))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--cell":
        sys.exit(run_one(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(main())
