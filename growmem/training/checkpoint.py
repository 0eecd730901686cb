"""Checkpoints written atomically and read back with checks.

A run folder holds ``checkpoints/step_<N>/`` folders and a ``checkpoints/latest`` file naming
the newest. A checkpoint is written into a hidden temporary folder and renamed into place,
then ``latest`` is replaced (``os.replace``), so an interruption at any moment leaves the
previous checkpoint whole and ``latest`` pointing at a complete one. What a process killed
outright (SIGKILL, power loss) leaves behind is a hidden ``.tmp-`` entry, removed by
`remove_temporaries` when the run next starts or saves.

A checkpoint holds the model (``config.json`` + ``model.safetensors`` + ``generation_config.json``,
loadable by ``from_pretrained``), the run config with the provenance of the code that wrote it
(``run.yaml``), the tokenizer when the task has one (Hugging Face files that
``AutoTokenizer.from_pretrained(folder)`` loads, and ``growmem_tokenizer.json``; folders written
before kept growmem's tokenizer in ``tokenizer/``, see ``growmem.tasks.find_tokenizer``),
``trainer_state.pt`` (step, optimizer,
scheduler and RNG states) and ``SHA256SUMS``: the sha256 of every other file (the format of
``sha256sum``), checked when a file is loaded so that a damaged file is refused, not used.
A checkpoint of a sharded run (``train.parallel=fsdp``) holds, in place of the weights and the
optimizer state, ``distributed/``: the model and optimizer as torch.distributed.checkpoint
wrote them, every process its shards (growmem.training.parallel), and ``config.json`` alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from growmem.models import GrowMemForCausalLM
from growmem.tasks import Tokenizer, find_tokenizer, load_tokenizer
from growmem.training.config import model_from_record
from growmem.training.config_files import load_yaml
from growmem.training.model_card import model_card, write_generation_files
from growmem.utils.provenance import provenance

RUN_FILE = "run.yaml"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
RESULTS_FILE = "eval.json"  # the final evaluation a run's model folder holds
CHECKSUMS = "SHA256SUMS"
LATEST = "latest"
SHARDS = "distributed"  # a sharded checkpoint's torch.distributed.checkpoint folder
TMP_PREFIX = ".tmp-"  # every temporary file or folder this module makes starts with it
_STEP_NAME = re.compile(r"step_\d+")
# what versions before TMP_PREFIX left: ".step_00000005-1a2b3c4d", ".model-1a2b3c4d"
_OLD_TEMPORARY = re.compile(r"\.(step_\d+|model)-[0-9a-f]{8}")
# a complete earlier version of folder NAME, moved aside for its replacement: the folder
# itself, or (versions before TMP_PREFIX) a folder holding it
_STALE = re.compile(r"\.tmp-stale-(?P<name>[^-]+)-[0-9a-f]{8}")
_OLD_STALE = re.compile(r"\.stale-(?P<name>[^-]+)-.+")


class ChecksumError(ValueError):
    """A file of a checkpoint or model folder differs from the sha256 recorded when it was
    written (bit rot, a partial copy, an edit), or is missing."""


def _temporary(folder: Path, name: str) -> Path:
    return folder / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def remove_temporaries(folder: Path) -> list[str]:
    """Delete the hidden temporary files and folders an interrupted write left in ``folder``
    (a killed process never runs its own clean-up). An earlier version of a folder that was
    moved aside for a replacement that never arrived is put back instead. Only the one
    process writing the run may call this: another writer's temporaries would go too.

    Returns:
        The names removed or put back.
    """
    folder = Path(folder)
    handled = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        stale = _STALE.fullmatch(entry.name) or _OLD_STALE.fullmatch(entry.name)
        if stale:
            previous = entry if stale.re is _STALE else entry / stale["name"]
            if not (folder / stale["name"]).exists() and previous.is_dir():
                os.replace(previous, folder / stale["name"])
        elif not (entry.name.startswith(TMP_PREFIX) or _OLD_TEMPORARY.fullmatch(entry.name)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
        handled.append(entry.name)
    return handled


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (a reader sees the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path.parent, path.name)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_checksums(folder: Path) -> None:
    """``SHA256SUMS`` of every file below ``folder`` (``sha256sum -c SHA256SUMS`` checks it)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / CHECKSUMS).write_text("".join(lines))


