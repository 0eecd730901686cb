"""The Triton reads of Memory Caching (growmem/ops/caching/triton_reads.py) on a GPU: outputs
and gradients against the PyTorch reads (reads.py) at odd and at model sizes, float32 and
bfloat16, then forward+backward time of both, as JSON.

    python -m benchmarks.check_triton_reads --out results/triton_reads_gpu.json

Needs CUDA (the kernels compiled for it) and triton (``pip install 'growmem[triton]'``); on
CPU, with TRITON_INTERPRET=1, it checks the smallest size only (a smoke test of the script;
the suite's tests/ops/test_triton_reads.py is the CPU check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from growmem.ops.caching.reads import mixed_read, sparse_read

# (B, H, T, N, Dk, Dv, k): the suite's odd size, then 4k and 16k tokens in segments of 256
# (the caches a model of the paper's sizes reads) at head sizes 128 and 64
SIZES = [(2, 3, 37, 5, 7, 9, 2), (1, 16, 4096, 16, 128, 128, 2), (2, 16, 16384, 64, 64, 64, 2)]
# relative errors allowed against float32 torch: float32 kernels sum in another order;
# bfloat16 inputs round to 8 bits of mantissa
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def inputs(B, H, T, N, Dk, Dv, k, dtype, device, seed=0):
    """Random reads as memory_caching makes them: segments of T / N tokens, token t sees the
    segments before its own (grm weights a softmax over them, ssc picks k of them)."""
    gen = torch.Generator().manual_seed(seed)
    L = -(-T // N)
    spans = [(a, min(a + L, T), a // L) for a in range(0, T, L)]
    n_tok = torch.tensor([n for a, b, n in spans for _ in range(a, b)])
    Q = torch.randn(B, H, T, Dk, generator=gen) / Dk**0.5
    St = torch.randn(B, H, N, Dk, Dv, generator=gen) / Dk**0.5
    logits = torch.randn(B, H, T, N, generator=gen)
    seen = torch.arange(N)[None, :] < n_tok[:, None]  # [T, N]
    W = torch.where(seen, logits, -torch.inf).softmax(-1).nan_to_num(0.0)
    idx = torch.where(seen, logits, -torch.inf).topk(k, -1).indices
    valid = torch.arange(k)[None, :] < n_tok[:, None].clamp(max=k)  # [T, k]
    w = torch.randn(B, H, T, k, generator=gen).softmax(-1)
    cast = {"Q": Q, "St": St, "W": W, "w": w}
    cast = {n: x.to(device, dtype).requires_grad_() for n, x in cast.items()}
    idx, valid = idx.to(device), valid.expand(B, H, T, k).to(device)
    return cast, spans, idx, valid


def reads(x, spans, idx, valid, kernels):
    """{name: (the read, its inputs)} of the dense and the routed read."""
    dense = kernels.triton_mixed_read if kernels else mixed_read
    routed = kernels.triton_routed_read if kernels else sparse_read
    return {
        "dense": (lambda: dense(x["Q"], x["St"], x["W"], spans), [x["Q"], x["St"], x["W"]]),
        "routed": (lambda: routed(x["Q"], x["St"], idx, x["w"], valid), [x["Q"], x["St"], x["w"]]),
    }


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the results as JSON there")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("needs CUDA, or TRITON_INTERPRET=1 for a smoke test on CPU")
    import triton.testing

    from growmem.ops.caching import triton_reads as kernels  # needs triton

    device = "cuda" if cuda else "cpu"
    results = []
    for size in SIZES if cuda else SIZES[:1]:
        for dtype in (torch.float32, torch.bfloat16) if cuda else (torch.float32,):
            x, spans, idx, valid = inputs(*size, dtype, device)
            x32 = {n: t.detach().float().requires_grad_() for n, t in x.items()}
            ref = reads(x32, spans, idx, valid, None)
            for name, (fn, leaves) in reads(x, spans, idx, valid, kernels).items():
                ref_fn, ref_leaves = ref[name]
                o, o_ref = fn(), ref_fn()
                dout = torch.randn_like(o_ref)
                grads = torch.autograd.grad(o, leaves, dout.to(o.dtype))
                grads_ref = torch.autograd.grad(o_ref, ref_leaves, dout)
                errors = [rel(o, o_ref)] + [
                    rel(g, r) for g, r in zip(grads, grads_ref, strict=True)
                ]
                row = {"read": name, "size": size, "dtype": str(dtype), "rel_err": errors}
                row["ok"] = max(errors) < TOL[dtype]
                if cuda:
                    torch_fn, torch_leaves = reads(x, spans, idx, valid, None)[name]
                    g = dout.to(dtype)
                    for label, f, ls in (("triton", fn, leaves), ("torch", torch_fn, torch_leaves)):

                        def step(f=f, ls=ls, g=g):
                            torch.autograd.grad(f(), ls, g)

                        row[f"{label}_ms"] = triton.testing.do_bench(step, rep=args.repeats)
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.out:
        device_name = torch.cuda.get_device_name() if cuda else "cpu"
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "rows": results}, f, indent=1)
    if not all(r["ok"] for r in results):
        sys.exit("some reads differ from torch beyond tolerance")


if __name__ == "__main__":
    main()
