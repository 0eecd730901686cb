"""Decoding with a growing memory: per-token latency and cache bytes against context length.

Usage: python -m benchmarks.bench_models [--contexts 1024 4096 16384 32768] [--steps 16]
Models of one size (hidden 256, 4 layers, 4 heads, byte vocabulary, float32): the
Transformer++ baseline and gated_delta, swla and titans with aggregation none, grm and ssc
(segment 256, top-2).
For every context length each model prefills that many tokens (timed once), then the models
decode ``steps`` tokens each, one step per model in turn (interleaved rounds), continuing
their own caches. Writes results/models_decode.json and results/models_decode.png; ratios
are against Transformer++ at the same context.
"""

from __future__ import annotations

import argparse
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from benchmarks.common import MODELS, RESULTS, build_model, write_json
from growmem.models import CACHE_FIELD

BASELINE = "transformer++"


@torch.no_grad()
def bench_context(models: dict, L: int, steps: int) -> dict:
    prompt = torch.randint(0, 259, (1, L), generator=torch.Generator().manual_seed(L))
    caches, prefill_s = {}, {}
    for name, model in models.items():
        t0 = time.perf_counter()
        caches[name] = getattr(model(prompt, use_cache=True), CACHE_FIELD)
        prefill_s[name] = time.perf_counter() - t0
    token = prompt[:, -1:]
    step_s: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(steps + 1):  # the first round warms up
        for name, model in models.items():
            t0 = time.perf_counter()
            out = model(token, cache=caches[name], use_cache=True)
            caches[name] = getattr(out, CACHE_FIELD)
            step_s[name].append(time.perf_counter() - t0)
    base_step = statistics.median(step_s[BASELINE][1:])
    base_bytes = caches[BASELINE].nbytes()
    row = {"context": L, "models": {}}
    for name in models:
        step = statistics.median(step_s[name][1:])
        nbytes = caches[name].nbytes()
        row["models"][name] = {
            "prefill_s": prefill_s[name],
            "prefill_tokens_per_s": L / prefill_s[name],
            "decode_step_s": step,
            "decode_tokens_per_s": 1 / step,
            "cache_bytes": nbytes,
            "decode_ratio_vs_transformer": step / base_step,
            "cache_ratio_vs_transformer": nbytes / base_bytes,
        }
    return row


def plot(rows: list[dict], path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    contexts = [r["context"] for r in rows]
    for name in rows[0]["models"]:
        cells = [r["models"][name] for r in rows]
        axes[0].plot(contexts, [c["decode_step_s"] * 1e3 for c in cells], "o-", label=name)
        axes[1].plot(contexts, [c["cache_bytes"] / 2**20 for c in cells], "o-", label=name)
        axes[2].plot(contexts, [c["prefill_tokens_per_s"] for c in cells], "o-", label=name)
    titles = ("decode latency (ms / token)", "cache (MiB)", "prefill (tokens / s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment-size", type=int, default=256)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: batch-1 decoding is latency-bound, and one thread is "
        "steadier than two on a shared 2-core machine; 0 keeps torch's default)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {
        name: build_model(spec, args.hidden, args.layers, args.heads, args.segment_size).eval()
        for name, spec in MODELS.items()
    }
    rows = []
    for L in args.contexts:
        row = bench_context(models, L, args.steps)
        rows.append(row)
        cells = "  ".join(
            f"{n}: {c['decode_step_s'] * 1e3:6.2f} ms ({c['decode_ratio_vs_transformer']:.2f}x), "
            f"{c['cache_bytes'] / 2**20:7.2f} MiB ({c['cache_ratio_vs_transformer']:.3f}x)"
            for n, c in row["models"].items()
        )
        print(f"context {L:6d}  {cells}", flush=True)
    payload = {
        "setting": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "segment_size": args.segment_size,
            "top_k": 2,
            "dtype": "float32",
            "batch": 1,
            "steps": args.steps,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
    }
    path = write_json("models_decode", payload)
    plot(rows, RESULTS / "models_decode.png")
    print(f"wrote {path} and {RESULTS / 'models_decode.png'}")


if __name__ == "__main__":
    main()
