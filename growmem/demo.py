"""The MQAR demo: does Memory Caching change how much a recurrent model can recall?

Trains Transformer++, gated_delta, gated_delta+grm and gated_delta+ssc on the ``mqar`` preset
(``--jobs`` trainings at a time, one thread each), then prints the accuracy of each model per
number of key-value pairs and plots it. Runs whose model folder exists are not retrained, so an
interrupted demo continues where it stopped.

    python -m growmem.demo [--out runs/demo] [--jobs 2] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

MODELS = {
    "Transformer++": "mqar_transformer",
    "gated_delta": "mqar_gated_delta",
    "gated_delta+grm": "mqar_gated_delta_grm",
    "gated_delta+ssc": "mqar_gated_delta_ssc",
}


def launch(preset: str, out: Path, overrides: list[str]) -> subprocess.Popen:
    """Start (or continue) ``growmem train PRESET`` into ``out`` on one thread, logging to
    out/train.log."""
    command = [sys.executable, "-m", "growmem.cli", "train", preset, "--auto-resume"]
    for item in [f"train.out_dir={out}", "train.threads=1", "train.progress=false", *overrides]:
        command += ["--set", item]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a")  # noqa: SIM115 -- closed when the process ends
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log
    return process


def run_all(root: Path, jobs: int, overrides: list[str]) -> None:
    """Train every model not trained yet, ``jobs`` at a time."""
    pending = [
        (name, preset)
        for name, preset in MODELS.items()
        if not (root / preset / "model" / "eval.json").is_file()
    ]
    running: list[tuple[str, Path, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < jobs:
            name, preset = pending.pop(0)
            out = root / preset
            print(f"training {name} ({preset}) -> {out}", flush=True)
            running.append((name, out, launch(preset, out, overrides), time.time()))
        time.sleep(1)
        for item in list(running):
            name, out, process, start = item
            if process.poll() is None:
                continue
            process.log.close()
            running.remove(item)
            if process.returncode != 0:
                raise RuntimeError(f"training {name} failed; see {out / 'train.log'}")
            print(f"  {name} done in {time.time() - start:.0f} s", flush=True)


def report(root: Path) -> Path:
    """Print the accuracy table and write the plot; returns the PNG's path."""
    results = {
        name: json.loads((root / preset / "model" / "eval.json").read_text())
        for name, preset in MODELS.items()
    }
    pairs = [s["num_kv_pairs"] for s in next(iter(results.values()))["slices"]]
    seq_len = next(iter(results.values()))["slices"][0]["seq_len"]
    header = f"MQAR accuracy at seq_len {seq_len}, by number of key-value pairs"
    print("\n" + header)
    print(f"| model | {' | '.join(str(p) for p in pairs)} | all |")
    print(f"|---|{'---|' * (len(pairs) + 1)}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, result in results.items():
        accuracy = [s["accuracy"] for s in result["slices"]]
        cells = " | ".join(f"{a:.3f}" for a in accuracy)
        print(f"| {name} | {cells} | {result['accuracy']:.3f} |")
        ax.plot(pairs, accuracy, "o-", label=name)
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(header, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = root / "mqar_demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"\nplot: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the demo's runs")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the mqar preset for every model, e.g. --set train.steps=100",
    )
    args = parser.parse_args(argv)
    root = Path(args.out)
    start = time.time()
    run_all(root, max(1, args.jobs), args.set)
    report(root)
    print(f"demo took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
