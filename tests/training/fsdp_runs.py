"""The sharded runs of the FSDP tests (test_parallel.py), written by 2 processes of one
torchrun launch: ``torchrun --nproc_per_node=2 -m tests.training.fsdp_runs ROOT``.

Every run trains on the gloo process group the launch joined once (``train`` leaves a group
it did not join), so one launch of 2 interpreters serves every case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.models.model_spec import ModelSpec
from growmem.train import train
from growmem.training.config import RunConfig
from growmem.training.parallel import shard

from .common import TINY_MODEL, tiny_config

MODELS = ("gated_delta+grm", "titans+soup")  # a matrix memory and a deep one
# the run that stops after STOP_AFTER steps and resumes, and the uninterrupted one it must equal
RESUMED = (MODELS[0], False)
STOP_AFTER = 3
STEPS = 4
# (batch_size, grad_accum) of each process of a sharded run of a model: 2 sequences a step,
# in one micro-batch or two
SPLIT = {"gated_delta+grm": (2, 1), "titans+soup": (1, 2)}


def run_name(spec: str, checkpointing: bool) -> str:
    return f"{ModelSpec.parse(spec).slug}_{'ac' if checkpointing else 'noac'}"


def run_config(out: Path, spec: str, checkpointing: bool, parallel: str) -> RunConfig:
    """A tiny MQAR run (hidden 32, 2 layers) of model ``spec``, a global batch of 4
    sequences; a checkpoint every 2 steps.

    Args:
        parallel: train.parallel; "fsdp" takes 2 processes, the others one, which takes
            the micro-batches of both sharded processes, one after the other.
    """
    batch_size, grad_accum = SPLIT[spec]
    if parallel != "fsdp":
        grad_accum *= 2
    model = ModelSpec.parse(spec).apply(
        {**TINY_MODEL, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2}
    )
    model["memory"]["caching"]["segment_size"] = 8
    return tiny_config(
        out,
        model=model,
        task={"num_kv_pairs": [1, 4]},  # micro-batches hold unequal numbers of labels
        train={
            "steps": STEPS,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "checkpoint_every": 2,
            "keep_checkpoints": 5,
            "parallel": parallel,
            "activation_checkpointing": checkpointing,
        },
    )


def check_sharded(spec: str) -> None:
    """Every parameter of a sharded model is a DTensor cut on dim 0 over the 2 processes:
    each holds its half (rows rounded up on rank 0)."""
    config = run_config(Path("unused"), spec, False, "fsdp")
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **config.model))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    shard(model, torch.device("cpu"), 2, bf16=False)
    for name, p in model.named_parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), name
        assert p.shape == shapes[name], name
        rows = (shapes[name][0] + 1) // 2
        expected = rows if dist.get_rank() == 0 else shapes[name][0] - rows
        assert p.to_local().shape[0] == expected, (name, p.to_local().shape, shapes[name])


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    try:
        check_sharded(MODELS[1])
        for spec in MODELS:
            for checkpointing in (False, True):
                name = run_name(spec, checkpointing)
                train(run_config(root / "fsdp" / name, spec, checkpointing, "fsdp"))
        resumed = run_config(root / "resumed", *RESUMED, "fsdp")
        assert train(resumed, stop_after=STOP_AFTER) is None
        train(resumed, resume=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
