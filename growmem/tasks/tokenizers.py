"""Tokenizers that work offline: raw UTF-8 bytes, and a byte-level BPE trained locally.

Both share one interface (the `Tokenizer` protocol): ``encode(text) -> list[int]`` never adds
special tokens (callers add bos/eos by id, and special-token strings inside the text are encoded
as ordinary text), ``decode(ids) -> str`` drops special tokens, ``vocab_size``, ``pad_id``,
``bos_id``, ``eos_id``, ``token_byte_lengths()`` (UTF-8 bytes each id stands for, 0 for special
tokens; used for bits per byte), ``save(directory)`` and ``fingerprint()``, a short stable string
that changes whenever the id <-> text mapping changes, so a checkpoint can refuse a mismatched
tokenizer. `load_tokenizer` reads what ``save`` wrote, or returns the byte tokenizer for "byte".

``save`` writes a standard Hugging Face tokenizer (``tokenizer.json`` + ``tokenizer_config.json``,
loadable by ``AutoTokenizer.from_pretrained(directory)``; ``to_transformers()`` builds it in
memory) with the same ids, the same special tokens, and special-token strings inside a text
encoded as text (``split_special_tokens``), beside ``growmem_tokenizer.json`` (kind and roles).
`find_tokenizer` finds the tokenizer of a model folder: its own files, or the ``tokenizer/``
subfolder of folders written before growmem saved Hugging Face tokenizers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "find_tokenizer",
    "load_tokenizer",
]

GROWMEM_FILE = "growmem_tokenizer.json"
HF_FILE = "tokenizer.json"
OLD_SUBFOLDER = "tokenizer"  # where model folders kept the tokenizer before HF files


class Tokenizer(Protocol):
    """What the tasks need from a tokenizer (both tokenizers of this module satisfy it)."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_byte_lengths(self) -> list[int]: ...

    def fingerprint(self) -> str: ...

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path: ...

    def to_transformers(self, model_max_length: int | None = None): ...


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte b -> the printable character that stands for it in a
    byte-level vocabulary (``tokenizers``' ByteLevel pre-tokenizer and decoder use the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {
        **{b: chr(b) for b in printable},
        **{b: chr(256 + n) for n, b in enumerate(others)},
    }


def _byte_level(tokenizer: HFTokenizer) -> HFTokenizer:
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _transformers_tokenizer(
    tokenizer: HFTokenizer, special_tokens: dict[str, str], model_max_length: int | None
):
    """A ``PreTrainedTokenizerFast`` over ``tokenizer`` with growmem's conventions: no special
    token is added to an encoding (growmem's language models are trained without bos; callers
    add special tokens by id), special-token strings inside a text are text, and decoding
    leaves spaces as they are."""
    from transformers import PreTrainedTokenizerFast

    options = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tokenizer.to_str()),  # transformers changes it
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        **special_tokens,
        **options,
    )


