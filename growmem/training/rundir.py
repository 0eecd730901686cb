"""The run folder: one run at a time (a lock), what a start or a resume may do with what the
folder already holds, and its metrics file.

A run folder holds ``config.yaml`` (the config of the latest session), ``metrics.jsonl`` (one
JSON record a line), ``checkpoints/`` (growmem.training.checkpoint), ``model/`` at the end
and ``.lock`` (the pid and host of the run writing it, empty when none is).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growmem.training.checkpoint import (
    RUN_FILE,
    latest_checkpoint,
    read_run_config,
    remove_temporaries,
    verify_checksums,
    write_text_atomic,
)
from growmem.training.config import TASK_TYPES, RunConfig, TrainSettings, model_settings
from growmem.training.config_files import load_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"

# The train settings a resumed run may change: what is logged or kept, how long the run goes
# and where and how it computes (activation checkpointing recomputes the same values; compiled
# or not: the same numbers to fp32 tolerance). The others decide the sequence of weights
# (optimizer, schedule shape, seed, precision, parallel), so a checkpoint continued with
# other values would become another run than the one it belongs to.
RESUME_MAY_CHANGE = (
    "out_dir",
    "steps",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "threads",
    "progress",
    "device",
    "activation_checkpointing",
    "compile",
    "tensorboard",
)
# These may be re-split (e.g. to resume a 2-process run on one process) as long as the
# global batch, batch_size x grad_accum x processes, stays: every split of a global batch
# computes the same gradient (the loss is the mean over its labelled tokens).
BATCH_SPLIT = ("batch_size", "grad_accum")


class RunFolderInUse(OSError):
    """Another live process holds the run folder's lock."""


def ensure_folder(path: Path | str, setting: str) -> Path:
    """``path`` as an existing folder, created with its parents when missing.

    Args:
        path: the folder.
        setting: where the path came from, for messages (``train.out_dir``, ``--out``).

    Raises:
        ValueError: ``path`` is a file.
        OSError: it cannot be created (read-only parent, a file on the way), named.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{setting} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            error.errno, f"{setting}: cannot create the folder {path} ({error.strerror})"
        ) from error
    return path


class RunLock:
    """An exclusive lock on a run folder, held by the one process that writes the run (rank 0
    under torchrun).

    It is a ``flock`` on ``<folder>/.lock``: the system drops it when its holder ends in any
    way, a SIGKILL included, so the lock of a dead run is taken over by the next one. The
    file names the holder (pid and host) for the message that refuses a second run, and is
    emptied on release, so a name found in it by a new holder is a run that was killed.
    """

    def __init__(self, folder: Path | str):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock.

        Returns:
            A note when the lock was left by a run that ended without releasing it, else None.

        Raises:
            RunFolderInUse: another live process holds it (its pid is in the message).
            OSError: the folder is not writable.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OSError(
                error.errno, f"cannot write in the run folder {self.path.parent} ({error.strerror})"
            ) from error
        holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderInUse(
                f"{self.path.parent} is in use by another growmem run ({holder or 'unknown pid'})"
                "; wait for it to end or choose another train.out_dir"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        if holder:
            return f"took over the lock of {holder}, which ended without releasing it"
        return None

    def release(self) -> None:
        """Empty the file and drop the lock (nothing when not held)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


@dataclass
class RunPlan:
    """What a training session does with its folder.

    Attributes:
        checkpoint: the checkpoint to resume from, or None to start.
        notes: what the session should tell its user (applied changes, a fresh start over a
            run that stopped early, a lock taken over, temporaries removed).
    """

    checkpoint: Path | None
    notes: list[str] = field(default_factory=list)


