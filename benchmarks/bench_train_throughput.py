"""Training throughput of whole models against sequence length, every model family.

Usage: python -m benchmarks.bench_train_throughput [--lengths 1024 4096 16384] [--repeats 2]
Models of one size (hidden 256, 4 layers, 4 heads, byte vocabulary, float32, segment 256,
mini-batch 64 for the deep rules): Transformer++, gated_delta, swla and titans, each without
Memory Caching and with grm and ssc. One fwd+bwd of batch 1 per model, interleaved rounds,
median time, one thread by default. Writes results/train_throughput.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import MODELS, build_model, time_interleaved, write_json


def step(model, ids):
    def run() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {
        name: build_model(spec, args.hidden, args.layers, args.heads, args.segment_size)
        for name, spec in MODELS.items()
    }
    rows = []
    for T in args.lengths:
        ids = torch.randint(0, 259, (1, T), generator=torch.Generator().manual_seed(T))
        seconds = time_interleaved(
            {name: step(m, ids) for name, m in models.items()}, repeats=args.repeats
        )
        base = seconds["transformer++"]
        row = {
            "T": T,
            "models": {
                name: {
                    "seconds": s,
                    "tokens_per_s": T / s,
                    "time_ratio_vs_transformer": s / base,
                }
                for name, s in seconds.items()
            },
        }
        rows.append(row)
        cells = "  ".join(f"{n}={c['tokens_per_s']:,.0f}" for n, c in row["models"].items())
        print(f"T={T:6d} tokens/s: {cells}", flush=True)
    setting = {
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "segment_size": args.segment_size,
        "dtype": "float32",
        "batch": 1,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    print(f"wrote {write_json('train_throughput', {'setting': setting, 'rows': rows})}")


if __name__ == "__main__":
    main()
