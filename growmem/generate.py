"""Text from a trained model: ``growmem generate RUN_OR_MODEL --prompt "..."``.

`load_for_generation` reads a run folder (its ``model/``, else its latest checkpoint), a model
folder or a checkpoint folder; `generate_text` continues a prompt, streaming the new text as
it is produced (`TextStream`: complete characters only), and measures the speed and the
cache's bytes.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from growmem.models import CACHE_FIELD, GrowMemCache, GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import Tokenizer
from growmem.training.checkpoint import (
    CONFIG_FILE,
    latest_checkpoint,
    load_folder_tokenizer,
    load_weights,
    verify_checksums,
)

__all__ = [
    "Generation",
    "TextStream",
    "check_sampling",
    "generate_text",
    "load_for_generation",
    "model_folder",
    "read_prompt",
]

REPLACEMENT = "\ufffd"  # what decoding makes of a cut multi-byte character


def model_folder(path: str | Path) -> Path:
    """The model folder ``path`` stands for: ``path`` itself when it holds a model
    (``config.json``: a model or checkpoint folder), else the run folder's ``model/``, else
    the run's latest checkpoint (a run still training).

    Raises:
        FileNotFoundError: ``path`` is none of these.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"RUN_OR_MODEL: {path} is not a folder")
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "model" / CONFIG_FILE).is_file():
        return path / "model"
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(
            f"RUN_OR_MODEL: {path} is neither a model folder ({CONFIG_FILE}) nor a run folder "
            "with a model/ folder or a checkpoint"
        )
    return checkpoint


