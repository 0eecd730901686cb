"""Wall-clock timing of forward+backward calls, used by the demo and the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each function, running them in turn in every round.

    Interleaving spreads the load of a shared, noisy machine over all candidates alike, so
    ratios between them are fairer than timing each one in its own block.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fwd_bwd(
    fn: Callable[[], torch.Tensor | tuple], inputs: list[torch.Tensor]
) -> Callable[[], None]:
    """A closure that runs ``fn`` forward, then backward from the sum of its first output."""

    def run() -> None:
        for x in inputs:
            x.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run
