"""Language-modelling text sources and the token-block sampler training reads from.

Sources (`load_corpus`):
  * ``"stdlib"`` (default, offline): the ``*.py`` files of the running interpreter's standard
    library, without test packages and site-packages — about 12 MB for CPython 3.11. The
    corpus therefore depends on the Python version; `TokenBlocks` caches are keyed by content.
  * a local file or folder (`text_files`).
  * ``"hf:<name>"`` or ``"hf:<name>:<config>"``: a Hugging Face dataset (needs the optional
    ``datasets`` package, and downloads on first use).

Splits: a file belongs to "train", "val" or "test" by the SHA-256 of its path relative to the
corpus root (bucket = first 8 hex digits mod 100: 0-89 train, 90-94 val, 95-99 test). The rule
is stable across machines and never moves a file when others are added; 90/5/5 keeps the
stdlib's val and test splits large enough to measure (about 0.7 MB and 0.36 MB on 3.11).

Blocks (`TokenBlocks`): documents are tokenized and joined into one stream, each document
followed by the tokenizer's eos id. Block ``i`` is ``stream[i*(T-1) : i*(T-1) + T]`` for
``T = seq_len``: consecutive blocks share one token, so with the Hugging Face convention used
here — ``labels = input_ids`` and the model shifts internally, position t predicting token
t + 1 — every token of the stream after the first is a target exactly once.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from growmem.tasks.sampling import EpochSampler
from growmem.tasks.tokenizers import Tokenizer

__all__ = [
    "DEFAULT_EXTENSIONS",
    "SPLITS",
    "TOKEN_DTYPES",
    "TOKEN_FILE_EXTENSIONS",
    "TokenBlocks",
    "hf_records",
    "hf_source",
    "hf_split",
    "hf_text_dataset",
    "is_token_file",
    "load_corpus",
    "load_token_file",
    "split_of",
    "stdlib_corpus",
    "text_files",
]

SPLITS = ("train", "val", "test")
# Upper bucket bound (exclusive, out of 100) of each split, in order.
_SPLIT_BOUNDS = {"train": 90, "val": 95, "test": 100}
# Directory names never part of the stdlib corpus.
_STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst")


def _check_split(split: str | None, *, allow_none: bool = True) -> None:
    if split is None and allow_none:
        return
    if split not in SPLITS:
        allowed = f"one of {SPLITS}" + (" or None" if allow_none else "")
        raise ValueError(f"split: expected {allowed}, got {split!r}")


def split_of(relative_path: str | Path) -> str:
    """The split ("train", "val" or "test") of a file, from its path relative to the corpus root.

    Args:
        relative_path: e.g. ``"json/decoder.py"``; compared in POSIX form.
    """
    digest = hashlib.sha256(Path(relative_path).as_posix().encode("utf-8")).hexdigest()
    bucket = int(digest[:8], 16) % 100
    return next(split for split, bound in _SPLIT_BOUNDS.items() if bucket < bound)


def _select(root: Path, files: Iterable[Path], split: str | None) -> list[Path]:
    """Sorted ``files`` (under ``root``) whose relative path falls in ``split`` (all if None)."""
    chosen = [f for f in files if split is None or split_of(f.relative_to(root)) == split]
    return sorted(chosen, key=lambda f: f.relative_to(root).as_posix())


def stdlib_corpus(split: str | None = None) -> list[Path]:
    """The standard-library ``*.py`` files of the running interpreter, in one split.

    Excludes every file under a directory named ``test``, ``tests``, ``idle_test``,
    ``site-packages``, ``dist-packages`` or ``__pycache__``.

    Args:
        split: "train", "val", "test", or None for all files.
    Returns: absolute paths, sorted by their path relative to the stdlib root.
    """
    _check_split(split)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _STDLIB_EXCLUDED_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    return _select(root, files, split)


def text_files(
    path: str | Path,
    split: str | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
) -> list[Path]:
    """A local text file, or the text files of a folder (recursively) in one split.

    Args:
        path: a file, or a folder; files and folders whose name starts with "." are skipped.
        split: "train", "val", "test" (folders only: by the hash of the path relative to
            ``path``), or None for everything.
        extensions: file-name endings to keep in a folder, e.g. (".txt", ".py").
    Returns: sorted paths.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a split for a single file, or an unknown split.
    """
    _check_split(split)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path: {str(path)!r} does not exist")
    if path.is_file():
        if split is not None:
            raise ValueError(
                f"split: a single file ({path}) cannot be split by files; pass split=None"
            )
        return [path]
    files = [
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.name.endswith(tuple(extensions))
        and not any(part.startswith(".") for part in f.relative_to(path).parts)
    ]
    return _select(path, files, split)


def hf_records(
    name: str, split: str, text_field: str = "text", config: str | None = None, start: int = 0
) -> Iterator[str]:
    """The ``text_field`` strings of every record of a Hugging Face dataset split (empty ones
    included, so that a record's place in the split is its index), streamed: the split is
    read as it is consumed (``load_dataset(..., streaming=True)``), never loaded whole.

    Args:
        name: dataset name on the Hub or a local dataset path, e.g. "wikitext", or a folder
            of train.jsonl / validation.jsonl files.
        split: the dataset's own split name, e.g. "train" or "validation".
        text_field: the column holding the text.
        config: the dataset configuration, e.g. "wikitext-103-raw-v1".
        start: records to skip first (a resumed reader's position).

    Raises:
        ImportError: the optional ``datasets`` package is not installed.
        ValueError: the dataset has no column ``text_field`` (raised at the first record).
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "hf_text_dataset needs the Hugging Face `datasets` package: "
            "pip install 'growmem[datasets]'"
        ) from error
    dataset = datasets.load_dataset(name, config, split=split, streaming=True)
    if start:
        dataset = dataset.skip(start)
    for record in dataset:
        if text_field not in record:
            raise ValueError(
                f"text_field: {text_field!r} is not a column of {name} (has {sorted(record)})"
            )
        yield record[text_field] or ""


def hf_text_dataset(
    name: str, split: str, text_field: str = "text", config: str | None = None
) -> Iterator[str]:
    """The non-empty ``text_field`` strings of a Hugging Face dataset split, in dataset order,
    streamed (`hf_records`).

    Args:
        name: dataset name on the Hub or a local dataset path, e.g. "wikitext".
        split: the dataset's own split name, e.g. "train" or "validation".
        text_field: the column holding the text.
        config: the dataset configuration, e.g. "wikitext-103-raw-v1".

    Raises:
        ImportError: the optional ``datasets`` package is not installed.
        ValueError: the dataset has no column ``text_field``.
    """
    return (text for text in hf_records(name, split, text_field, config) if text)


def hf_source(source: str) -> tuple[str, str | None]:
    """(name, config) of an ``"hf:<name>[:<config>]"`` corpus."""
    name, _, config = source[len("hf:") :].partition(":")
    return name, config or None


def hf_split(split: str) -> str:
    """A dataset's split name for ``split``: our "val" is "validation", others are kept."""
    return _HF_SPLIT_NAMES.get(split, split)


TOKEN_DTYPES = ("uint16", "uint32")  # of raw .bin token files
TOKEN_FILE_EXTENSIONS = (".bin", ".npy")


def is_token_file(source: str | Path) -> bool:
    """Whether a corpus is a file of token ids (``.bin`` or ``.npy``) rather than text."""
    return str(source).endswith(TOKEN_FILE_EXTENSIONS)


def load_token_file(path: str | Path, dtype: str = "uint16") -> np.ndarray:
    """A file of token ids, memory-mapped (read as batches need it, never loaded whole).

    Args:
        path: a ``.npy`` array (its header gives the dtype) or a raw ``.bin`` of ``dtype``
            ids, as nanoGPT's prepare scripts write them (uint16 for GPT-2's 50257 tokens).
        dtype: "uint16" or "uint32", for ``.bin`` files.
    Returns: [L] the ids.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another extension or dtype, a ``.npy`` that is not a 1-D integer array,
            a ``.bin`` whose size is not a whole number of ids.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.ndim != 1 or tokens.dtype.kind not in "ui":
            raise ValueError(
                f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype} "
                f"of shape {tokens.shape}"
            )
        return tokens
    if path.suffix != ".bin":
        raise ValueError(f"path: expected a .bin or .npy token file, got {path}")
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype: expected one of {TOKEN_DTYPES}, got {dtype!r}")
    size = np.dtype(dtype).itemsize
    if path.stat().st_size % size:
        raise ValueError(
            f"{path}: {path.stat().st_size} bytes is not a whole number of {dtype} ids "
            "(is token_dtype right?)"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _read(files: Iterable[Path]) -> Iterator[str]:
    for f in files:
        yield f.read_text(encoding="utf-8", errors="replace")


def load_corpus(source: str, split: str | None, text_field: str = "text") -> Iterator[str]:
    """The documents of a corpus split, in a deterministic order (consumed once).

    Args:
        source: "stdlib"; a local file or folder (folders: ``DEFAULT_EXTENSIONS`` files); or
            "hf:<name>" / "hf:<name>:<config>" (streamed; our "val" maps to the dataset's
            "validation", other names are the dataset's own splits).
        split: "train", "val", "test", or None (all of a local source; not for "hf:"), or
            for "hf:" any split of the dataset.
        text_field: the column holding the text ("hf:" only).
    Returns: one string per file (local sources, decoded as UTF-8 with replacement) or record.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: a bad split.
    """
    if source == "stdlib":
        _check_split(split)
        return _read(stdlib_corpus(split))
    if source.startswith("hf:"):
        if not isinstance(split, str) or not split:
            raise ValueError(f"split: expected a split name of the dataset, got {split!r}")
        name, config = hf_source(source)
        return hf_text_dataset(name, hf_split(split), text_field, config)
    return _read(text_files(source, split))


class TokenBlocks:
    """A token stream cut into blocks of ``seq_len`` tokens sharing one token with the next.

    ``num_blocks = (len(stream) - 1) // (seq_len - 1)``; the tail that does not fill a block is
    dropped. Batches are dicts of ``input_ids`` [B, T] (int64), ``labels`` [B, T] (= input_ids;
    the model shifts internally) and ``num_bytes`` [B] (int64): the UTF-8 bytes of each block's
    targets, tokens 1..T-1 (eos separators count 0). Bits per byte over an evaluation is
    ``sum(nll over every label position 1..T-1, in nats) / ln 2 / sum(num_bytes)``: the loss of
    the eos targets is included (they mark where a document ends) while they add no bytes.

    Args:
        tokens: [L] the token stream (any integer dtype).
        token_bytes: [V] UTF-8 bytes each token id stands for (`Tokenizer.token_byte_lengths`).
        seq_len: tokens per block, at least 2.

    Raises:
        ValueError: seq_len < 2, or a stream too short for one block.
    """

    def __init__(self, tokens: np.ndarray, token_bytes: Sequence[int], seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len: expected at least 2, got {seq_len}")
        if len(tokens) < seq_len:
            raise ValueError(
                f"tokens: the stream has {len(tokens)} tokens, fewer than seq_len={seq_len}"
            )
        self.tokens = tokens  # [L]
        self.token_bytes = np.asarray(token_bytes, dtype=np.int64)  # [V]
        self.seq_len = seq_len
        self.num_blocks = (len(tokens) - 1) // (seq_len - 1)
        self.sampler = EpochSampler(self.num_blocks)

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[str],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        cache_dir: str | Path | None = None,
    ) -> TokenBlocks:
        """Tokenize documents (each followed by ``tokenizer.eos_id``) into blocks.

        Args:
            documents: e.g. ``load_corpus("stdlib", "train")``.
            tokenizer: a `Tokenizer` (``encode_batch``, ``eos_id``, ``token_byte_lengths``,
                ``fingerprint``, ``vocab_size``).
            seq_len: tokens per block.
            cache_dir: if given, the stream is stored there as ``tokens-<tokenizer
                fingerprint>-<content hash>.npy`` (written atomically) and memory-mapped when
                it already exists.
        """
        documents = list(documents)
        token_bytes = tokenizer.token_byte_lengths()
        if cache_dir is None:
            return cls(cls._tokenize(documents, tokenizer), token_bytes, seq_len)
        content = hashlib.sha256()
        for document in documents:
            data = document.encode("utf-8")
            content.update(len(data).to_bytes(8, "little") + data)
        cache_dir = Path(cache_dir)
        cache_path = cache_dir / f"tokens-{tokenizer.fingerprint()}-{content.hexdigest()[:16]}.npy"
        if not cache_path.is_file():
            stream = cls._tokenize(documents, tokenizer)
            cache_dir.mkdir(parents=True, exist_ok=True)
            partial = cache_path.with_suffix(f".{os.getpid()}.tmp")
            try:
                with open(partial, "wb") as f:
                    np.save(f, stream)
                os.replace(partial, cache_path)
            finally:
                partial.unlink(missing_ok=True)
        return cls(np.load(cache_path, mmap_mode="r"), token_bytes, seq_len)

    @staticmethod
    def _tokenize(documents: list[str], tokenizer: Tokenizer, chunk: int = 64) -> np.ndarray:
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
        eos = np.array([tokenizer.eos_id], dtype=dtype)
        pieces = []
        for start in range(0, len(documents), chunk):
            for ids in tokenizer.encode_batch(documents[start : start + chunk]):
                pieces += [np.asarray(ids, dtype=dtype), eos]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)

    def _gather(self, block_ids: np.ndarray) -> dict[str, torch.Tensor]:
        starts = block_ids * (self.seq_len - 1)  # [B]
        index = starts[:, None] + np.arange(self.seq_len)  # [B, T]
        blocks = np.asarray(self.tokens[index], dtype=np.int64)  # [B, T]
        if blocks.size and blocks.max() >= len(self.token_bytes):
            # a token file of another tokenizer: say so before the embedding fails
            raise ValueError(
                f"tokens: id {blocks.max()} in blocks {block_ids.tolist()} is beyond the "
                f"tokenizer's vocabulary of {len(self.token_bytes)}"
            )
        num_bytes = self.token_bytes[blocks[:, 1:]].sum(axis=1)  # [B]
        input_ids = torch.from_numpy(blocks)
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "num_bytes": torch.from_numpy(num_bytes),
        }

    def batch_at(
        self, step: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """The training batch of ``rank`` at optimizer step ``step``, a pure function of its
        arguments (see `EpochSampler`): resuming at step s replays exactly the batches of an
        uninterrupted run, and the ranks' batches concatenated in rank order are
        ``batch_at(step, world_size * batch_size, seed=seed)``.

        Returns: ``input_ids`` [batch_size, seq_len], ``labels`` [batch_size, seq_len],
            ``num_bytes`` [batch_size].
        """
        indices = self.sampler.indices_at(
            step, batch_size, seed=seed, rank=rank, world_size=world_size
        )
        return self._gather(indices)

    def eval_batches(
        self, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Every block once, in stream order: rank r gets blocks r, r + world_size, ...

        Args:
            batch_size: blocks per batch, >= 1 (the last batch may be smaller).
            rank, world_size: as in `batch_at`; the ranks' blocks are disjoint and cover all.
        Yields: batches as in `batch_at`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank, world_size: expected world_size >= 1 and 0 <= rank < world_size, "
                f"got rank={rank}, world_size={world_size}"
            )
        mine = np.arange(rank, self.num_blocks, world_size)
        for start in range(0, len(mine), batch_size):
            yield self._gather(mine[start : start + batch_size])