def load_for_generation(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[GrowMemForCausalLM, Tokenizer]:
    """The model of `model_folder` (``path``) in eval mode on ``device``, and its tokenizer.

    Raises:
        FileNotFoundError: no model, or no tokenizer (an MQAR model works on ids, not text).
        ValueError, ChecksumError: damaged files, or a tokenizer that is not the model's.
    """
    folder = model_folder(path)
    verify_checksums(folder, [CONFIG_FILE])
    config = GrowMemConfig.from_pretrained(folder)
    model = GrowMemForCausalLM(config)
    load_weights(folder, model)
    tokenizer = load_folder_tokenizer(folder, config.vocab_size, "generate")
    return model.to(device).eval(), tokenizer


class TextStream(BaseStreamer):
    """A streamer for ``generate``: writes the text of the generated tokens to ``out`` as they
    come, holding back a trailing cut multi-byte character (a byte tokenizer produces one byte
    at a time) until it is complete. Special tokens are not written. What it writes in all
    equals ``tokenizer.decode`` of the generated tokens.

    Args:
        tokenizer: the model's growmem tokenizer.
        out: where to write (flushed after every piece).
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = ""
        self.prompt_seen = False
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        """``generate`` passes the prompt [1, T] first, then each new token ([1] or [1, 1])."""
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if value.numel() != 1:
            raise ValueError(f"TextStream streams one sequence, got tokens {tuple(value.shape)}")
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.ids.append(int(value.reshape(-1)[0]))
        self._write(self.tokenizer.decode(self.ids).rstrip(REPLACEMENT))

    def end(self) -> None:
        """Write the rest (a character still cut at the end is written as U+FFFD)."""
        self._write(self.tokenizer.decode(self.ids))

    def _write(self, text: str) -> None:
        # the decoded text only grows at its end (decoding is per token, UTF-8 resynchronises)
        if len(text) > len(self.written) and text.startswith(self.written):
            self.out.write(text[len(self.written) :])
            self.out.flush()
            self.written = text


@dataclass
class Generation:
    """What `generate_text` produced.

    Attributes:
        text: the new text (special tokens dropped).
        prompt_tokens: tokens the model read before generating (eos, then the prompt's).
        new_tokens: tokens generated (an eos that ended the text included).
        seconds: wall time of the whole generation (prefill included).
        decode_seconds: wall time after the first new token (None with one token or none).
        cache_bytes: the cache's bytes at the end by part (`GrowMemCache.nbytes_by_part`).
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    decode_seconds: float | None
    cache_bytes: dict[str, int]

    def stats(self) -> str:
        """Speed and cache size in two lines."""
        speed = f"{self.new_tokens / self.seconds:,.1f} tokens/s overall"
        if self.decode_seconds and self.new_tokens > 1:
            speed += f", {(self.new_tokens - 1) / self.decode_seconds:,.1f} after the first token"
        parts = self.cache_bytes
        return (
            f"prompt {self.prompt_tokens} tokens, {self.new_tokens} new tokens in "
            f"{self.seconds:.2f} s ({speed})\n"
            f"cache {sum(parts.values()):,} bytes: cached segments {parts['cached_segments']:,}, "
            f"online state {parts['online']:,}, attention keys/values {parts['attention']:,}"
        )


def check_sampling(temperature: float, top_k: int, top_p: float) -> dict:
    """``generate``'s sampling options; temperature 0 is greedy decoding.

    Raises:
        ValueError: an option out of range (named as ``growmem generate`` names it).
    """
    if not temperature >= 0:  # (NaN too)
        raise ValueError(f"--temperature: expected a number >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"--top-k: expected an integer >= 0 (0: no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p: expected a number in (0, 1], got {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}


@torch.no_grad()
def generate_text(
    model: GrowMemForCausalLM,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    out: TextIO | None = None,
) -> Generation:
    """Continue ``prompt`` as the start of a document (after eos, as the model was trained)
    until eos or ``max_new_tokens``.

    Args:
        model: a growmem language model (eval mode).
        tokenizer: its tokenizer.
        prompt: any text ("" generates a document from scratch).
        max_new_tokens: at most this many new tokens (>= 1).
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the k likeliest tokens (0: all).
        top_p: sample among the likeliest tokens whose probabilities sum to top_p (1: all).
        seed: seed of the sampling (None: torch's current random state).
        out: where to stream the new text (None: nowhere).

    Raises:
        ValueError: a bad option (named), or a prompt + max_new_tokens beyond the model's
            max_position_embeddings.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"--max-new-tokens: expected an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected an integer >= 1, got {max_new_tokens}")
    options = check_sampling(temperature, top_k, top_p)
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(
            f"the prompt ({len(ids)} tokens) and --max-new-tokens={max_new_tokens} exceed the "
            f"model's max_position_embeddings={limit}"
        )
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)  # [1, T]
    cache = GrowMemCache(model.config.num_hidden_layers)
    stream = TextStream(tokenizer, out if out is not None else io.StringIO())
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        **options,
    )
    start = time.perf_counter()
    sequences = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        streamer=stream,
        **{CACHE_FIELD: cache},
    )
    seconds = time.perf_counter() - start
    new = sequences[0, len(ids) :].tolist()
    first = stream.first_token_time
    return Generation(
        text=tokenizer.decode(new),
        prompt_tokens=len(ids),
        new_tokens=len(new),
        seconds=seconds,
        decode_seconds=None if first is None else start + seconds - first,
        cache_bytes=cache.nbytes_by_part(),
    )


def read_prompt(prompt: str | None, prompt_file: str | None, stdin: TextIO | None = None) -> str:
    """The prompt ``growmem generate`` was given: ``--prompt TEXT``, ``--prompt -`` (standard
    input), ``--prompt-file PATH``, or, with neither, standard input when it is piped ("" when
    it is a terminal: a document from scratch).

    Raises:
        FileNotFoundError: ``--prompt-file`` names no file.
        ValueError: the file is not UTF-8 text.
    """
    stdin = sys.stdin if stdin is None else stdin
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--prompt-file: {path} is not a file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"--prompt-file: {path} is not UTF-8 text ({error})") from None
    if prompt == "-" or (prompt is None and not stdin.isatty()):
        return stdin.read()
    return prompt or ""
