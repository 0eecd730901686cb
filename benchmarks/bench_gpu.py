"""The GPU benchmark in one command: scans, Memory Caching, training and decoding speed.

Usage: python -m benchmarks.bench_gpu [--out results/gpu_bench.json] [--budget-s 400]
       python -m benchmarks.bench_gpu --smoke   (tiny sizes, CPU or GPU, a few seconds)

Sections (docs/api.md §9 says how to read them):
- ops: fwd+bwd tokens/s at 4k, 16k and 64k tokens a sequence (batch B = 64k / T, 16 heads of
  128 dims, bf16 inputs) of causal attention (torch SDPA, flash backend), growmem's PyTorch
  chunk scan of gated_delta, the same through fla (scan_impl "fla") and fla's own
  chunk_gated_delta_rule where fla is installed, and memory_caching over gated_delta with
  none, residual, grm and ssc (segment 256, top-2; scans as scan_impl "auto" chooses).
- train: training tokens/s (forward, backward, AdamW step; bf16 autocast, fp32 weights) of
  the 760M-class model (growmem/configs/lm_760m.yaml) for Transformer++, gated_delta,
  gated_delta+grm and gated_delta+ssc at 4096 tokens a sequence; the batch halves until it
  fits (a model that does not fit at batch 1 is skipped with the reason).
- decode: per-token latency and cache bytes of the same models in bf16 after a prefill of
  4k-128k tokens (batch 1, prefilled in pieces through the cache, as ``generate`` continues
  a GrowMemCache).
Every measurement warms up, synchronises the GPU around each call, runs the candidates in
interleaved rounds and keeps the median (training runs one model at a time: four 760M
models with their optimizer states do not fit together). A time budget stops the run early;
the JSON, rewritten after every section, then says what was skipped and why.
"""

from __future__ import annotations

import argparse
import gc
import time
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import RESULTS, fwd_bwd, machine, time_interleaved
from growmem.cli import CONFIGS
from growmem.models import CACHE_FIELD, GrowMemConfig, GrowMemForCausalLM
from growmem.ops import Caching, MatrixMemory, memory_caching
from growmem.ops.linear import chunk_linear_memory, fla_scan
from growmem.training.config import load_config
from growmem.utils.provenance import write_json

MODELS = ("transformer", "gated_delta", "gated_delta+grm", "gated_delta+ssc")
AGGREGATIONS = ("none", "residual", "grm", "ssc")
RULE = "gated_delta"

FULL = dict(
    lengths=[4096, 16384, 65536],
    tokens=65536,  # tokens a batch at every length: B = tokens / T
    heads=16,
    dim=128,
    segment_size=256,
    top_k=2,
    preset="lm_760m",
    vocab=32000,
    train_seq=4096,
    train_batch=8,
    train_steps=5,
    contexts=[4096, 16384, 65536, 131072],
    prefill_piece=8192,  # attention with a cache takes a mask: its kernels tile less well
    decode_steps=16,
    rounds=5,
    warmup=2,
)
SMOKE = dict(
    FULL,
    lengths=[64, 128],
    tokens=128,
    heads=2,
    dim=16,
    segment_size=32,
    preset=None,
    vocab=259,
    train_seq=64,
    train_batch=2,
    train_steps=2,
    contexts=[64, 160],
    prefill_piece=64,
    decode_steps=2,
    rounds=2,
    warmup=1,
)
# The smoke mode's model: the 760M preset's structure at toy sizes.
SMOKE_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_heads=2,
    intermediate_size=64,
    memory={"rule": RULE, "caching": {"segment_size": 16}},
)


class Budget:
    """Wall-clock budget of the whole run: ``over()`` says whether to stop starting things."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def over(self) -> bool:
        return time.monotonic() - self.start > self.seconds

    def skipped(self) -> dict:
        return {"skipped": f"time budget of {self.seconds:.0f} s spent"}


def is_oom(error: BaseException) -> bool:
    """An out-of-memory error of any device (CUDA's own class, or the allocator's message)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict, s: dict, device: torch.device) -> dict[str, float | str]:
    """Median seconds of each closure over interleaved rounds, each call synchronised; a
    closure that runs out of memory in its warm-up gets the reason instead of a time."""
    results, alive = {}, {}
    for name, fn in fns.items():

        def synced(fn=fn):
            fn()
            sync(device)

        try:
            for _ in range(s["warmup"]):
                synced()
            alive[name] = synced
        except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
            if not is_oom(error):
                raise
            results[name] = f"out of memory: {str(error).splitlines()[0]}"
            free_memory(device)
    try:
        results.update(time_interleaved(alive, repeats=s["rounds"], warmup=0))
    except RuntimeError as error:  # out of memory in the rounds: no time for any of them
        if not is_oom(error):
            raise
        results.update({name: f"out of memory: {str(error).splitlines()[0]}" for name in alive})
        free_memory(device)
    return results


