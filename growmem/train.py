"""Training: AdamW with warmup + cosine, gradient accumulation, clipping, bf16 autocast,
periodic evaluation, JSONL metrics, atomic checkpoints with exact resume, and
DistributedDataParallel or FSDP2 sharding when launched by torchrun
(growmem.training.parallel)."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from growmem.evaluate import evaluate_lm, evaluate_mqar, evaluate_niah, mqar_gate_routing
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import IGNORE_INDEX
from growmem.tasks.streaming import StreamedBlocks
from growmem.training.checkpoint import (
    load_trainer_state,
    load_weights,
    save_checkpoint,
    save_model_folder,
    write_text_atomic,
)
from growmem.training.config import LMTask, MQARTask, RunConfig, TrainSettings, model_record
from growmem.training.data import TaskData, build_task_data, niah_eval_lengths, niah_eval_needles
from growmem.training.device import resolve_device, restore_rng_states, rng_states
from growmem.training.documents import DocumentResets
from growmem.training.loggers import (
    TENSORBOARD_FOLDER,
    Logger,
    TensorBoardLogger,
)
from growmem.training.parallel import (
    check_launch,
    clip_gradients,
    gather_model,
    gradient_sync,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
    wrap,
)
from growmem.training.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    RunLock,
    RunPlan,
    checkpoint_step,
    plan_run,
    trim_metrics,
)
from growmem.utils.denormals import flushed_denormals
from growmem.utils.provenance import provenance


class TrainingDiverged(ValueError):
    """The loss or the gradients stopped being finite: the run cannot go on as configured."""


@dataclass
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # from_env joined the process group, so close leaves it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def main_process() -> bool:
        """Whether this process is rank 0 of its torchrun launch (or not launched by torchrun):
        the one that prints and writes, also before or after the process group exists."""
        return int(os.environ.get("RANK", "0")) == 0

    @staticmethod
    def launch() -> tuple[int, int]:
        """(world size, local rank) of this process as torchrun describes them, (1, 0) for a
        plain launch."""
        return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Join the process group torchrun describes in the environment (nccl for GPU
        ``device``s, gloo otherwise); a plain launch is a world of one."""
        world_size, local_rank = cls.launch()
        if world_size == 1:
            return cls()
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world_size, local_rank, owns_group)

    def close(self) -> None:
        """Leave the process group from_env joined. Left to interpreter exit, gloo's threads
        can be torn down while still joinable, and the rank aborts after a finished run."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def on_main(self, fn, share: bool = True):
        """``fn()`` run by rank 0 while the others wait; an error of rank 0 is raised on
        every rank (the others would otherwise wait at their next collective until its
        timeout).

        Args:
            fn: what rank 0 does.
            share: give ``fn``'s result to every rank (else the others get None).
        """
        if self.world_size == 1:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as caught:
                error = caught
        payload = [(result if share else None, error)]
        dist.broadcast_object_list(payload, src=0)
        shared, error = payload[0]
        if error is not None:
            raise error
        return result if self.main else shared


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the projections' weight matrices (the gate projections
    included, as in fla and Mamba), none on embeddings and the output head, norms, biases,
    the decay rates (A_log, dt_bias), the short convolution's taps, or the deep memories'
    initial weights (tensors of 3 dims)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def linear_warmup(step: int, warmup: int) -> float:
    """Learning-rate factor of a warmup step (step < warmup): (step + 1) / warmup, so that the
    first step already learns and step warmup - 1 reaches the peak."""
    return (step + 1) / warmup


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """Learning-rate factor of step s: linear warmup to 1, cosine decay to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup:
            return linear_warmup(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def warmup_stable_decay(warmup: int, total: int, min_ratio: float, decay_fraction: float):
    """Learning-rate factor of step s for warmup-stable-decay (WSD): linear warmup to 1, 1
    until the last ``decay = round(decay_fraction * total)`` steps (at least one), then
    ``min_ratio + (1 - min_ratio) * (1 - sqrt(progress))`` with progress going from 0 at
    step ``total - decay`` to 1 at step ``total``, as for the cosine.

    The 1 - sqrt shape (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
    Beyond Fixed Training Durations") matched or beat the cosine there, where a linear decay
    fell short; a checkpoint of the stable phase can be continued to a longer run (a resume
    may change train.steps) and the decay starts later.
    """
    decay = max(1, round(decay_fraction * total))
    decay_start = max(warmup, total - decay)

    def factor(step: int) -> float:
        if step < warmup:
            return linear_warmup(step, warmup)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return min_ratio + (1 - min_ratio) * (1 - math.sqrt(progress))

    return factor


def build_optimizer(
    model: torch.nn.Module, settings: TrainSettings
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``parameter_groups`` and its schedule (``settings.schedule``: warmup-cosine
    or warmup-stable-decay), as ``settings`` say."""
    optimizer = torch.optim.AdamW(
        parameter_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=tuple(settings.betas),
        eps=settings.eps,
    )
    if settings.schedule == "wsd":
        factor = warmup_stable_decay(
            settings.warmup_steps, settings.steps, settings.min_lr_ratio, settings.decay_fraction
        )
    else:
        factor = warmup_cosine(settings.warmup_steps, settings.steps, settings.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def evaluate_run(model, data: TaskData, config: RunConfig) -> dict[str, Any]:
    """The periodic evaluation of the run's task."""
    task, bf16 = config.task, config.train.bf16
    if isinstance(task, MQARTask):
        result = evaluate_mqar(model, data.mqar_test, bf16=bf16)
        routing = mqar_gate_routing(model, data.mqar_test)  # None without gates
        return result if routing is None else {**result, "gates": routing}
    if isinstance(task, LMTask):
        if task.reset_at_documents:
            model = DocumentResets(model, data.tokenizer.eos_id)
        return evaluate_lm(model, data.lm_eval, max_blocks=task.eval_blocks, bf16=bf16)
    return evaluate_niah(
        model,
        data.tokenizer,
        variant=task.variant,
        lengths=niah_eval_lengths(task),
        num_examples=task.num_eval_examples,
        seed=config.train.seed,
        haystack=task.haystack,
        bf16=bf16,
        num_needles=niah_eval_needles(task),
        train_length=task.seq_len,
    )


def train(
    config: RunConfig,
    resume: bool | str = False,
    stop_after: int | None = None,
    loggers: Sequence[Logger] = (),
) -> Path | None:
    """Train a model as ``config`` says; returns the folder of the final model.

    Under torchrun every process runs this; rank 0 logs, evaluates, writes checkpoints and
    holds the run folder's lock. With ``resume`` the run continues from its latest checkpoint
    and reproduces exactly the metrics an uninterrupted run would have written.

    Args:
        config: the run.
        resume: True: continue from the run folder's latest checkpoint; settings that would
            change the run's course are refused, the others applied and reported
            (`growmem.training.rundir.check_resume`). False: start; a folder holding a
            checkpoint is refused, one whose run stopped before its first checkpoint is
            started over. "auto": continue when the folder has a checkpoint, else start; for
            scripts that rerun until done.
        stop_after: end this session after that step with a checkpoint (for time-sliced or
            preemptible jobs; continue with ``resume``); returns None then.
        loggers: callables given every metrics record as it is appended to metrics.jsonl,
            on rank 0 (growmem.training.loggers: e.g. Weights & Biases); train.tensorboard
            adds a TensorBoard writer.

    Raises:
        ValueError: bad arguments, a folder this session may not start or continue in, or a
            damaged checkpoint (`ChecksumError` among them), each named.
        ImportError: train.tensorboard without the tensorboard package.
        OSError: the folder is in use by another run (`RunFolderInUse`), not writable, or a
            write failed (a full disk), named; the last checkpoint is intact.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be a step >= 1, got {stop_after}")
    if resume not in (True, False, "auto"):
        raise ValueError(f"resume must be True, False or 'auto', got {resume!r}")
    loggers = list(loggers)
    if not all(callable(logger) for logger in loggers):
        raise TypeError(f"loggers: expected callables taking a metrics record, got {loggers!r}")
    # every rank checks the package (a missing one is named before any work); rank 0 writes
    tensorboard = None
    if config.train.tensorboard:
        tensorboard = TensorBoardLogger(Path(config.train.out_dir) / TENSORBOARD_FOLDER)
    world_size, local_rank = Distributed.launch()
    check_launch(config.train.parallel, world_size)
    device = resolve_device(config.train.device, "train.device", local_rank, world_size)
    env = Distributed.from_env(device)
    # rank 0 alone writes the run folder, and holds its lock for the whole run
    lock = RunLock(config.train.out_dir) if env.main else None
    if tensorboard is not None and env.main:
        loggers.append(tensorboard)
    try:
        with flushed_denormals():  # strong learned decays make subnormal floats: ~3x slower
            return _train_in(env, device, lock, config, resume, stop_after, loggers)
    finally:
        if tensorboard is not None:
            tensorboard.close()
        if lock is not None:
            lock.release()
        env.close()


def _say(env: Distributed, notes: list[str]) -> None:
    """Tell the user (once, from rank 0) what a session did with its run folder."""
    for note in notes if env.main else []:
        print(f"growmem train: {note}", flush=True)


def _train_in(
    env: Distributed,
    device: torch.device,
    lock: RunLock | None,
    config: RunConfig,
    resume: bool | str,
    stop_after: int | None,
    loggers: list[Logger],
) -> Path | None:
    """`train`'s body, run by a process that has joined its launch (``env``) on ``device``."""
    settings = config.train
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives and "cuda" tensors use this GPU
    out = Path(settings.out_dir)
    plan: RunPlan = env.on_main(lambda: plan_run(out, config, resume, env.world_size, lock))
    _say(env, plan.notes)

    # rank 0 first: it trains a BPE or fills the token cache, which the others then reuse
    data = env.on_main(lambda: build_task_data(config.task, settings.seed, out), share=False)
    if not env.main:
        data = build_task_data(config.task, settings.seed, out)
    model_config = GrowMemConfig(vocab_size=data.vocab_size, **config.model)
    if data.max_seq_len > model_config.max_position_embeddings:
        raise ValueError(
            f"the task uses sequences of {data.max_seq_len} tokens, beyond the model's "
            f"max_position_embeddings={model_config.max_position_embeddings}"
        )
    torch.manual_seed(settings.seed)
    model = GrowMemForCausalLM(model_config).to(device)
    sharded = settings.parallel == "fsdp"
    if plan.checkpoint is not None and not sharded:
        load_weights(plan.checkpoint, model)
    wrapped = wrap(model, settings, env.world_size, device)  # DDP, or sharded in place
    optimizer, scheduler = build_optimizer(model, settings)
    start_step = 0
    if plan.checkpoint is not None:
        if sharded:
            state = load_sharded_checkpoint(env, plan.checkpoint, model, optimizer)
        else:
            state = load_trainer_state(plan.checkpoint)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng_states(state, device)
        start_step = state["step"]
        if start_step != checkpoint_step(plan.checkpoint):
            raise ValueError(f"checkpoint {plan.checkpoint} holds the state of step {start_step}")
        if isinstance(data.train, StreamedBlocks):  # continue at the token where it stopped
            cursor = state.get("data")
            if cursor is None or cursor.get("step") != start_step:
                raise ValueError(
                    f"checkpoint {plan.checkpoint} holds no position in the streamed corpus "
                    f"at step {start_step} (got {cursor!r})"
                )
            data.train.load_state_dict(cursor)

    def record_run() -> list[str]:
        """config.yaml of this session; metrics cut back to the checkpoint's step."""
        write_text_atomic(out / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
        return trim_metrics(out / METRICS_FILE, start_step)

    _say(env, env.on_main(record_run, share=False))
    # what every checkpoint and the final model record (run.yaml): the memory with every
    # setting written out, so that a later default does not change what the record means
    run_config = {
        **config.to_dict(),
        "model": model_record(config.model),
        "processes": env.world_size,
    }
    metrics_path = out / METRICS_FILE

    def checkpoint(step: int) -> None:
        trainer_state = {"scheduler": scheduler.state_dict(), **rng_states(device)}
        if isinstance(data.train, StreamedBlocks):
            trainer_state["data"] = data.train.state_dict()  # the stream's resume cursor
        if sharded:  # every process writes its shards
            save_sharded_checkpoint(
                env,
                out,
                step,
                model,
                optimizer,
                run_config,
                trainer_state,
                data.tokenizer,
                keep=settings.keep_checkpoints,
            )
        elif env.main:
            trainer_state["optimizer"] = optimizer.state_dict()
            save_checkpoint(
                out,
                step,
                model,
                run_config,
                trainer_state,
                data.tokenizer,
                keep=settings.keep_checkpoints,
            )
        env.barrier()

    def log(record: dict) -> None:
        if env.main:
            try:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as error:  # a full disk, say: name the file
                message = f"could not append to {metrics_path} ({error.strerror or error})"
                raise OSError(error.errno, message) from error
            for logger in loggers:
                logger(record)

    def evaluate(step: int) -> dict[str, Any] | None:
        """Rank 0 evaluates and logs; under FSDP every process runs the evaluation with it
        (a sharded forward gathers each block from them all) and rank 0 logs."""
        if not (env.main or sharded):
            return None
        results = evaluate_run(model, data, config)
        log({"step": step, "eval": results})
        return results

    bar = tqdm(
        total=settings.steps,
        initial=start_step,
        disable=not (env.main and settings.progress),
        dynamic_ncols=True,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16)
    resets = isinstance(config.task, LMTask) and config.task.reset_at_documents
    forward = DocumentResets(wrapped, data.tokenizer.eos_id) if resets else wrapped
    step = start_step
    if settings.eval_every and start_step == 0:  # the curves start at the initial model
        evaluate(0)
        env.barrier()
    window_tokens, window_start = 0, time.perf_counter()
    try:
        for step in range(start_step, settings.steps):
            model.train()
            batch = data.train.batch_at(
                step,
                settings.batch_size * settings.grad_accum,
                seed=settings.seed,
                rank=env.rank,
                world_size=env.world_size,
            )
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            targets = labels[:, 1:]
            # the loss is the mean over every labelled token of the global batch, so that
            # any split over processes and micro-batches computes the same gradient
            labelled = env.all_sum((targets != IGNORE_INDEX).sum().double())
            scale = env.world_size / labelled.clamp_min(1)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            micro = list(
                zip(ids.chunk(settings.grad_accum), labels.chunk(settings.grad_accum), strict=True)
            )
            for i, (mb_ids, mb_labels) in enumerate(micro):
                last = i == len(micro) - 1
                with gradient_sync(wrapped, last):
                    with autocast:
                        logits = forward(input_ids=mb_ids, use_cache=False).logits
                    mb_loss = F.cross_entropy(
                        logits[:, :-1].float().flatten(0, 1),
                        mb_labels[:, 1:].flatten(),
                        ignore_index=IGNORE_INDEX,
                        reduction="sum",
                    )
                    (mb_loss * scale).backward()
                loss_sum += mb_loss.detach().double()
            clip = settings.grad_clip if settings.grad_clip > 0 else float("inf")
            grad_norm = clip_gradients(model, clip)
            loss = float(env.all_sum(loss_sum) / labelled.clamp_min(1))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # every rank sees the same summed loss and gradients, so all stop here
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is {loss} and the gradient norm "
                    f"{float(grad_norm)}: the model's activations overflowed (NaN or inf); "
                    "nothing was updated and the last checkpoint is intact: resume it with a "
                    "lower train.lr, or set train.grad_clip"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            window_tokens += ids.numel() * env.world_size
            done = step + 1
            if done % settings.log_every == 0 or done == settings.steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / max(elapsed, 1e-9)
                log(
                    {
                        "step": done,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tokens_per_s,
                    }
                )
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                window_tokens, window_start = 0, time.perf_counter()
            bar.update(1)
            if settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
                evaluate(done)
                env.barrier()
            if settings.checkpoint_every and done % settings.checkpoint_every == 0:
                checkpoint(done)
            if stop_after is not None and done == stop_after and done < settings.steps:
                if not (settings.checkpoint_every and done % settings.checkpoint_every == 0):
                    checkpoint(done)
                bar.close()
                return None
    except KeyboardInterrupt:
        bar.close()
        if env.main:
            print(
                f"\ninterrupted during step {step + 1}; the last checkpoint is intact, "
                f"continue with --resume"
            )
        raise
    bar.close()
    if not settings.checkpoint_every or settings.steps % settings.checkpoint_every:
        checkpoint(settings.steps)
    final = out / "model"
    results = evaluate(settings.steps)
    exported = gather_model(env, model) if sharded else model  # full weights on rank 0

    def export() -> None:
        eval_json = json.dumps({"provenance": provenance(), **results}, indent=2) + "\n"
        save_model_folder(final, exported, run_config, data.tokenizer, {"eval.json": eval_json})

    env.on_main(export, share=False)
    return final
