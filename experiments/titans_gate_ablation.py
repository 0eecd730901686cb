"""Do the gates keep titans+grm/soup/ssc at chance on MQAR? Train from one shared start.

    python -m experiments.titans_gate_ablation   # -> results/experiments/titans_gate_ablation.json

In the `mqar` sweep (seed 0) titans+residual solved the task while titans+grm, +soup and +ssc
stayed at chance. Their models differ in more than the read: the gate-query rows of the input
projection shift the random draws of every later parameter, so each aggregation starts from
other weights, and titans' chain of inner updates is sensitive to them. Here every aggregation
starts from the titans+residual cell's initial weights (same seed, same projection rows, the
gate-query rows zero, so every gate starts uniform and grm computes residual's output up to a
per-token scale that the output RMSNorm removes) and trains on the same batches with the cell's
optimiser and schedule. The residual run reproduces the sweep cell's logged losses exactly.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks._common import IGNORE_INDEX
from growmem.train import build_optimizer
from growmem.training.config import RunConfig, load_config
from growmem.training.data import TaskData, build_task_data
from growmem.utils.provenance import write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "experiments" / "titans_gate_ablation.json"
PRESETS = ROOT / "growmem" / "configs"


# The gates of the sweep's mqar cells when they ran: the scaled dot product, no temperature
# (the library's defaults then; docs/design.md §3.2).
GATES_THEN = [
    "model.memory.caching.gate_norm=none",
    "model.memory.gate_temperature=null",
    "model.memory.summary_source=keys",
]


def _config(aggregation: str, seed: int) -> RunConfig:
    """The sweep's titans+AGGREGATION cell on mqar (its per_model titans settings), with the
    gates it ran with."""
    spec = f"titans+{aggregation}"
    settings = [f"train.seed={seed}", *GATES_THEN]
    return load_config(PRESETS / "mqar.yaml", settings, PRESETS, model=spec)


def shared_start(aggregation: str, data: TaskData, seed: int) -> GrowMemForCausalLM:
    """A titans model with ``aggregation`` holding the titans+residual model's initial weights.

    The input projection's rows are [q, k, v, gate queries u, output gate] with a gated read
    and [q, k, v, output gate] without; the u rows start at zero.
    """
    models = []
    for agg in ("residual", aggregation):
        torch.manual_seed(seed)  # as growmem.train does before building the model
        config = _config(agg, seed).model
        models.append(GrowMemForCausalLM(GrowMemConfig(vocab_size=data.vocab_size, **config)))
    reference, model = (m.state_dict() for m in models)
    with torch.no_grad():
        for name, weight in model.items():
            source = reference[name]
            if weight.shape == source.shape:
                weight.copy_(source)
                continue
            if not name.endswith("in_proj.weight"):
                raise ValueError(f"{name}: unexpected shape {tuple(weight.shape)}")
            inner = weight.shape[0] - source.shape[0]  # H · D rows of u
            weight[: 3 * inner] = source[: 3 * inner]
            weight[3 * inner : 4 * inner] = 0
            weight[4 * inner :] = source[3 * inner :]
    models[1].load_state_dict(model)
    return models[1]


def train_curve(aggregation: str, steps: int, seed: int, log_every: int = 20) -> list[dict]:
    """Loss every ``log_every`` steps of the titans MQAR cell's training from the shared start.

    The loop is growmem.train's for one process without accumulation: the same batches,
    AdamW groups, warmup-cosine schedule over the cell's full ``train.steps``, and clipping.
    """
    config = _config(aggregation, seed)
    settings = config.train
    data = build_task_data(config.task, seed, Path(settings.out_dir))
    model = shared_start(aggregation, data, seed)
    optimizer, scheduler = build_optimizer(model, settings)
    curve, start = [], time.perf_counter()
    for step in range(steps):
        batch = data.train.batch_at(step, settings.batch_size, seed=seed)
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1),
            batch["labels"][:, 1:].flatten(),
            ignore_index=IGNORE_INDEX,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            row = {"step": step + 1, "loss": loss.item(), "grad_norm": grad_norm.item()}
            curve.append(row)
            print(f"{aggregation} step {row['step']}: loss {row['loss']:.3f}", flush=True)
    print(f"{aggregation}: {time.perf_counter() - start:.0f} s")
    return curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregations", nargs="+", default=["residual", "grm", "soup", "ssc"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {
        "note": __doc__.split("\n\n", 2)[2].strip(),
        "seed": args.seed,
        "steps": args.steps,
        "curves": {agg: train_curve(agg, args.steps, args.seed) for agg in args.aggregations},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
