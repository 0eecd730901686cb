"""The command line of the capacity probe: ``growmem probe capacity`` (also ``python -m
growmem.probe capacity``), its table and its plot."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from growmem.cli import int_at_least
from growmem.ops.spec import INITS, SUMMARIES
from growmem.probe import capacity
from growmem.probe.capacity import (
    DEFAULT_GATES,
    DEFAULT_PAIRS,
    KEYS,
    RULES,
    capacity_probe,
)
from growmem.utils.provenance import write_json

DESCRIPTION = capacity.__doc__


def plot(payload: dict, path: Path) -> Path:
    """Recall against pairs, one line per series (error bars: SEM over draws), a dotted line
    at P = D."""
    s = payload["settings"]
    fixed = {"base": ("k", "-"), "oracle": ("k", "--"), "uniform": ("0.55", "-")}
    gates = list(s["gate_scales"])  # "default" (the library's gates), then the scales
    markers = {"none": "o", "l2": "^", "centered": "s"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in payload["series"]:
        if entry["name"] in fixed:
            (color, line), marker = fixed[entry["name"]], "o"
        else:  # a colour per gate setting, a line per aggregation, a marker per geometry
            color = f"C{gates.index(entry['gates'])}"
            line = "-" if entry["aggregation"] == "grm" else "-."
            marker = markers[entry["gate_norm"]]
        ax.errorbar(
            payload["pairs"], entry["recall"], yerr=entry["sem"], color=color, linestyle=line,
            marker=marker, markersize=3, capsize=2, label=entry["name"],
        )  # fmt: skip
    ax.axvline(s["head_dim"], color="0.6", linestyle=":", label="P = head dim")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key-value pairs P")
    ax.set_ylabel("recall (nearest value is the right one)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(
        f"capacity, no training: {s['rule']} ({s['init']}), head dim {s['head_dim']}, "
        f"segment {s['segment_size']}, {s['draws']} draws",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(payload: dict) -> str:
    """The recall of every series per P, as a Markdown table."""
    names = [e["name"] for e in payload["series"]]
    lines = [
        "| P | segments | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, P in enumerate(payload["pairs"]):
        cells = [f"{e['recall'][i]:.2f}" for e in payload["series"]]
        lines.append(f"| {P} | {payload['segments'][i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``probe capacity`` (reused by the ``growmem`` command)."""
    parser.add_argument("--head-dim", type=int_at_least(1), default=16, help="D (default 16)")
    parser.add_argument(
        "--segment-size", type=int_at_least(1), default=16, help="tokens per segment"
    )
    parser.add_argument(
        "--pairs", type=int_at_least(1), nargs="+", default=list(DEFAULT_PAIRS),
        help="numbers of key-value pairs to probe",
    )  # fmt: skip
    parser.add_argument("--draws", type=int_at_least(1), default=20, help="draws per P")
    parser.add_argument("--rule", choices=RULES, default="gated_delta", help="memory rule")
    parser.add_argument(
        "--init", choices=INITS, default="continuous", help="memory at each segment start"
    )
    parser.add_argument(
        "--filler", type=int_at_least(0), default=0, help="non-writing tokens after each pair"
    )
    parser.add_argument("--keys", choices=KEYS, default="random", help="key distribution")
    parser.add_argument("--summary", choices=SUMMARIES, default="mean", help="segment summary")
    parser.add_argument("--top-k", type=int_at_least(1), default=2, help="caches ssc selects")
    parser.add_argument(
        "--gate-scale", nargs="+", default=[DEFAULT_GATES], metavar="SCALE",
        help="gates of grm/ssc: default (the library's: cosine with the layer's initial "
        "temperature) or dot-product scales: numbers, invsqrtD (1/sqrt(D)), raw (1), sqrtD",
    )  # fmt: skip
    parser.add_argument(
        "--normalize-summaries", action="store_true",
        help="also grm/ssc with centred, L2-normalised summaries (gate_norm centered)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--out", default="results/probe", help="folder of the JSON and PNG (default %(default)s)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the probe with parsed ``args``; write JSON and PNG; print the table. Returns the
    exit status (2 with a one-line error for bad settings)."""
    start = time.perf_counter()
    try:
        payload = capacity_probe(
            head_dim=args.head_dim, segment_size=args.segment_size, pairs=args.pairs,
            draws=args.draws, rule=args.rule, init=args.init, filler=args.filler, keys=args.keys,
            summary=args.summary, top_k=args.top_k, gate_scales=args.gate_scale,
            normalize_summaries=args.normalize_summaries, seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        print(f"probe capacity: error: {error}", file=sys.stderr)
        return 2
    payload["seconds"] = round(time.perf_counter() - start, 3)
    s = payload["settings"]
    stem = f"capacity_{s['rule']}_{s['init']}_d{s['head_dim']}_seg{s['segment_size']}"
    out = Path(args.out)
    json_path = write_json(out / f"{stem}.json", payload)
    png_path = plot(payload, out / f"{stem}.png")
    print(table(payload))
    print(f"\n{json_path}\n{png_path}\n({payload['seconds']:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m growmem.probe ARGS`` is ``growmem probe ARGS``."""
    from growmem import cli

    return cli.main(["probe", *(sys.argv[1:] if argv is None else argv)])
