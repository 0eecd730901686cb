"""How the processes of a launch share a training run (``train.parallel``), and what goes
with it: activation checkpointing per block, FSDP2 sharding with its mixed precision,
gradient clipping over sharded gradients, and sharded checkpoints.

- "ddp" (the default): every process holds the whole model and optimizer, DistributedDataParallel
  averages the gradients; a plain launch is one process.
- "fsdp": FSDP2 (``fully_shard``) on each `GrowMemBlock`, then on the whole model: every
  process keeps 1/N of the parameters, gradients and AdamW states, and gathers a block's
  parameters for its forward and backward only. Needs torchrun with 2 or more processes.
- "none": one process (a torchrun launch of several is refused: they would train apart).

In every mode the loss of a step is the mean over the labelled tokens of the global batch
(growmem.train), so N processes with batch b compute the gradient one process computes on
batch N·b. Under FSDP every process runs the evaluations (a sharded forward needs them all)
and rank 0 logs them; checkpoints are written by every process (torch.distributed.checkpoint)
into a hidden folder that rank 0 completes, checks (SHA256SUMS) and renames into place, and
the final model folder holds the full weights, gathered to rank 0.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import clip_grads_with_norm_, get_total_norm
from torch.utils.checkpoint import checkpoint

from growmem.models import GrowMemForCausalLM
from growmem.training.checkpoint import (
    SHARDS,
    load_trainer_state,
    save_checkpoint,
    shards_folder,
    verify_checksums,
)
from growmem.training.config import TrainSettings

if TYPE_CHECKING:
    from growmem.train import Distributed


def check_launch(parallel: str, world_size: int) -> None:
    """Refuse a ``train.parallel`` the launch cannot run.

    Args:
        parallel: "none", "ddp" or "fsdp".
        world_size: processes of the launch (1 without torchrun).

    Raises:
        ValueError: "fsdp" in a world of one (nothing to shard over: a plain launch), or
            "none" in a launch of several (each process would train alone).
    """
    if parallel == "fsdp" and world_size < 2:
        raise ValueError(
            "train.parallel='fsdp' shards the model over the processes of a torchrun launch, "
            f"and this launch has {world_size} process: launch it with "
            "`torchrun --nproc_per_node=N -m growmem.cli train ...` (N >= 2), or set "
            "train.parallel=none for one process"
        )
    if parallel == "none" and world_size > 1:
        raise ValueError(
            f"train.parallel='none' trains one process, and this torchrun launch has "
            f"{world_size}: set train.parallel=ddp or fsdp, or launch one process"
        )


def checkpoint_activations(model: GrowMemForCausalLM) -> None:
    """Recompute each block's activations in the backward instead of keeping them
    (torch.utils.checkpoint, non-reentrant): a block keeps only its input for the backward.

    The block's own forward is replaced (an attribute of the instance), so the parameter
    names, and the checkpoints and model folders, stay those of the plain model. Apply it
    before `shard`, so that FSDP gathers a block's parameters around the recomputation too.
    """
    for block in model.model.layers:
        block.forward = _recomputed(block.forward)


def _recomputed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to keep for a backward
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def shard(model: GrowMemForCausalLM, device: torch.device, world_size: int, bf16: bool) -> None:
    """FSDP2 in place: ``fully_shard`` on every block, then on the model (the embeddings, the
    final norm and the output head form the root's group). The parameters become DTensors
    sharded on dim 0 over the ``world_size`` processes.

    Args:
        bf16: the forward and backward compute with bfloat16 copies of the parameters
            (``train.bf16``); gradients are reduced, and parameters and optimizer states
            kept, in float32.
    """
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    for block in model.model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def wrap(
    model: GrowMemForCausalLM, settings: TrainSettings, world_size: int, device: torch.device
) -> torch.nn.Module:
    """Prepare ``model`` for ``settings.parallel``, ``settings.activation_checkpointing`` and
    ``settings.compile`` (`check_launch` has accepted the launch).

    Returns:
        What the training step calls: ``model`` itself (sharded in place under FSDP), compiled
        when ``settings.compile`` asks, then wrapped by DDP in a launch of several processes.
        The optimizer takes ``model``'s parameters after this call (FSDP replaces them by
        sharded ones); evaluation and checkpoints use ``model``, so its state_dict keys never
        carry the compiled wrapper's prefix.
    """
    if settings.activation_checkpointing:
        checkpoint_activations(model)
    if settings.parallel == "fsdp":  # sharded first, then compiled, as torch's FSDP2 docs do
        shard(model, device, world_size, settings.bf16)
    trained = model
    if settings.compile:  # (before DDP wraps it)
        backend = "inductor" if settings.compile is True else settings.compile
        trained = torch.compile(model, backend=backend)
    if settings.parallel != "fsdp" and world_size > 1:
        return DistributedDataParallel(
            trained, device_ids=[device] if device.type == "cuda" else None
        )
    return trained


def gradient_sync(wrapped: torch.nn.Module, last: bool):
    """The context of a micro-batch's forward and backward: DDP averages the gradients on
    the last micro-batch of a step only. FSDP reduce-scatters every micro-batch's gradients,
    so that they stay sharded (accumulating them unsharded would hold a whole gradient in
    every process)."""
    if isinstance(wrapped, DistributedDataParallel) and not last:
        return wrapped.no_sync()
    return contextlib.nullcontext()


def clip_gradients(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Scale the gradients to a global 2-norm of at most ``max_norm`` (inf: no clipping):
    ``torch.nn.utils.clip_grad_norm_``, and with sharded gradients its two halves with the
    norm taken over the whole gradient, every process's shards together.

    Returns:
        The global gradient norm before clipping, a 0-dim tensor (the same on every process).
    """
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not any(isinstance(p, DTensor) for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norm = get_total_norm([p.grad for p in parameters], 2.0)
    if isinstance(norm, DTensor):  # the sum of the shards' squares is a pending reduction
        norm = norm.full_tensor()
    clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def save_sharded_checkpoint(
    env: Distributed,
    run_dir: Path,
    step: int,
    model: GrowMemForCausalLM,
    optimizer: torch.optim.Optimizer,
    run_config: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer=None,
    keep: int = 2,
) -> None:
    """Checkpoint ``step`` of a sharded run; called by every process.

    Every process writes its shards of the model and optimizer (torch.distributed.checkpoint)
    into a hidden folder of rank 0's choosing; rank 0 then writes the rest (``config.json``,
    run.yaml, the tokenizer, ``trainer_state``: step, scheduler, RNG) and SHA256SUMS around
    them and renames the whole into place (`growmem.training.checkpoint.save_checkpoint`).

    Raises:
        OSError: a write failed on some process (a full disk, say); the last checkpoint is
            intact.
    """
    shards = env.on_main(lambda: shards_folder(run_dir))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    # collective: returns once every process's files are written and rank 0 wrote the index
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=shards)
    env.on_main(
        lambda: save_checkpoint(
            run_dir, step, model, run_config, trainer_state, tokenizer, keep, shards=shards
        ),
        share=False,
    )


