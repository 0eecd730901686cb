"""The MQAR demo: does Memory Caching change how much a recurrent model can recall?

Trains Transformer++, gated_delta, gated_delta+grm and gated_delta+ssc on the ``mqar`` task base
(``growmem train mqar --model SPEC``, ``--jobs`` trainings at a time, one thread each), then
prints the accuracy of each model per number of key-value pairs and plots it. Runs whose model
folder exists are not retrained, so an interrupted demo continues where it stopped.

    python -m growmem.demo [--out runs/demo] [--jobs 2] [--set section.key=value ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from growmem.cli import Parser, int_at_least, resolve_config
from growmem.models.model_spec import ModelSpec
from growmem.training.config import load_config

TASK = "mqar"
# table label: model spec
MODELS = {
    "Transformer++": "transformer",
    "gated_delta": "gated_delta",
    "gated_delta+grm": "gated_delta+grm",
    "gated_delta+ssc": "gated_delta+ssc",
}


def run_folder(root: Path, spec: str) -> Path:
    """Where the demo trains the model ``spec``: root/mqar_gated_delta_grm."""
    return root / f"{TASK}_{ModelSpec.parse(spec).slug}"


def launch(spec: str, out: Path, overrides: list[str]) -> subprocess.Popen:
    """Start (or continue) ``growmem train mqar --model SPEC`` into ``out`` on one thread,
    logging to out/train.log."""
    command = [sys.executable, "-m", "growmem.cli", "train", TASK, "--model", spec]
    command.append("--auto-resume")
    for item in [f"train.out_dir={out}", "train.threads=1", "train.progress=false", *overrides]:
        command += ["--set", item]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "a")  # noqa: SIM115 -- closed when the process ends
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log
    return process


def check_overrides(root: Path, overrides: list[str]) -> None:
    """Load every model's config with ``overrides`` as its training will (before anything
    starts).

    Raises:
        ValueError: an override that a model's config refuses.
    """
    for spec in MODELS.values():
        out = f"train.out_dir={run_folder(root, spec)}"
        load_config(resolve_config(TASK), [*overrides, out], model=spec)


def _last_line(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else ""


def run_all(root: Path, jobs: int, overrides: list[str]) -> None:
    """Train every model not trained yet, ``jobs`` at a time.

    Raises:
        RuntimeError: a training failed (the others are stopped): its model, log and last
            log line.
    """
    pending = [
        (name, spec)
        for name, spec in MODELS.items()
        if not (run_folder(root, spec) / "model" / "eval.json").is_file()
    ]
    running: list[tuple[str, Path, subprocess.Popen, float]] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, spec = pending.pop(0)
                out = run_folder(root, spec)
                print(f"training {name} ({TASK} --model {spec}) -> {out}", flush=True)
                running.append((name, out, launch(spec, out, overrides), time.time()))
            time.sleep(1)
            for item in list(running):
                name, out, process, start = item
                if process.poll() is None:
                    continue
                process.log.close()
                running.remove(item)
                if process.returncode != 0:
                    log = out / "train.log"
                    raise RuntimeError(f"training {name} failed ({_last_line(log)}); see {log}")
                print(f"  {name} done in {time.time() - start:.0f} s", flush=True)
    finally:  # a failure or Ctrl-C: no training goes on unattended (each resumes later)
        for _, _, process, _ in running:
            process.terminate()
            process.wait()
            process.log.close()


def report(root: Path) -> Path:
    """Print the accuracy table and write the plot; returns the PNG's path."""
    results = {
        name: json.loads((run_folder(root, spec) / "model" / "eval.json").read_text())
        for name, spec in MODELS.items()
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
    parser = Parser(prog="growmem demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="folder of the demo's runs")
    parser.add_argument("--jobs", type=int_at_least(1), default=2, help="trainings at a time")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override the mqar task base for every model, e.g. --set train.steps=100",
    )
    args = parser.parse_args(argv)
    root = Path(args.out)
    start = time.time()
    try:
        check_overrides(root, args.set)
        run_all(root, args.jobs, args.set)
    except (ValueError, OSError) as error:
        print(f"growmem demo: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"growmem demo: error: {error}", file=sys.stderr)
        return 1
    report(root)
    print(f"demo took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
