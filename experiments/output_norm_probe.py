"""How much the output norm's eps attenuates Memory Caching's reads at initialisation.

    python -m experiments.output_norm_probe   # -> results/experiments/output_norm_probe.json

The memory layers end in a per-head RMSNorm, o / sqrt(mean(o²) + eps) (docs/design.md §4.5).
Where a read's mean square is comparable to eps the norm shrinks it by sqrt(ms / (ms + eps)),
and averaged reads of memories that disagree are small. For freshly initialised models of a
task base (seeds 0-4), this records the mean squares of every head's read on held-out MQAR
examples: the fraction below 1e-5 and 1e-4, the median, and the fraction of reads the norm
attenuates by more than 5 % (ms < 9.76 eps) at the layer's eps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from growmem.cli import resolve_config
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.training.config import load_config
from growmem.training.data import mqar_data
from growmem.utils.provenance import write_json

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("gated_delta", "gated_delta+residual", "gated_delta+grm", "gated_delta+ssc")
# ms / (ms + eps) < 0.95² for ms < eps · 0.9025 / 0.0975
ATTENUATED = 0.95**2 / (1 - 0.95**2)


@torch.no_grad()
def read_mean_squares(spec: str, base: str, seed: int, examples: int) -> torch.Tensor:
    """mean(o²) of every head's read entering the output norm, for the model ``spec`` of the
    task base ``base`` initialised with ``seed``, on ``examples`` test sequences: [n]."""
    config = load_config(resolve_config(base), ["train.out_dir=unused"], model=spec)
    torch.manual_seed(seed)
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=config.task.vocab_size, **config.model))
    model.eval()
    ids = mqar_data(config.task, seed).mqar_test[-1].input_ids[:examples]  # [N, T]
    squares = []

    def record(module, inputs, output):
        squares.append(inputs[0].float().pow(2).mean(-1).flatten())  # [N, T, H] -> [N·T·H]

    hooks = [
        m.register_forward_hook(record) for n, m in model.named_modules() if n.endswith("o_norm")
    ]
    model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return torch.cat(squares)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="mqar_capacity", help="the task base")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "results/experiments/output_norm_probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    eps = load_config(resolve_config(args.base), ["train.out_dir=unused"]).model.get(
        "norm_eps", 1e-6
    )
    rows = {}
    for spec in MODELS:
        ms = torch.cat([read_mean_squares(spec, args.base, s, args.examples) for s in args.seeds])
        rows[spec] = {
            "reads": ms.numel(),
            "below_1e-5": float((ms < 1e-5).float().mean()),
            "below_1e-4": float((ms < 1e-4).float().mean()),
            "median": float(ms.median()),
            "attenuated_over_5_percent": float((ms < ATTENUATED * eps).float().mean()),
        }
        print(spec, {k: round(v, 4) if isinstance(v, float) else v for k, v in rows[spec].items()})
    settings = {"base": args.base, "seeds": args.seeds, "examples": args.examples, "eps": eps}
    print(write_json(Path(args.out), {"settings": settings, "models": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