def load_sharded_checkpoint(
    env: Distributed,
    folder: Path,
    model: GrowMemForCausalLM,
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Load a sharded checkpoint into the sharded ``model`` and its ``optimizer``; called by
    every process (each reads the pieces of its shards).

    Returns:
        The checkpoint's trainer state (step, scheduler, RNG).

    Raises:
        ValueError: ``folder`` is no sharded checkpoint, or a file differs from the sha256
            recorded when it was written (`ChecksumError`, every file checked by rank 0).
    """
    folder = Path(folder)
    shards = folder / SHARDS
    if not shards.is_dir():
        raise ValueError(
            f"checkpoint {folder} has no {SHARDS}/ folder: it is not from a train.parallel=fsdp run"
        )
    env.on_main(lambda: verify_checksums(folder), share=False)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=shards)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    return load_trainer_state(folder)


def gather_model(env: Distributed, model: GrowMemForCausalLM) -> GrowMemForCausalLM | None:
    """An unsharded copy of the sharded ``model`` on rank 0's CPU (None on the other ranks),
    for the model folder ``from_pretrained`` reads; called by every process."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # the full tensors, on rank 0 only
    if not env.main:
        return None
    with torch.random.fork_rng(devices=[]):  # building a model draws its init seeds
        plain = GrowMemForCausalLM(model.config)
    plain.load_state_dict(state)
    return plain