def _save_transformers(
    tokenizer: HFTokenizer,
    special_tokens: dict[str, str],
    model_max_length: int | None,
    directory: Path,
) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` of `_transformers_tokenizer`.

    ``tokenizer.json`` is ``tokenizer`` as it is (transformers 5 adds a post-processor that
    adds nothing, which would change a BPE's fingerprint), and the config names the class
    ``PreTrainedTokenizerFast``, which every transformers release knows (transformers 5 writes
    its new name, TokenizersBackend).
    """
    transformers_tokenizer = _transformers_tokenizer(tokenizer, special_tokens, model_max_length)
    transformers_tokenizer.save_pretrained(str(directory))
    tokenizer.save(str(directory / HF_FILE))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are the bytes, then pad=256, bos=257, eos=258.

    Decoding drops the special ids and decodes the bytes with ``errors="replace"``, so any id
    sequence decodes (a cut multi-byte character becomes U+FFFD).
    """

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259
    # the names of pad, bos, eos in the Hugging Face tokenizer (ids 256, 257, 258)
    special_tokens: ClassVar[dict[str, str]] = {
        "pad_token": "<pad>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
    }

    def encode(self, text: str) -> list[int]:
        """Args: text: any string. Returns its UTF-8 bytes as ints in [0, 256)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` applied to each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Args: ids: token ids in [0, vocab_size). Returns the text; special ids are dropped.

        Raises:
            ValueError: an id outside [0, vocab_size).
        """
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: expected token ids in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes per id: 1 for the 256 byte tokens, 0 for the special tokens."""
        return [1] * 256 + [0] * (self.vocab_size - 256)

    def fingerprint(self) -> str:
        """``"byte-259"``: the byte tokenizer has no learned state."""
        return f"byte-{self.vocab_size}"

    def to_transformers(self, model_max_length: int | None = None):
        """The Hugging Face tokenizer (``PreTrainedTokenizerFast``) with this tokenizer's ids:
        a byte-level BPE without merges whose vocabulary maps each byte's symbol to the byte
        (so every id is the byte), and ``<pad>``, ``<bos>``, ``<eos>`` at 256, 257, 258.

        Args:
            model_max_length: the longest sequence the model accepts (None: unset).
        """
        return _transformers_tokenizer(self._hf_tokenizer(), self.special_tokens, model_max_length)

    def _hf_tokenizer(self) -> HFTokenizer:
        vocab = {symbol: byte for byte, symbol in _bytes_to_unicode().items()}
        tokenizer = _byte_level(HFTokenizer(models.BPE(vocab=vocab, merges=[])))
        # no regex split: pre-tokenization only maps bytes to their symbols
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        roles = ("pad_token", "bos_token", "eos_token")  # ids 256, 257, 258 in this order
        tokenizer.add_special_tokens(
            [AddedToken(self.special_tokens[r], special=True, normalized=False) for r in roles]
        )
        return tokenizer

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write the Hugging Face tokenizer (`to_transformers`) and ``growmem_tokenizer.json``
        (kind and special ids) into ``directory``.

        Args:
            directory: created if missing.
            model_max_length: recorded in ``tokenizer_config.json`` (None: unset).
        Returns: the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_transformers(self._hf_tokenizer(), self.special_tokens, model_max_length, directory)
        description = {
            "kind": "byte",
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
        }
        (directory / GROWMEM_FILE).write_text(json.dumps(description, indent=2) + "\n")
        return directory


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization, no prefix space) backed by HF `tokenizers`.

    Build one with `BPETokenizer.train` or `load_tokenizer`. Every string encodes (the 256 byte
    symbols are always in the vocabulary) and decodes back exactly.

    Args:
        tokenizer: a byte-level BPE `tokenizers.Tokenizer`.
        pad_token, bos_token, eos_token: special-token strings present in its vocabulary.

    Raises:
        ValueError: a special token is missing from the vocabulary.
    """

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        pad_token: str = "<pad>",
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
    ):
        self._tokenizer = tokenizer
        # Special-token strings inside a text are encoded as text; specials are added by id.
        self._tokenizer.encode_special_tokens = True
        self.special_tokens = {
            "pad_token": pad_token,
            "bos_token": bos_token,
            "eos_token": eos_token,
        }
        ids = {}
        for role, token in self.special_tokens.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{role}: {token!r} is not in the tokenizer's vocabulary")
            ids[role] = token_id
        self.pad_id, self.bos_id, self.eos_id = ids["pad_token"], ids["bos_token"], ids["eos_token"]
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = ("<pad>", "<bos>", "<eos>"),
        *,
        min_frequency: int = 2,
        split_digits: bool = False,
    ) -> BPETokenizer:
        """Train a byte-level BPE on ``texts``.

        Args:
            texts: training documents (any iterable; consumed once).
            vocab_size: target size including the 256 byte symbols and the special tokens; the
                result is smaller when the texts allow fewer merges.
            special_tokens: at least three strings; the first three are pad, bos and eos (ids 0,
                1, 2), any further ones get the next ids.
            min_frequency: a pair must occur this often to be merged.
            split_digits: every digit is its own token (as in LLaMA's tokenizer), so a number
                is read and written digit by digit and no merge depends on which digits a
                random number happened to repeat.

        Raises:
            ValueError: vocab_size too small, or fewer than three distinct special tokens.
        """
        special_tokens = list(special_tokens)
        if len(special_tokens) < 3 or len(set(special_tokens)) != len(special_tokens):
            raise ValueError(
                "special_tokens: expected at least three distinct strings (pad, bos, eos, ...), "
                f"got {special_tokens}"
            )
        if vocab_size < 256 + len(special_tokens):
            raise ValueError(
                f"vocab_size: expected at least 256 + {len(special_tokens)} special tokens, "
                f"got {vocab_size}"
            )
        tokenizer = _byte_level(HFTokenizer(models.BPE()))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if split_digits
            else byte_level
        )
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        pad, bos, eos = special_tokens[:3]
        return cls(tokenizer, pad_token=pad, bos_token=bos, eos_token=eos)

    def encode(self, text: str) -> list[int]:
        """Args: text: any string. Returns token ids (no special tokens added)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text, in parallel in the Rust library."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Args: ids: token ids in [0, vocab_size). Returns the text; special tokens are dropped.

        Raises:
            ValueError: an id outside [0, vocab_size).
        """
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: expected token ids in [0, {self.vocab_size}), got {bad[:5]}")
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes per id: a byte-level token's string has one symbol per byte; specials 0."""
        special = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
        lengths = [0] * self.vocab_size
        for token, token_id in self._tokenizer.get_vocab(with_added_tokens=True).items():
            lengths[token_id] = 0 if token in special else len(token)
        return lengths

    def fingerprint(self) -> str:
        """``"bpe-<vocab_size>-<hash>"``, the hash over the serialized tokenizer and the roles."""
        roles = json.dumps(self.special_tokens, sort_keys=True)
        return f"bpe-{self.vocab_size}-{_digest(self._tokenizer.to_str() + roles)}"

    def to_transformers(self, model_max_length: int | None = None):
        """The Hugging Face tokenizer (``PreTrainedTokenizerFast``) over this BPE, with its
        special tokens in their roles.

        Args:
            model_max_length: the longest sequence the model accepts (None: unset).
        """
        return _transformers_tokenizer(self._tokenizer, self.special_tokens, model_max_length)

    def save(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write the Hugging Face tokenizer (`to_transformers`: ``tokenizer.json``,
        ``tokenizer_config.json``) and ``growmem_tokenizer.json`` (special roles).

        Args:
            directory: created if missing.
            model_max_length: recorded in ``tokenizer_config.json`` (None: unset).
        Returns: the directory.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _save_transformers(self._tokenizer, self.special_tokens, model_max_length, directory)
        description = {"kind": "bpe", "vocab_size": self.vocab_size, **self.special_tokens}
        (directory / GROWMEM_FILE).write_text(json.dumps(description, indent=2) + "\n")
        return directory


def find_tokenizer(model_folder: str | Path) -> Path | None:
    """The folder holding a model folder's growmem tokenizer: the model folder itself, or its
    ``tokenizer/`` subfolder (folders written before growmem saved Hugging Face tokenizers);
    None when it has neither (an MQAR model works on ids)."""
    folder, old = Path(model_folder), Path(model_folder) / OLD_SUBFOLDER
    if (folder / GROWMEM_FILE).is_file():
        return folder
    # (a tokenizer.json alone is a BPE to load_tokenizer; in the model folder itself it could
    # be anyone's, so only the old subfolder is taken on its word)
    if (old / GROWMEM_FILE).is_file() or (old / HF_FILE).is_file():
        return old
    return None


def load_tokenizer(directory_or_name: str | Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer named ``"byte"``, or the one saved in a directory.

    A directory holds ``growmem_tokenizer.json`` (written by ``save``) or only a byte-level BPE
    ``tokenizer.json`` with the special tokens ``<pad>``, ``<bos>``, ``<eos>``.

    Raises:
        FileNotFoundError: the directory, or both files, are missing.
        ValueError: an unknown kind in ``growmem_tokenizer.json``.
    """
    if str(directory_or_name) == "byte":
        return ByteTokenizer()
    directory = Path(directory_or_name)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"directory_or_name: {str(directory)!r} is neither 'byte' nor a tokenizer directory"
        )
    description_path, hf_path = directory / GROWMEM_FILE, directory / HF_FILE
    if description_path.is_file():
        description = json.loads(description_path.read_text())
    elif hf_path.is_file():
        description = {"kind": "bpe"}
    else:
        raise FileNotFoundError(f"directory_or_name: no {GROWMEM_FILE} or {HF_FILE} in {directory}")
    kind = description.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if not hf_path.is_file():
            raise FileNotFoundError(f"directory_or_name: {hf_path} is missing")
        roles = {
            role: description[role]
            for role in ("pad_token", "bos_token", "eos_token")
            if role in description
        }
        return BPETokenizer(HFTokenizer.from_file(str(hf_path)), **roles)
    raise ValueError(f"{description_path}: unknown tokenizer kind {kind!r}")
