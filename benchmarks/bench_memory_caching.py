"""Memory Caching speed: training fwd+bwd and decode steps against causal SDPA attention.

Usage: python -m benchmarks.bench_memory_caching [--lengths ...] [--contexts ...]
Writes results/memory_caching.json with
- train: fwd+bwd seconds of memory_caching for each aggregation and of causal SDPA, per T;
- decode: seconds of one decode step with a cache of each context length, and cache bytes,
  for memory_caching (residual, grm, ssc, loglinear) and for SDPA over a KV cache.
Ratios are taken against SDPA measured in the same interleaved rounds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import fwd_bwd, sdpa_fwd_bwd, time_interleaved, write_json
from growmem.layers.config import DEFAULT_GATE_TEMPERATURE
from growmem.ops import Caching, MatrixMemory, memory_caching
from growmem.ops.spec import DEFAULT_GATE_NORM


def mc_inputs(B: int, T: int, H: int, D: int, requires_grad: bool) -> list[torch.Tensor]:
    q, v, u = (torch.randn(B, T, H, D) for _ in range(3))
    k = F.normalize(torch.randn(B, T, H, D), dim=-1)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, u)]


def caching(args, aggregation: str) -> Caching:
    return Caching(
        aggregation, segment_size=args.segment_size, top_k=args.top_k, gate_norm=args.gate_norm
    )


def gate_inputs(args, H: int, requires_grad: bool) -> dict[str, torch.Tensor]:
    """The gate inputs asked for: a per-head temperature and online bias, as a layer's."""
    temperature = args.gate_temperature if args.gate_temperature > 0 else None
    values = {"temperature": temperature, "online_bias": args.online_bias}
    return {
        name: torch.full((H,), value).requires_grad_(requires_grad)
        for name, value in values.items()
        if value is not None
    }


def bench_train(args) -> list[dict]:
    B, H, D = 1, args.heads, args.dim
    rows = []
    for T in args.lengths:
        fns = {"sdpa": sdpa_fwd_bwd(B, H, T, D)}
        for agg in args.aggregations:
            inputs = mc_inputs(B, T, H, D, requires_grad=True)
            gates = gate_inputs(args, H, requires_grad=True)
            fns[agg] = fwd_bwd(
                lambda inputs=inputs, agg=agg, gates=gates: memory_caching(
                    *inputs,
                    memory=MatrixMemory(args.rule),
                    caching=caching(args, agg),
                    gates=gates,
                ),
                [*inputs, *gates.values()],
            )
        seconds = time_interleaved(fns, repeats=args.repeats)
        row = {
            "T": T,
            "sdpa_s": seconds["sdpa"],
            "aggregations": {
                a: {"seconds": seconds[a], "ratio_vs_sdpa": seconds[a] / seconds["sdpa"]}
                for a in args.aggregations
            },
        }
        rows.append(row)
        cells = "  ".join(f"{a}={r['ratio_vs_sdpa']:.3f}x" for a, r in row["aggregations"].items())
        print(f"train T={T:6d}  sdpa={seconds['sdpa'] * 1e3:8.1f} ms  {cells}", flush=True)
    return rows


@torch.no_grad()
def bench_decode(args) -> list[dict]:
    B, H, D = 1, args.heads, args.dim
    rows = []
    for ctx in args.contexts:
        # The step's token is the ctx-th: attention reads ctx keys, Memory Caching continues
        # from ctx - 1 tokens (so the step is a typical one, not one that closes a segment).
        K, V = torch.randn(B, H, ctx, D), torch.randn(B, H, ctx, D)
        q1 = torch.randn(B, H, 1, D)
        fns = {"sdpa": lambda q1=q1, K=K, V=V: F.scaled_dot_product_attention(q1, K, V)}
        kv_bytes = (K.numel() + V.numel()) * K.element_size()
        caches, step_inputs = {}, mc_inputs(B, 1, H, D, requires_grad=False)
        for agg in args.decode_aggregations:
            kw = dict(
                memory=MatrixMemory(args.rule),
                caching=caching(args, agg),
                gates=gate_inputs(args, H, requires_grad=False),
            )
            _, caches[agg] = memory_caching(
                *mc_inputs(B, ctx - 1, H, D, False), **kw, output_cache=True
            )
            fns[agg] = lambda kw=kw, cache=caches[agg], step=step_inputs: memory_caching(
                *step, **kw, cache=cache, output_cache=True
            )
        seconds = time_interleaved(fns, repeats=args.decode_repeats, warmup=3)
        row = {
            "context": ctx,
            "sdpa_step_s": seconds["sdpa"],
            "kv_cache_bytes": kv_bytes,
            "aggregations": {},
        }
        for agg in args.decode_aggregations:
            row["aggregations"][agg] = {
                "step_s": seconds[agg],
                "step_ratio_vs_sdpa": seconds[agg] / seconds["sdpa"],
                "cache_bytes": caches[agg].nbytes(),
                "cache_ratio_vs_kv": caches[agg].nbytes() / kv_bytes,
            }
        rows.append(row)
        cells = "  ".join(
            f"{a}: step {r['step_ratio_vs_sdpa']:.3f}x bytes {r['cache_ratio_vs_kv']:.3f}x"
            for a, r in row["aggregations"].items()
        )
        print(
            f"decode ctx={ctx:6d}  sdpa step={seconds['sdpa'] * 1e6:8.1f} us  {cells}", flush=True
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument(
        "--aggregations",
        nargs="+",
        default=["none", "residual", "grm", "soup", "ssc", "loglinear", "mean"],
    )
    parser.add_argument(
        "--decode-aggregations", nargs="+", default=["residual", "grm", "ssc", "loglinear"]
    )
    parser.add_argument("--rule", default="linear")
    parser.add_argument("--segment-size", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2)
    # the library's default gates (cosine with a learned temperature from 5); the JSON
    # records the gates measured
    parser.add_argument(
        "--gate-norm", default=DEFAULT_GATE_NORM, choices=["none", "l2", "centered"]
    )
    parser.add_argument(
        "--gate-temperature",
        type=float,
        default=DEFAULT_GATE_TEMPERATURE,
        help="the per-head temperature's start (learned); 0 or less: none",
    )
    parser.add_argument(
        "--online-bias", type=float, default=None, help="a per-head online-logit bias (learned)"
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-repeats", type=int, default=50)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--out", default="memory_caching")
    args = parser.parse_args()
    torch.manual_seed(0)
    train = [] if args.skip_train else bench_train(args)
    decode = [] if args.skip_decode else bench_decode(args)
    path = write_json(
        args.out,
        {
            "benchmark": "memory_caching fwd+bwd and decode vs causal SDPA",
            "setting": {
                "B": 1,
                "H": args.heads,
                "Dk": args.dim,
                "Dv": args.dim,
                "dtype": "float32",
                "rule": args.rule,
                "segment_size": args.segment_size,
                "top_k": args.top_k,
                "gate_norm": args.gate_norm,
                "gate_temperature": args.gate_temperature,
                "online_bias": args.online_bias,
                "statistic": "median seconds over interleaved rounds",
            },
            "train": train,
            "decode": decode,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
