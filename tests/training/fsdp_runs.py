"""The sharded runs of the FSDP tests (test_parallel.py), written by 2 processes of one
torchrun launch: ``torchrun --nproc_per_node=2 -m tests.training.fsdp_runs ROOT``.

Every run trains on the gloo process group the launch joined once (``train`` leaves a group
it did not join), so one launch of 2 interpreters serves every case.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from growmem.models.model_spec import ModelSpec
from growmem.train import train
from growmem.training.config import RunConfig

from .common import TINY_MODEL, tiny_config

MODELS = ("gated_delta+grm", "titans+soup")  # a matrix memory and a deep one
# the run that stops after STOP_AFTER steps and resumes, and the uninterrupted one it must equal
RESUMED = (MODELS[0], False)
STOP_AFTER = 3
STEPS = 4
BATCH = 2  # sequences per process per step


def run_name(spec: str, checkpointing: bool) -> str:
    return f"{ModelSpec.parse(spec).slug}_{'ac' if checkpointing else 'noac'}"


def run_config(
    out: Path, spec: str, checkpointing: bool, parallel: str, grad_accum: int
) -> RunConfig:
    """A tiny MQAR run (hidden 32, 2 layers) of model ``spec``; a checkpoint every 2 steps.

    Args:
        parallel: train.parallel.
        grad_accum: micro-batches of BATCH sequences per process: a run of one process
            with 2 takes the two halves of the global batch the 2 sharded processes take.
    """
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
            "batch_size": BATCH,
            "grad_accum": grad_accum,
            "checkpoint_every": 2,
            "keep_checkpoints": 5,
            "parallel": parallel,
            "activation_checkpointing": checkpointing,
        },
    )


def main(root: Path) -> None:
    dist.init_process_group("gloo")
    try:
        for spec in MODELS:
            for checkpointing in (False, True):
                name = run_name(spec, checkpointing)
                train(run_config(root / "fsdp" / name, spec, checkpointing, "fsdp", 1))
        resumed = run_config(root / "resumed", *RESUMED, "fsdp", 1)
        assert train(resumed, stop_after=STOP_AFTER) is None
        train(resumed, resume=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
