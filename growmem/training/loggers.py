"""Where a run's metrics go besides metrics.jsonl: TensorBoard, and any other logger.

A logger is a callable that takes each metrics record exactly as it is appended to
metrics.jsonl, on rank 0 only: ``{"step", "loss", "lr", "grad_norm", "tokens_per_s"}`` for
training lines and ``{"step", "eval": {...}}`` for evaluations (the task's results). Pass
loggers to ``growmem.train.train(config, loggers=[...])``; for example, Weights & Biases::

    import wandb
    wandb.init(project="growmem")
    train(config, loggers=[lambda record: wandb.log(scalars(record), step=record["step"])])

`scalars` flattens a record into ``{tag: number}`` for such loggers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Logger = Callable[[dict[str, Any]], None]

TENSORBOARD_FOLDER = "tensorboard"


def _label(item: dict[str, Any]) -> str:
    """The name of one row of a list of results (an MQAR slice, a NIAH length, a position
    bucket) from its integer fields, e.g. "seq_len=64,num_kv_pairs=8"."""
    keys = [f"{k}={v}" for k, v in item.items() if isinstance(v, int) and not isinstance(v, bool)]
    return ",".join(keys)


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, out)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, dict):
                label = _label(item) or str(index)
                fields = {k: v for k, v in item.items() if not isinstance(v, int)}
                _flatten(f"{prefix}/{label}", fields, out)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record as ``{tag: value}``: training lines under ``train/``
    (``train/loss``, ``train/lr``, ...), evaluations under ``eval/`` with nested results
    joined by "/" and rows of a list named by their integer fields
    (``eval/slices/seq_len=64,num_kv_pairs=8/accuracy``); the step itself is left out."""
    out: dict[str, float] = {}
    if "eval" in record:
        _flatten("eval", record["eval"], out)
    else:
        _flatten("train", {k: v for k, v in record.items() if k != "step"}, out)
    return out


def summary_writer_class():
    """torch's ``SummaryWriter``.

    Raises:
        ImportError: the optional ``tensorboard`` package is missing (named, with its install
            command).
    """
    try:
        import tensorboard  # noqa: F401  torch's writer needs it, and says so less clearly
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "train.tensorboard needs the tensorboard package: pip install tensorboard"
        ) from error
    return SummaryWriter


class TensorBoardLogger:
    """Writes each record's `scalars` at its step into a TensorBoard log folder.

    The writer is opened at the first record with ``purge_step`` at its step: the events a
    killed session wrote after its last checkpoint are dropped when a resumed session logs
    those steps again, so each curve has one value a step.

    Args:
        folder: the log folder (a run's is <out_dir>/tensorboard).
        writer_class: makes the writer as torch's ``SummaryWriter(log_dir=, purge_step=)``
            does (an object with ``add_scalar(tag, value, step)``, ``flush()``, ``close()``);
            default: torch's.
    """

    def __init__(self, folder: Path | str, writer_class=None):
        self.folder = Path(folder)
        self.writer_class = writer_class or summary_writer_class()
        self.writer = None

    def __call__(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(self.folder), purge_step=record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        """Write what is buffered and close the writer (opened or not)."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
