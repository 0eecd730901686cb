"""Where S-NIAH answers go wrong and where the gates look: every trained cell of niah_multikey,
niah_multikey_long and niah_uuid evaluated again within its training length (``growmem eval``,
the same held-out examples as the cell's own evaluation). With several needles, the share of
answers that are another needle's value: a wrong answer that is a distractor's value means
the model read a needle, but not the one asked for; one that is no needle's value means it
failed to read a value at all. For gated Memory Caching cells, the gates' routing at the
answer's tokens (``growmem.evaluate.niah_gate_routing``): how often the cache of the segment
holding the needle's copy of the token asked for gets the largest weight.

    python -m experiments.niah_mixups [EXPERIMENT ...] [--seeds S ...] [--runs RUNS] [--out JSON]
                                      # -> results/experiments/niah_mixups.json

``--runs`` is the folder holding the sweep's run folders (default: this checkout's
runs/experiments); cells without a trained model there are skipped. Only the experiments
named (default: all three) are measured again, and with ``--seeds`` only those seeds; the JSON
keeps the earlier entries of the others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments import sweep
from growmem.utils.provenance import write_json

EXPERIMENTS = ("niah_multikey", "niah_multikey_long", "niah_uuid")
OUT = sweep.RESULTS / "niah_mixups.json"


def within_lengths(experiment: str) -> list[int]:
    """The evaluation lengths of ``experiment`` up to its training length."""
    task = sweep.cell_config(experiment, sweep.EXPERIMENTS[experiment]()[0]).task
    return [n for n in task.eval_lengths if n <= task.seq_len]


def evaluate_cell(model: Path, lengths: list[int]) -> dict:
    """Exact match, answer-token accuracy and (several needles) distractor rate of one model,
    mean over ``lengths``, and (gated models) the gates' routing over them."""
    with tempfile.TemporaryDirectory() as out:
        command = ["eval", str(model), "--lengths", *map(str, lengths), "--out", out]
        subprocess.run(
            [sys.executable, "-m", "growmem.cli", *command, "--threads", "1"],
            check=True,
            capture_output=True,
        )
        found = json.loads(next(Path(out).glob("eval-*.json")).read_text())
    rows = found["lengths"]
    keys = ("accuracy", "token_accuracy", "distractor_rate")
    means = {key: statistics.mean(r[key] for r in rows) for key in keys if key in rows[0]}
    return means | ({"gates": found["gates"]} if "gates" in found else {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", help=f"some of {list(EXPERIMENTS)}")
    parser.add_argument("--runs", type=Path, default=sweep.RUNS, help="the sweep's run folders")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON to write")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="only these seeds (the JSON keeps the others')"
    )
    args = parser.parse_args(argv)
    if unknown := set(args.experiments) - set(EXPERIMENTS):
        parser.error(f"unknown experiments {sorted(unknown)}; choose from {list(EXPERIMENTS)}")
    earlier = json.loads(args.out.read_text())["experiments"] if args.out.is_file() else {}
    experiments = {name: earlier[name] for name in EXPERIMENTS if name in earlier}
    for experiment in args.experiments or EXPERIMENTS:
        lengths = within_lengths(experiment)
        kept = experiments.get(experiment, {}).get("cells", {}) if args.seeds else {}
        cells = {}
        for cell in sweep.EXPERIMENTS[experiment]():
            seeds = {
                seed: found
                for seed, found in kept.get(cell.name, {}).items()
                if int(seed) not in args.seeds
            }
            for seed in args.seeds or sweep.SEEDS[experiment]:
                model = sweep.run_folder(experiment, cell, seed, args.runs) / "model"
                if (model / "eval.json").is_file():
                    seeds[seed] = evaluate_cell(model, lengths)
                    print(experiment, cell.name, seed, seeds[seed], flush=True)
            if seeds:
                cells[cell.name] = dict(sorted(seeds.items(), key=lambda item: int(item[0])))
        experiments[experiment] = {"lengths": lengths, "cells": cells}
    write_json(
        args.out,
        {
            "note": (
                "S-NIAH answers within the training length, mean over the lengths: "
                "accuracy (exact match of the queried value), token_accuracy (teacher-forced "
                "answer tokens), distractor_rate (several needles: share of greedy answers "
                "that are another needle's value), gates (gated models: the routing at the "
                "answer's tokens, growmem.evaluate.niah_gate_routing); per experiment, cell "
                "and seed (python -m experiments.niah_mixups)."
            ),
            "experiments": experiments,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
