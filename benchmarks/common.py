"""Shared helpers of the benchmark scripts: timing, machine description, JSON output."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from growmem.utils.provenance import write_json as write_results
from growmem.utils.timing import fwd_bwd, time_interleaved

__all__ = [
    "RESULTS",
    "build_model",
    "fwd_bwd",
    "machine",
    "sdpa_fwd_bwd",
    "time_interleaved",
    "write_json",
]

RESULTS = Path(__file__).resolve().parent.parent / "results"


def sdpa_fwd_bwd(B: int, H: int, T: int, D: int):
    """A closure timing the baseline: causal SDPA forward and backward on random q, k, v."""
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    return fwd_bwd(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v]
    )


# Every model family of the end-to-end benchmarks (name in the results: model spec):
# Transformer++ and each recurrent memory with aggregation none, grm and ssc.
MODELS = {"transformer++": "transformer"}
for _rule in ("gated_delta", "swla", "titans"):
    for _agg in ("none", "grm", "ssc"):
        _spec = _rule if _agg == "none" else f"{_rule}+{_agg}"
        MODELS[_spec] = _spec


def build_model(spec: str, hidden: int, layers: int, heads: int, segment_size: int):
    """A float32 GrowMemForCausalLM of the model spec ``spec`` over the byte vocabulary (seed
    0) for speed benchmarks: segments of ``segment_size``, ssc reading 2 caches."""
    from growmem.models import GrowMemConfig, GrowMemForCausalLM
    from growmem.models.model_spec import ModelSpec

    model = dict(hidden_size=hidden, num_hidden_layers=layers, num_heads=heads)
    model["memory"] = {"caching": {"segment_size": segment_size, "top_k": 2}}
    config = GrowMemConfig(vocab_size=259, **ModelSpec.parse(spec).apply(model))
    torch.manual_seed(0)
    return GrowMemForCausalLM(config)


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` plus the machine description, package versions and git commit to
    results/NAME.json atomically."""
    return write_results(RESULTS / f"{name}.json", {"machine": machine(), **payload})