def plan_run(
    out: Path, config: RunConfig, resume: bool | str, processes: int, lock: RunLock
) -> RunPlan:
    """Take ``out`` for this run (``lock``) and decide, from what it holds, whether to start
    or to resume; nothing the folder holds is changed before the decision (except a fresh
    start over a run that never reached a checkpoint, whose files are void).

    Args:
        out: the run folder (created when missing).
        config: this session's config.
        resume: True (continue from the latest checkpoint), False (start; the folder must
            hold no checkpoint) or "auto" (continue when there is a checkpoint, else start).
        processes: processes of this launch.
        lock: the folder's lock, acquired here and held by the caller until the run ends.

    Raises:
        ValueError: the folder holds a run that this session may not continue or replace
            (a checkpoint without ``resume``, other model/task/trajectory settings, a model
            without checkpoints), or damaged files.
        FileNotFoundError: ``resume`` is True and there is no checkpoint.
        OSError: the folder is not writable, or in use by another run (`RunFolderInUse`).
    """
    ensure_folder(out, "train.out_dir")
    notes = [note] if (note := lock.acquire()) else []
    removed = remove_temporaries(out) + remove_temporaries(out / "checkpoints")
    if removed:
        notes.append(f"removed what an interrupted write left behind: {', '.join(removed)}")
    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        if (out / "model").exists():
            raise ValueError(
                f"{out} holds a trained model ({out / 'model'}) but no checkpoint to resume "
                "from; choose another train.out_dir (or remove that model folder to train afresh)"
            )
        stopped_early = any((out / name).exists() for name in (CONFIG_FILE, METRICS_FILE))
        if resume is True:
            what = (
                "it holds a run that stopped before its first checkpoint"
                if stopped_early
                else "it is new"
            )
            raise FileNotFoundError(
                f"--resume: {out} has no checkpoint to resume from ({what}); run the same "
                "command without --resume to start it"
            )
        if stopped_early:
            _clear_void_run(out, config)
            notes.append(
                f"{out} held a run that stopped before its first checkpoint: starting it over"
            )
        return RunPlan(None, notes)
    if resume is False:
        finished = "a finished run" if (out / "model").is_dir() else "a run"
        raise ValueError(
            f"{out} already holds {finished} (checkpoint {checkpoint.name}); pass --resume to "
            "continue it or choose another train.out_dir (nothing was changed)"
        )
    verify_checksums(checkpoint)
    notes += check_resume(checkpoint, read_run_config(checkpoint), config, processes)
    return RunPlan(checkpoint, notes)


def _clear_void_run(out: Path, config: RunConfig) -> None:
    """Remove what a run that stopped before its first checkpoint logged. Its tokenizer (a
    trained BPE) is kept for a run of the same task, which would train the same one."""
    recorded = out / CONFIG_FILE
    same_task = False
    if recorded.is_file():
        try:
            same_task = (
                load_yaml(recorded.read_bytes(), str(recorded))["task"]
                == (config.to_dict()["task"])
            )
        except (ValueError, KeyError, TypeError):
            same_task = False  # a damaged config.yaml: nothing of it can be trusted
    recorded.unlink(missing_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)
    if not same_task and (out / "tokenizer").is_dir():
        shutil.rmtree(out / "tokenizer")


def checkpoint_step(checkpoint: Path) -> int:
    """The step of a ``step_N`` checkpoint folder."""
    return int(Path(checkpoint).name.removeprefix("step_"))


# Task settings that change how the data is computed but not which data it is.
TASK_RESUME_MAY_CHANGE = ("num_workers",)


def _task_course(task: dict[str, Any]) -> dict[str, Any]:
    """The settings of a recorded task section that decide the run's data: its task's
    defaults filled in (a run recorded before a setting existed had its default) and
    ``TASK_RESUME_MAY_CHANGE`` left out."""
    kind = TASK_TYPES.get(task.get("name", "mqar"))
    defaults = dataclasses.asdict(kind()) if kind is not None else {}
    full = {**defaults, **task}
    return {k: v for k, v in full.items() if k not in TASK_RESUME_MAY_CHANGE}


