"""What subnormal floats cost a training step on the CPU, and what flushing them saves.

Usage: python -m benchmarks.bench_denormals [--dt-bias 0 2 5] [--repeats 5]
gated_delta models (hidden 128, 2 layers, 2 heads of 64, the S-NIAH cells' shape, byte
vocabulary, float32), one fwd+bwd of a batch of 16 x 256 tokens, with the decay gates' bias
dt_bias set so that the per-token log-decay -exp(A_log) softplus(dt_bias + ...) is strong (a
trained model's decays, at init): chunk decays exp(G_i - G_j) then pass through the subnormal
range. Each model runs with subnormals kept and with them flushed to zero
(``torch.set_flush_denormal``, what ``growmem train`` and the CLI do: growmem.utils.denormals),
in interleaved rounds, median time, one thread. "init" is the default init (mild decays).
Writes results/denormals.json.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import build_model, time_interleaved, write_json


def train_step(model, ids, flush: bool):
    def run() -> None:
        torch.set_flush_denormal(flush)  # thread state: set on every call, rounds interleave
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dt-bias", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.set_flush_denormal(False):
        raise SystemExit("this CPU cannot flush subnormal floats: nothing to measure")
    ids = torch.randint(
        0, 259, (args.batch, args.length), generator=torch.Generator().manual_seed(0)
    )
    rows = []
    for dt_bias in [None, *args.dt_bias]:
        model = build_model("gated_delta", hidden=128, layers=2, heads=2, segment_size=64)
        if dt_bias is not None:
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.mixer.dt_bias.fill_(dt_bias)
        times = time_interleaved(
            {flush: train_step(model, ids, flush) for flush in (False, True)}, args.repeats
        )
        torch.set_flush_denormal(False)
        row = {
            "dt_bias": "init" if dt_bias is None else dt_bias,
            "seconds_subnormals_kept": times[False],
            "seconds_flushed": times[True],
            "speedup": times[False] / times[True],
        }
        rows.append(row)
        print(row, flush=True)
    path = write_json(
        "denormals",
        {
            "what": "fwd+bwd seconds of a gated_delta training step, subnormals kept vs flushed",
            "batch": args.batch,
            "length": args.length,
            "threads": args.threads,
            "repeats": args.repeats,
            "rows": rows,
        },
    )
    print(path)


if __name__ == "__main__":
    main()
