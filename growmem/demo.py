"""The MQAR demo: where a recurrent state is too small for what the context holds, does Memory
Caching give the recall back?

First the capacity probe (no training, seconds): how many key-value pairs an 8-dimensional
delta-rule memory recalls, and how many an oracle that reads the right segment's cached memory
would. Then it trains gated_delta and gated_delta+grm on the ``mqar_capacity`` task base (2
heads of 8 dimensions, 64 tokens, 2-16 pairs; ``growmem train mqar_capacity --model SPEC``,
``--jobs`` trainings at a time, one thread each), and prints each model's accuracy per number
of pairs on held-out examples next to the probe, with how grm's gates route, and plots it.
Runs whose model folder exists are not retrained, so an interrupted demo continues where it
stopped.

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
from growmem.evaluate import HELD_OUT_SEED
from growmem.models.model_spec import ModelSpec
from growmem.probe.capacity import capacity_probe
from growmem.training.config import load_config

TASK = "mqar_capacity"
# table label: model spec
MODELS = {
    "gated_delta": "gated_delta",
    "gated_delta+grm": "gated_delta+grm",
}
# draws of the probe per number of pairs
PROBE_DRAWS = 50


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


def check_overrides(root: Path, overrides: list[str]) -> dict:
    """Load every model's config with ``overrides`` as its training will (before anything
    starts).

    Returns: {table label: RunConfig}.
    Raises:
        ValueError: an override that a model's config refuses.
    """
    configs = {}
    for name, spec in MODELS.items():
        out = f"train.out_dir={run_folder(root, spec)}"
        configs[name] = load_config(resolve_config(TASK), [*overrides, out], model=spec)
    return configs


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


def probe(config) -> dict:
    """The capacity probe in the task's layout: the model's head size, one pair per 2 tokens
    (a key, then a value that writes nothing more), its segment length, the test slices'
    pairs. Returns {"base": [recall per P], "oracle": [...]}."""
    memory = config.model["memory"]
    D = config.model.get("head_dim") or config.model["hidden_size"] // config.model["num_heads"]
    payload = capacity_probe(
        head_dim=D,
        segment_size=memory["caching"]["segment_size"],
        pairs=sorted(set(config.task.test_num_kv_pairs)),
        draws=PROBE_DRAWS,
        filler=1,
        seed=config.train.seed,
    )
    series = {e["name"]: e["recall"] for e in payload["series"]}
    return {"pairs": payload["pairs"], "head_dim": D, **{n: series[n] for n in ("base", "oracle")}}


def _routing_line(name: str, result: dict) -> str | None:
    """One line on how a gated model's gates route (from its evaluation's ``gates``)."""
    if "gates" not in result:
        return None
    parts = [
        f"layer {i}: entropy {g['entropy']:.2f}, weight on the queried pair's cache "
        f"{g['right_weight']:.2f} (uniform: {g['chance']:.2f}), largest in {g['right_top']:.0%}"
        for i, g in enumerate(result["gates"]["layers"])
    ]
    return f"{name} gates: " + "; ".join(parts)


def held_out(root: Path, spec: str) -> dict:
    """The evaluation of the trained model ``spec`` on the held-out examples
    (``growmem eval --data-seed HELD_OUT_SEED``), run once and kept in its run folder."""
    model = run_folder(root, spec) / "model"
    out = run_folder(root, spec) / "held_out"
    path = out / "eval-mqar.json"
    if not path.is_file():
        command = [sys.executable, "-m", "growmem.cli", "eval", str(model), "--threads", "1"]
        command += ["--data-seed", str(HELD_OUT_SEED), "--out", str(out)]
        subprocess.run(command, check=True, capture_output=True)
    return json.loads(path.read_text())


def report(root: Path, configs: dict) -> Path:
    """Print the accuracy table next to the probe and write the plot; returns the PNG's
    path."""
    results = {name: held_out(root, spec) for name, spec in MODELS.items()}
    config = next(iter(configs.values()))
    expected = probe(config)
    first = next(iter(results.values()))
    pairs = [s["num_kv_pairs"] for s in first["slices"]]
    seq_len = first["slices"][0]["seq_len"]
    D = expected["head_dim"]
    header = (
        f"MQAR with a state too small for the pairs: {config.model['num_heads']} heads of {D} "
        f"dimensions, {seq_len} tokens"
    )
    print("\n" + header)
    print(
        "probe: no training, random unit keys written into a D x D memory; trained: accuracy of "
        "the value predictions on held-out examples"
    )
    columns = ["probe: base memory", "probe: oracle cache", *results]
    print(f"| pairs | {' | '.join(columns)} |")
    print(f"|---|{'---|' * len(columns)}")
    by_pairs = {P: i for i, P in enumerate(expected["pairs"])}
    for i, P in enumerate(pairs):
        cells = [f"{expected['base'][by_pairs[P]]:.2f}", f"{expected['oracle'][by_pairs[P]]:.2f}"]
        cells += [f"{r['slices'][i]['accuracy']:.3f}" for r in results.values()]
        print(f"| {P} | {' | '.join(cells)} |")
    overall = " | ".join(f"{r['accuracy']:.3f}" for r in results.values())
    print(f"| all | - | - | {overall} |")
    for name, result in results.items():
        line = _routing_line(name, result)
        if line:
            print(line)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    probe_pairs = expected["pairs"]
    ax.plot(probe_pairs, expected["base"], "k:", marker=".", label="probe: base memory")
    ax.plot(probe_pairs, expected["oracle"], "k--", marker=".", label="probe: oracle cache")
    for name, result in results.items():
        ax.plot(pairs, [s["accuracy"] for s in result["slices"]], "o-", label=f"trained {name}")
    ax.set_xlabel("key-value pairs")
    ax.set_ylabel("recall / accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(header, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
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
        help="override the mqar_capacity task base for every model, e.g. --set train.steps=100",
    )
    args = parser.parse_args(argv)
    root = Path(args.out)
    start = time.time()
    try:
        configs = check_overrides(root, args.set)
        run_all(root, args.jobs, args.set)
    except (ValueError, OSError) as error:
        print(f"growmem demo: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"growmem demo: error: {error}", file=sys.stderr)
        return 1
    report(root, configs)
    print(f"demo took {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
