"""Deep memories (titans, dla) with Memory Caching: fwd+bwd time and peak memory vs SDPA.

Usage: python -m benchmarks.bench_deep_memory [--lengths 2048 4096 8192] [--rules titans dla]
Writes results/deep_memory.json: per T, the median fwd+bwd seconds of causal SDPA and of
memory_caching for each rule x aggregation (interleaved rounds, ratios against SDPA), and the
peak resident memory of one fwd+bwd of each, measured in a fresh process (ru_maxrss growth
over the process after building the inputs).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch
import torch.nn.functional as F

from benchmarks.common import fwd_bwd, sdpa_fwd_bwd, time_interleaved, write_json
from growmem.ops import Caching, DeepMemory, memory_caching


def deep_inputs(rule: str, T: int, H: int, D: int, expansion: int, seed: int = 0) -> list:
    torch.manual_seed(seed)
    q, v, u = (torch.randn(1, T, H, D) for _ in range(3))
    k = F.normalize(torch.randn(1, T, H, D), dim=-1)
    eta = torch.rand(1, T, H) * 0.1
    g = -torch.rand(1, T, H) * 0.05 if rule == "titans" else None
    beta = torch.rand(1, T, H) if rule == "titans" else None
    W1 = torch.randn(H, D, expansion * D) * 0.02
    W2 = torch.randn(H, expansion * D, D) * 0.02
    return [None if x is None else x.requires_grad_() for x in (q, k, v, u, eta, g, beta, W1, W2)]


def mc_call(rule: str, aggregation: str, x: list, args) -> torch.Tensor:
    q, k, v, u, eta, g, beta, W1, W2 = x
    gates = {"eta": eta} if rule == "dla" else {"eta": eta, "g": g, "beta": beta}
    return memory_caching(
        q,
        k,
        v,
        u,
        memory=DeepMemory(rule, mini_batch=args.mini_batch, max_grad_norm=args.max_grad_norm),
        caching=Caching(aggregation, segment_size=args.segment_size, top_k=args.top_k),
        gates=gates,
        init_weights=(W1, W2),
    )


def _peak_rss(kind: str, rule: str, aggregation: str, T: int, args, queue) -> None:
    torch.set_num_threads(args.threads)
    if kind == "sdpa":
        run = sdpa_fwd_bwd(1, args.heads, T, args.dim)
    else:
        x = deep_inputs(rule, T, args.heads, args.dim, args.expansion)
        run = fwd_bwd(lambda: mc_call(rule, aggregation, x, args), [t for t in x if t is not None])
    # ru_maxrss survives exec (a spawned child starts with its parent's peak), so reset the
    # kernel's high-water mark instead and read it back
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    run()
    queue.put((_status_kib("VmHWM") - before) * 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss(kind: str, rule: str, aggregation: str, T: int, args) -> int:
    """Peak RSS growth (bytes) of one fwd+bwd, in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss, args=(kind, rule, aggregation, T, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rules", nargs="+", default=["titans", "dla"])
    parser.add_argument("--aggregations", nargs="+", default=["none", "grm", "soup", "ssc"])
    parser.add_argument("--segment-size", type=int, default=256)
    parser.add_argument("--mini-batch", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: torch's default)"
    )
    parser.add_argument("--out", default="deep_memory")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    rows = []
    for T in args.lengths:
        fns = {"sdpa": sdpa_fwd_bwd(1, args.heads, T, args.dim)}
        for rule in args.rules:
            for agg in args.aggregations:
                x = deep_inputs(rule, T, args.heads, args.dim, args.expansion)
                fns[f"{rule}+{agg}"] = fwd_bwd(
                    lambda rule=rule, agg=agg, x=x: mc_call(rule, agg, x, args),
                    [t for t in x if t is not None],
                )
        seconds = time_interleaved(fns, repeats=args.repeats)
        row = {"T": T, "sdpa_s": seconds["sdpa"], "cells": {}}
        for name, t in seconds.items():
            if name == "sdpa":
                continue
            row["cells"][name] = {"seconds": t, "ratio_vs_sdpa": t / seconds["sdpa"]}
        if not args.skip_memory:
            row["sdpa_peak_bytes"] = peak_rss("sdpa", "", "", T, args)
            for name, cell in row["cells"].items():
                rule, agg = name.split("+")
                cell["peak_bytes"] = peak_rss("mc", rule, agg, T, args)
                cell["peak_ratio_vs_sdpa"] = cell["peak_bytes"] / max(row["sdpa_peak_bytes"], 1)
        rows.append(row)
        cells = "  ".join(f"{n}={c['ratio_vs_sdpa']:.2f}x" for n, c in row["cells"].items())
        print(f"T={T:6d}  sdpa={seconds['sdpa'] * 1e3:8.1f} ms  {cells}", flush=True)

    path = write_json(
        args.out,
        {
            "benchmark": "deep memories with Memory Caching, fwd+bwd vs causal SDPA",
            "setting": {
                "B": 1,
                "H": args.heads,
                "D": args.dim,
                "expansion": args.expansion,
                "dtype": "float32",
                "segment_size": args.segment_size,
                "mini_batch": args.mini_batch,
                "top_k": args.top_k,
                "max_grad_norm": args.max_grad_norm,
                "statistic": "median seconds over interleaved rounds; peak = VmHWM growth "
                "of one fwd+bwd in a fresh process",
            },
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