def verify_checksums(folder: Path, names: list[str] | None = None) -> None:
    """Check files of ``folder`` against its ``SHA256SUMS``.

    Folders written before growmem recorded checksums have none and pass unchecked.

    Args:
        folder: a checkpoint or model folder.
        names: the files to check (paths relative to ``folder``); None: every listed file.
            A name the list does not hold is not checked (a file added later, e.g. eval-*.json).

    Raises:
        ChecksumError: a file differs from its recorded sha256, or is missing; or the
            ``SHA256SUMS`` file itself is damaged.
    """
    listing = Path(folder) / CHECKSUMS
    if not listing.is_file():
        return
    recorded = {}
    for number, line in enumerate(listing.read_bytes().splitlines(), 1):
        digest, sep, name = line.decode("utf-8", "replace").partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ChecksumError(f"{listing}, line {number}: not a '<sha256>  <file>' line")
        recorded[name] = digest
    for name in recorded if names is None else [n for n in names if n in recorded]:
        path = Path(folder) / name
        if not path.is_file():
            raise ChecksumError(f"{path} is missing (it is listed in {listing})")
        if _sha256(path) != recorded[name]:
            raise ChecksumError(
                f"{path} differs from the sha256 recorded in {listing} when it was written: "
                "the file is damaged (or was edited); it is not used"
            )


@contextlib.contextmanager
def _no_hf_progress_bars():
    """transformers draws a "Writing model shards" bar for every save; a run's output has its
    own progress display (or none: ``train.progress=false``)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_model_files(
    folder: Path,
    model: GrowMemForCausalLM,
    run_config: dict[str, Any],
    tokenizer=None,
    weights: bool = True,
) -> None:
    """The model's HF files (``config.json`` with the tokenizer's special-token ids and
    ``generation_config.json``, the weights unless not ``weights``), run.yaml and the
    tokenizer (its fingerprint recorded in run.yaml)."""
    if weights:
        with _no_hf_progress_bars():
            model.save_pretrained(folder, safe_serialization=True)
    write_generation_files(folder, model.config, tokenizer)
    record = {**run_config, "provenance": provenance()}
    if tokenizer is not None:
        tokenizer.save(folder, model_max_length=model.config.max_position_embeddings)
        record["tokenizer_fingerprint"] = tokenizer.fingerprint()
    (folder / RUN_FILE).write_text(yaml.safe_dump(record, sort_keys=False))


def _write_folder_atomic(final: Path, write) -> None:
    """Run ``write(tmp)`` on a fresh hidden sibling folder, record its checksums, then put it
    in ``final``'s place (an existing ``final`` is moved aside first and removed last).

    Raises:
        OSError: a write failed (a full disk, say); ``final`` is as it was and no temporary
            is left behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    # the name is known before the folder exists, so a Ctrl-C at any point up to the move
    # (even inside the mkdir) leaves no hidden folder behind
    tmp = _temporary(final.parent, final.name)
    try:
        tmp.mkdir()
        write(tmp)
        _write_checksums(tmp)
        if not final.exists():
            os.replace(tmp, final)
            return
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError):  # say which folder, and that nothing was lost
            message = f"could not write {final} ({error.strerror or error}); it is unchanged"
            raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
        raise
    stale = _temporary(final.parent, f"stale-{final.name}")
    os.replace(final, stale)
    os.replace(tmp, final)
    shutil.rmtree(stale)