def model_config(spec: str, s: dict) -> GrowMemConfig:
    """The 760M-class model of ``spec`` (smoke mode: the same at toy sizes)."""
    from growmem.models.model_spec import ModelSpec
    from growmem.training.config import nested_model

    if s["preset"] is None:
        model = ModelSpec.parse(spec).apply(nested_model(SMOKE_MODEL))
    else:
        model = load_config(CONFIGS / f"{s['preset']}.yaml", model=spec, presets=CONFIGS).model
    memory = model.get("memory")
    if memory is not None:  # ssc reads the top-k cached segments
        model["memory"] = {**memory, "caching": {**memory.get("caching", {}), "top_k": s["top_k"]}}
    return GrowMemConfig(vocab_size=s["vocab"], **model)


def installed(distribution: str) -> str | None:
    """The installed version of ``distribution``, None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def fla_ready(device: torch.device) -> bool:
    return device.type == "cuda" and fla_scan.load_fla()[0] is not None


def bench_ops(s: dict, device: torch.device, budget: Budget) -> list[dict]:
    """fwd+bwd of attention, the scans and Memory Caching at each sequence length."""
    rows = []
    for T in s["lengths"]:
        B = max(1, s["tokens"] // T)
        row = (
            {"T": T, "batch": B, **budget.skipped()} if budget.over() else ops_row(s, T, B, device)
        )
        rows.append(row)
        free_memory(device)
    return rows


def ops_row(s: dict, T: int, B: int, device: torch.device) -> dict:
    """One sequence length of ``bench_ops``: every candidate on the same random inputs."""
    H, D = s["heads"], s["dim"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def leaf(*shape, fn=None, as_dtype=dtype):
        x = torch.randn(*shape, device=device)
        return (x if fn is None else fn(x)).to(as_dtype).requires_grad_()

    q, v, u = (leaf(B, T, H, D) for _ in range(3))  # [B, T, H, D]
    k = leaf(B, T, H, D, fn=lambda x: F.normalize(x, dim=-1))
    g = leaf(B, T, H, fn=lambda x: F.logsigmoid(x + 4.0), as_dtype=torch.float32)  # [B, T, H]
    beta = leaf(B, T, H, fn=torch.sigmoid, as_dtype=torch.float32)
    heads_first = [x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]
    scans = [q, k, v, g, beta]

    def sdpa():
        if device.type != "cuda":  # no flash kernel on CPU: the smoke mode takes any
            return F.scaled_dot_product_attention(*heads_first, is_causal=True)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(*heads_first, is_causal=True)

    def scan(impl):
        return lambda: chunk_linear_memory(
            q, k, v, rule=RULE, g=g, beta=beta, ends=[T], scan_impl=impl
        )

    def mc(aggregation):
        caching = Caching(aggregation, segment_size=s["segment_size"], top_k=s["top_k"])
        gates = {"g": g, "beta": beta}
        return lambda: memory_caching(
            q, k, v, u, memory=MatrixMemory(RULE), caching=caching, gates=gates
        )

    fns = {"sdpa_flash": fwd_bwd(sdpa, heads_first), "scan_torch": fwd_bwd(scan("torch"), scans)}
    if fla_ready(device):
        op = fla_scan.load_fla()[0][RULE]
        fns["scan_fla"] = fwd_bwd(scan("fla"), scans)
        fns["fla_chunk_gated_delta_rule"] = fwd_bwd(
            lambda: op(q, k, v, g=g, beta=beta, scale=1.0), scans
        )
    for aggregation in AGGREGATIONS:
        fns[f"mc_{aggregation}"] = fwd_bwd(mc(aggregation), [*scans, u])
    seconds = measure(fns, s, device)
    base = seconds["sdpa_flash"]
    cells = {}
    for name, t in seconds.items():
        if not isinstance(t, float):
            cells[name] = {"skipped": t}
            continue
        cells[name] = {"s": t, "tokens_per_s": B * T / t}
        if isinstance(base, float):
            cells[name]["time_vs_sdpa"] = t / base
    print(f"ops T={T}: " + "  ".join(f"{n}={_show(c)}" for n, c in cells.items()), flush=True)
    return {"T": T, "batch": B, "results": cells}


def _show(cell: dict) -> str:
    return f"{cell['tokens_per_s']:.3g} tok/s" if "tokens_per_s" in cell else "skipped"


def bench_train(s: dict, device: torch.device, budget: Budget) -> dict:
    """Training steps of each model, one model on the device at a time."""
    results = {}
    for spec in MODELS:
        results[spec] = budget.skipped() if budget.over() else train_one(s, spec, device)
        free_memory(device)
    return results


def train_one(s: dict, spec: str, device: torch.device) -> dict:
    """Training tokens/s of one model: the largest batch (halving from train_batch) that fits."""
    T = s["train_seq"]
    torch.manual_seed(0)
    model = GrowMemForCausalLM(model_config(spec, s)).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(ids):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batch = s["train_batch"]
    while True:
        ids = torch.randint(0, s["vocab"], (batch, T), device=device)
        t = measure({"step": lambda ids=ids: step(ids)}, {**s, "rounds": s["train_steps"]}, device)
        t = t["step"]
        if isinstance(t, float):
            cell = {"batch": batch, "step_s": t, "tokens_per_s": batch * T / t}
            break
        if batch == 1:
            cell = {"skipped": f"batch 1 of {T} tokens: {t}"}
            break
        batch //= 2
        opt.zero_grad(set_to_none=True)
        free_memory(device)
    print(f"train {spec}: {_show(cell)} (batch {cell.get('batch')})", flush=True)
    return {"parameters": params, "seq_len": T, **cell}


@torch.no_grad()
def bench_decode(s: dict, device: torch.device, budget: Budget) -> list[dict]:
    """Prefill each context through the cache, then decode steps of every model in turn."""
    if budget.over():  # not even the models are built
        return [{"context": L, **budget.skipped()} for L in s["contexts"]]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    models = {}
    for spec in MODELS:
        torch.manual_seed(0)
        models[spec] = GrowMemForCausalLM(model_config(spec, s)).to(device, dtype).eval()
    rows, failed = [], {}  # failed: a longer context cannot fit where a shorter one did not
    for L in s["contexts"]:
        row = {"context": L, **budget.skipped()} if budget.over() else None
        rows.append(row or decode_row(s, models, L, failed, device, budget))
        free_memory(device)
    return rows


def prefill(model, prompt: torch.Tensor, piece: int):
    """The cache after ``prompt`` [1, L], fed in pieces of ``piece`` tokens (logits of the
    last token only: a 128k x 32k logits tensor would not fit)."""
    cache = None
    for a in range(0, prompt.shape[1], piece):
        out = model(prompt[:, a : a + piece], cache=cache, use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE_FIELD)
    return cache


def decode_row(
    s: dict, models: dict, L: int, failed: dict, device: torch.device, budget: Budget
) -> dict:
    """One context length of ``bench_decode`` (long prefills: the budget is checked per model)."""
    prompt = torch.randint(0, s["vocab"], (1, L), device=device)
    cells, caches = {}, {}
    for spec, model in models.items():
        if spec in failed or budget.over():
            cells[spec] = {"skipped": failed[spec]} if spec in failed else budget.skipped()
            continue
        try:
            sync(device)
            t0 = time.perf_counter()
            caches[spec] = prefill(model, prompt, s["prefill_piece"])
            sync(device)
        except RuntimeError as error:
            if not is_oom(error):
                raise
            failed[spec] = f"out of memory at context {L}"
            cells[spec] = {"skipped": failed[spec]}
            free_memory(device)
            continue
        cells[spec] = {"prefill_s": time.perf_counter() - t0, "cache_bytes": caches[spec].nbytes()}
    token = prompt[:, -1:]

    def decode(spec):
        def run():
            out = models[spec](token, cache=caches[spec], use_cache=True)
            caches[spec] = getattr(out, CACHE_FIELD)

        return run

    steps = {**s, "rounds": s["decode_steps"]}
    for spec, t in measure({spec: decode(spec) for spec in caches}, steps, device).items():
        if isinstance(t, float):
            cells[spec].update(decode_step_s=t, decode_tokens_per_s=1 / t)
        else:
            cells[spec] = {"skipped": t}
    shown = "  ".join(
        f"{n}: {c['decode_step_s'] * 1e3:.2f} ms, {c['cache_bytes'] / 2**20:.1f} MiB"
        if "decode_step_s" in c
        else f"{n}: skipped"
        for n, c in cells.items()
    )
    print(f"decode context {L}: {shown}", flush=True)
    return {"context": L, "models": cells}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_bench.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU or GPU), seconds")
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="stop starting measurements after this"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    args = parser.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cpu" and not args.smoke:
        parser.error("the full benchmark needs a CUDA device (use --smoke on CPU)")
    s = SMOKE if args.smoke else FULL
    budget = Budget(args.budget_s)
    fla_why = fla_scan.load_fla()[1]
    payload = {
        "machine": {
            **machine(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cuda": torch.version.cuda,
            "triton": installed("triton"),
        },
        "setting": {**s, "mode": "smoke" if args.smoke else "full", "budget_s": args.budget_s},
        "fla": {
            "version": installed("flash-linear-attention") or installed("fla-core"),
            "used": fla_ready(device),
            "why_not": fla_why or None,
        },
    }
    for name, section in (("ops", bench_ops), ("train", bench_train), ("decode", bench_decode)):
        payload[name] = section(s, device, budget)
        write_json(args.out, payload)  # after every section: a stopped run keeps what it has
    payload["elapsed_s"] = time.monotonic() - budget.start
    write_json(args.out, payload)
    print(f"wrote {args.out} in {payload['elapsed_s']:.0f} s")
    return args.out


if __name__ == "__main__":
    main()
