"""Checkpoints written atomically and read back with checks.

A run folder holds ``checkpoints/step_<N>/`` folders and a ``checkpoints/latest`` file naming
the newest. A checkpoint is written into a hidden temporary folder and renamed into place,
then ``latest`` is replaced (``os.replace``), so an interruption at any moment leaves the
previous checkpoint whole and ``latest`` pointing at a complete one.

A checkpoint holds the model (``config.json`` + ``model.safetensors``, loadable by
``from_pretrained``), the run config (``run.yaml``), the tokenizer when the task has one, and
``trainer_state.pt``: step, optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from growmem.models import GrowMemForCausalLM

RUN_FILE = "run.yaml"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
LATEST = "latest"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a reader sees the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def _write_model_files(
    folder: Path, model: GrowMemForCausalLM, run_config: dict[str, Any], tokenizer=None
) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    record = dict(run_config)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer")
        record["tokenizer_fingerprint"] = tokenizer.fingerprint()
    (folder / RUN_FILE).write_text(yaml.safe_dump(record, sort_keys=False))


def _write_folder_atomic(final: Path, write) -> None:
    """Run ``write(tmp)`` on a fresh hidden sibling folder, then put it in ``final``'s place
    (an existing ``final`` is moved aside first and removed last)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # the name is known before the folder exists, so a Ctrl-C at any point up to the move
    # (even inside the mkdir) leaves no hidden folder behind
    tmp = final.parent / f".{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        if not final.exists():
            os.replace(tmp, final)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stale = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=final.parent))
    os.replace(final, stale / final.name)
    os.replace(tmp, final)
    shutil.rmtree(stale)


def save_model_folder(
    folder: Path,
    model: GrowMemForCausalLM,
    run_config: dict[str, Any],
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write a loadable model folder atomically: HF config and safetensors weights, the run
    config, the tokenizer (its fingerprint is recorded in run.yaml) and ``extra_files``
    (name -> text)."""

    def write(tmp: Path) -> None:
        _write_model_files(tmp, model, run_config, tokenizer)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    _write_folder_atomic(Path(folder), write)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: GrowMemForCausalLM,
    run_config: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer=None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, drop all but ``keep``.

    Returns:
        The checkpoint folder.
    """
    root = run_dir / "checkpoints"
    name = f"step_{step:08d}"

    def write(tmp: Path) -> None:
        _write_model_files(tmp, model, run_config, tokenizer)
        torch.save({"step": step, **trainer_state}, tmp / STATE_FILE)

    _write_folder_atomic(root / name, write)
    write_text_atomic(root / LATEST, name + "\n")
    checkpoints = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old)
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names, or None when the run has none."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    folder = run_dir / "checkpoints" / pointer.read_text().strip()
    if not folder.is_dir():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def read_run_config(folder: Path) -> dict[str, Any]:
    """The run config recorded in a model or checkpoint folder."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a growmem model or checkpoint folder (no {RUN_FILE})"
        )
    return yaml.safe_load(path.read_text())


def load_weights(folder: Path, model: GrowMemForCausalLM) -> None:
    """Load ``model.safetensors`` of ``folder`` into ``model``, strictly.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: a truncated or corrupt file, or weights of another model.
    """
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {error}") from error
    expected = model.state_dict()
    if "lm_head.weight" not in state and model.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} holds another model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, other shapes {shapes[:5]}"
        )
    model.load_state_dict(state)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint folder (step, optimizer, scheduler, RNG)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint trainer state not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged pickles
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {error}") from error