def check_resume(
    checkpoint: Path, recorded: dict[str, Any], config: RunConfig, processes: int
) -> list[str]:
    """Compare a resumed session's config with its checkpoint's.

    Args:
        checkpoint: the checkpoint folder.
        recorded: its run.yaml.
        config: this session's config.
        processes: processes of this launch.

    Returns:
        Notes on the changed settings that are applied (``RESUME_MAY_CHANGE``, a re-split
        global batch).

    Raises:
        ValueError: another model or task, a changed setting that would change the run's
            trajectory (all of them listed), or train.steps below the checkpoint's step.
    """
    new = config.to_dict()
    same_model = model_settings(recorded["model"]) == model_settings(new["model"])
    if not same_model or _task_course(recorded["task"]) != _task_course(new["task"]):
        raise ValueError(
            f"--resume: checkpoint {checkpoint} is from another model or task; its config is "
            f"{checkpoint / RUN_FILE}"
        )
    defaults = dataclasses.asdict(TrainSettings())
    then = {**defaults, **{k: v for k, v in recorded["train"].items() if k in defaults}}
    now = new["train"]
    changed = {k: (then[k], v) for k, v in now.items() if then[k] != v}
    # a cosine schedule has no decay fraction: changing it changes nothing
    inert = {"decay_fraction"} if then["schedule"] == now["schedule"] == "cosine" else set()
    refused = [
        f"train.{k} {a!r} -> {b!r}"
        for k, (a, b) in changed.items()
        if k not in (*RESUME_MAY_CHANGE, *BATCH_SPLIT, *inert)
    ]
    # recorded since processes could differ; an older checkpoint is taken to match
    processes_then = recorded.get("processes", processes)

    def global_batch(train: dict, procs: int) -> str:
        size = train["batch_size"] * train["grad_accum"] * procs
        return f"{train['batch_size']} x {train['grad_accum']} x {procs} = {size}"

    if then["batch_size"] * then["grad_accum"] * processes_then != (
        now["batch_size"] * now["grad_accum"] * processes
    ):
        refused.append(
            "global batch (train.batch_size x train.grad_accum x processes) "
            f"{global_batch(then, processes_then)} -> {global_batch(now, processes)}"
        )
    if refused:
        raise ValueError(
            f"--resume: these settings differ from checkpoint {checkpoint} and would change "
            f"the run's course: {'; '.join(refused)}. Resume with the checkpoint's values, or "
            "start a new run in another train.out_dir (a resume may change only "
            f"{', '.join(RESUME_MAY_CHANGE)}, and re-split the global batch)"
        )
    step = checkpoint_step(checkpoint)
    if now["steps"] < step:
        raise ValueError(
            f"--resume: checkpoint {checkpoint.name} is at step {step}, beyond "
            f"train.steps={now['steps']}"
        )
    applied = [f"train.{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()]
    if processes != processes_then:
        applied.append(f"processes {processes_then} -> {processes}")
    if not applied:
        return []
    schedule = (
        f" (the learning-rate schedule now ends at step {now['steps']})"
        if "steps" in changed
        else ""
    )
    return [f"resuming from step {step} with changed settings: {', '.join(applied)}{schedule}"]


def trim_metrics(path: Path, step: int) -> list[str]:
    """Cut a metrics file back to the records of steps up to ``step`` (a resumed checkpoint's:
    a step's records all come before its checkpoint), repairing a torn last line.

    A process killed while appending a record leaves its last line incomplete; that line is
    dropped (it belongs to a step after the checkpoint anyway).

    Returns:
        A note when a torn line was dropped.

    Raises:
        ValueError: a line other than the last is not a JSON record with a step (a damaged
            file, which only its owner can repair): its number is named.
    """
    if not path.is_file():
        return []
    lines = path.read_bytes().split(b"\n")
    keep, notes = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):  # the last line, not ended by a newline: torn
                notes.append(f"dropped the torn last line of {path} (its writer was killed)")
                continue
            raise ValueError(
                f"{path}, line {number}: not a metrics record ({error}); repair or remove "
                "that line and resume again"
            ) from None
        if record["step"] <= step:
            keep.append(raw.decode("utf-8") + "\n")
    write_text_atomic(path, "".join(keep))
    return notes