def save_model_folder(
    folder: Path,
    model: GrowMemForCausalLM,
    run_config: dict[str, Any],
    tokenizer=None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write a loadable model folder atomically: HF config, generation config and safetensors
    weights, the run config, the tokenizer (its fingerprint is recorded in run.yaml), a model
    card (README.md, with the results of ``eval.json`` when ``extra_files`` holds it) and
    ``extra_files`` (name -> text)."""
    extra_files = dict(extra_files or {})
    results = json.loads(extra_files[RESULTS_FILE]) if RESULTS_FILE in extra_files else None
    extra_files.setdefault(CARD_FILE, model_card(model.config, run_config, results))

    def write(tmp: Path) -> None:
        _write_model_files(tmp, model, run_config, tokenizer)
        for name, text in extra_files.items():
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
    shards: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` at it, drop all but ``keep``
    (and what an earlier, killed save left behind).

    Args:
        shards: a folder from `shards_folder` that the processes of a sharded run filled
            with their distributed checkpoint: it becomes the checkpoint's ``distributed/``,
            in place of ``model.safetensors`` (``trainer_state`` then holds no optimizer).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:08d}"
    if shards is None:  # else shards_folder cleaned up, before the shards were written
        remove_temporaries(root)

    def write(tmp: Path) -> None:
        _write_model_files(tmp, model, run_config, tokenizer, weights=shards is None)
        if shards is not None:
            os.replace(shards, tmp / SHARDS)
        torch.save({"step": step, **trainer_state}, tmp / STATE_FILE)

    _write_folder_atomic(root / name, write)
    write_text_atomic(root / LATEST, name + "\n")
    checkpoints = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old)
    return root / name


def shards_folder(run_dir: Path) -> Path:
    """A fresh hidden folder of ``run_dir``'s checkpoints for the shards of the next sharded
    checkpoint (`save_checkpoint` moves it into place; an interrupted save leaves it to
    `remove_temporaries`), after removing what an earlier, killed save left behind. Called
    by the one process writing the run."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_temporaries(root)
    return _temporary(root, "shards")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names, or None when the run has none.

    Raises:
        ValueError: ``latest`` names something other than a ``step_N`` folder of
            ``checkpoints/`` (a path elsewhere, say).
        FileNotFoundError: the folder it names does not exist.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_bytes().decode("utf-8", "replace").strip()
    if not _STEP_NAME.fullmatch(name):
        raise ValueError(
            f"{pointer} must name a step_N folder of {root}, got {name[:80]!r}; write the name "
            "of the checkpoint to resume from into it"
        )
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{pointer} names {folder.name}, which does not exist")
    return folder


def read_run_config(folder: Path) -> dict[str, Any]:
    """The run config recorded in a model or checkpoint folder (``run.yaml``), checked; its
    model section as the run meant it (``model_from_record``: a record of an earlier release
    keeps the defaults of then).

    Raises:
        FileNotFoundError: no run.yaml (not a growmem model or checkpoint folder).
        ValueError: a damaged run.yaml (checksum, YAML, or no model/task/train sections).
    """
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        hint = (
            f"; did you mean {Path(folder) / 'model'}?" if (Path(folder) / "model").is_dir() else ""
        )
        raise FileNotFoundError(
            f"{folder} is not a growmem model or checkpoint folder (no {RUN_FILE}){hint}"
        )
    verify_checksums(folder, [RUN_FILE])
    record = load_yaml(path.read_bytes(), str(path))
    sections = ("model", "task", "train")
    if not isinstance(record, dict) or not all(isinstance(record.get(k), dict) for k in sections):
        raise ValueError(f"{path} is damaged: expected the mappings {list(sections)}")
    return {**record, "model": model_from_record(record["model"])}


def load_weights(folder: Path, model: GrowMemForCausalLM) -> None:
    """Load ``model.safetensors`` of ``folder`` into ``model``, strictly.

    Raises:
        FileNotFoundError: the weights file is missing.
        ChecksumError: the file differs from the sha256 recorded when it was written.
        ValueError: a truncated or corrupt file, or weights of another model.
    """
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file() and (Path(folder) / SHARDS).is_dir():
        raise ValueError(
            f"{folder} is a sharded checkpoint (train.parallel=fsdp, its weights in {SHARDS}/): "
            "resume it with train.parallel=fsdp under torchrun; the run's model/ folder holds "
            "the full weights"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint weights not found: {path}")
    verify_checksums(folder, [WEIGHTS_FILE])
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
    """``trainer_state.pt`` of a checkpoint folder (step, optimizer, scheduler, RNG).

    Raises:
        FileNotFoundError: the file is missing.
        ChecksumError: it differs from the sha256 recorded when it was written.
        ValueError: a truncated or corrupt file.
    """
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint trainer state not found: {path}")
    verify_checksums(folder, [STATE_FILE])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for damaged pickles
        raise ValueError(f"checkpoint {path} is truncated or corrupt: {error}") from error


def load_folder_tokenizer(folder: Path, vocab_size: int, purpose: str) -> Tokenizer:
    """The growmem tokenizer of a model or checkpoint folder (`find_tokenizer`: today's layout
    or the ``tokenizer/`` of older folders), checked against the fingerprint its run.yaml
    records (when it has one) and the model's vocabulary.

    Args:
        folder: the model or checkpoint folder.
        vocab_size: the model's vocabulary size.
        purpose: what needs the tokenizer, for the message when there is none ("task lm").

    Raises:
        FileNotFoundError: the folder has no tokenizer (an MQAR model works on ids).
        ValueError: the tokenizer is not the one the model was trained with.
    """
    tokenizer_dir = find_tokenizer(folder)
    if tokenizer_dir is None:
        raise FileNotFoundError(
            f"{folder} has no tokenizer (growmem_tokenizer.json); {purpose} needs the model's "
            "tokenizer"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    expected = None
    if (Path(folder) / RUN_FILE).is_file():
        expected = read_run_config(folder).get("tokenizer_fingerprint")
    if expected is not None and tokenizer.fingerprint() != expected:
        raise ValueError(
            f"tokenizer in {tokenizer_dir} does not match the model's "
            f"({tokenizer.fingerprint()} != {expected})"
        )
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, the model {vocab_size}")
    return tokenizer
