"""fwd+bwd time of every linear-family rule against causal SDPA attention, as ratios.

Usage: python -m benchmarks.bench_linear_memory [--lengths 1024 2048 ...] [--repeats 3]
Writes results/linear_memory.json.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import fwd_bwd, sdpa_fwd_bwd, time_interleaved, write_json
from growmem.ops import linear_memory
from growmem.ops.checks import LINEAR_RULES, RULE_GATES


def make_inputs(rule: str, B: int, T: int, H: int, D: int) -> tuple[list, dict]:
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = F.normalize(torch.randn(B, T, H, D), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, D, requires_grad=True)
    gates = {
        "g": (-F.softplus(torch.randn(B, T, H)) * 0.1).requires_grad_(),
        "beta": torch.rand(B, T, H).requires_grad_(),
        "lam": torch.rand(B, T, H).requires_grad_(),
    }
    gates = {n: x for n, x in gates.items() if n in RULE_GATES[rule]}
    return [q, k, v, *gates.values()], gates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--rules", nargs="+", default=list(LINEAR_RULES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--out", default="linear_memory", help="results/NAME.json to write")
    parser.add_argument("--no-json", action="store_true", help="print the table only")
    args = parser.parse_args()
    B, H, D = 1, args.heads, args.dim
    torch.manual_seed(0)

    rows = []
    for T in args.lengths:
        fns = {"sdpa": sdpa_fwd_bwd(B, H, T, D)}
        for rule in args.rules:
            inputs, gates = make_inputs(rule, B, T, H, D)
            fns[rule] = fwd_bwd(
                lambda inputs=inputs, gates=gates, rule=rule: linear_memory(
                    *inputs[:3], rule=rule, chunk_size=args.chunk_size, **gates
                ),
                inputs,
            )
        seconds = time_interleaved(fns, repeats=args.repeats)
        t_sdpa = seconds["sdpa"]
        row = {
            "T": T,
            "sdpa_s": t_sdpa,
            "rules": {
                r: {"seconds": seconds[r], "ratio_vs_sdpa": seconds[r] / t_sdpa} for r in args.rules
            },
        }
        rows.append(row)
        cells = "  ".join(f"{r}={row['rules'][r]['ratio_vs_sdpa']:.3f}x" for r in args.rules)
        print(f"T={T:6d}  sdpa={t_sdpa * 1e3:8.1f} ms  {cells}", flush=True)

    if args.no_json:
        return
    path = write_json(
        args.out,
        {
            "benchmark": "linear_memory fwd+bwd vs causal SDPA",
            "setting": {
                "B": B,
                "H": H,
                "Dk": D,
                "Dv": D,
                "dtype": "float32",
                "chunk_size": args.chunk_size,
                "repeats": args.repeats,
                "statistic": "median seconds over interleaved rounds; ratio = rule / sdpa",
            },
            "rows": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
