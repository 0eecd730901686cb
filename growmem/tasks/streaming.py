"""A corpus read as a stream: documents tokenized in worker processes and cut into training
blocks in order, with a cursor that resumes exactly at the token where a run stopped.

For corpora too large to tokenize up front (``hf:`` datasets, streamed by ``datasets``).
Blocks are those of `TokenBlocks` taken in stream order: block i is
``stream[i*(T-1) : i*(T-1) + T]`` of the documents joined with eos after each; at the end of
the split the stream goes on with the split from its start (the next epoch). The order of
the documents is the dataset's (shuffle it beforehand if it is sorted).

Tokenization runs in a ``multiprocessing`` pool of ``num_workers`` spawned processes, a
window of documents at a time, the next window being encoded while the current one is
consumed; ``num_workers=0`` encodes in the calling process. A pool rather than a torch
``DataLoader`` over an ``IterableDataset``: ``datasets`` splits a stream it sees inside a
DataLoader worker by file shards, so the documents' order would depend on the number of
workers and shards; here the main process reads the records in order (cheap) and only the
encoding, the costly part, is spread, so every ``num_workers`` gives the same blocks.

Under torchrun every process reads the whole stream and takes its share of each global
batch, as `TokenBlocks.batch_at` does: the blocks of a step do not depend on the number of
processes, and one cursor (``state_dict``) serves them all.
"""

from __future__ import annotations

import multiprocessing
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from growmem.tasks.tokenizers import Tokenizer

# A function giving the documents of the split from one record on: records(start) yields the
# text of records start, start + 1, ... (an empty text for a record without any).
Records = Callable[[int], Iterator[str]]

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    return _worker_tokenizer.encode_batch(texts)


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype a stream of ``vocab_size`` token ids is kept in."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


class DocumentTokens:
    """``(record index, tokens + eos)`` of each record of a split from record ``start`` on
    (empty records give no tokens, not even an eos), encoded in worker processes.

    Args:
        records: the split's texts from a record on (`Records`).
        tokenizer: a `Tokenizer` (picklable when ``num_workers`` > 0).
        num_workers: encoding processes (0: in this process).
        chunk: documents per encoding task.
    """

    def __init__(
        self, records: Records, tokenizer: Tokenizer, num_workers: int = 0, chunk: int = 64
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers: expected an integer >= 0, got {num_workers}")
        self.records, self.tokenizer, self.chunk = records, tokenizer, chunk
        self.num_workers = num_workers
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._pool = None

    def _encoder(self):
        """The pool's ``map_async`` (spawned once, terminated with this object)."""
        if self._pool is None:
            context = multiprocessing.get_context("spawn")  # no fork of a threaded trainer
            self._pool = context.Pool(
                self.num_workers, initializer=_init_worker, initargs=(self.tokenizer,)
            )
            weakref.finalize(self, self._pool.terminate)
        return self._pool.map_async

    def _windows(self, start: int) -> Iterator[tuple[int, list[str]]]:
        """(index of the first record, texts) of consecutive windows of records."""
        window_size = self.chunk * max(1, 2 * self.num_workers)
        index, window = start, []
        for text in self.records(start):
            window.append(text)
            if len(window) == window_size:
                yield index, window
                index, window = index + len(window), []
        if window:
            yield index, window

    def __call__(self, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Args: start: the first record. Yields (record index, [n] tokens ending with eos)."""
        if self.num_workers == 0:
            encoded = (
                (first, self.tokenizer.encode_batch(texts)) for first, texts in self._windows(start)
            )
        else:
            encoded = self._encoded_in_pool(start)
        eos = self.tokenizer.eos_id
        for first, ids_list in encoded:
            for offset, ids in enumerate(ids_list):
                if ids:
                    yield first + offset, np.asarray([*ids, eos], dtype=self.dtype)

    def _encoded_in_pool(self, start: int) -> Iterator[tuple[int, list[list[int]]]]:
        """Windows encoded by the pool, the next one while the current one is consumed."""
        encode = self._encoder()
        pending: deque = deque()
        for first, texts in self._windows(start):
            chunks = [texts[i : i + self.chunk] for i in range(0, len(texts), self.chunk)]
            pending.append((first, encode(_encode_in_worker, chunks)))
            if len(pending) == 2:
                yield self._joined(*pending.popleft())
        while pending:
            yield self._joined(*pending.popleft())

    @staticmethod
    def _joined(first: int, result) -> tuple[int, list[list[int]]]:
        return first, [ids for chunk in result.get() for ids in chunk]


class StreamedBlocks:
    """Training blocks of a streamed corpus, in order, with the batch contract of
    `TokenBlocks.batch_at` for consecutive steps and an exact resume cursor.

    Args:
        documents: the split's tokenized records (`DocumentTokens`).
        token_bytes: [V] UTF-8 bytes each token id stands for (`Tokenizer.token_byte_lengths`).
        seq_len: tokens per block, at least 2.
    """

    def __init__(self, documents: DocumentTokens, token_bytes: Sequence[int], seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len: expected at least 2, got {seq_len}")
        self.documents = documents
        self.token_bytes = np.asarray(token_bytes, dtype=np.int64)  # [V]
        self.seq_len = seq_len
        self.load_state_dict({"step": 0, "epoch": 0, "record": 0, "offset": 0})

    def state_dict(self) -> dict[str, int]:
        """Where the next block starts: token ``offset`` of record ``record``'s tokens in epoch
        ``epoch``, before optimizer step ``step``."""
        if self._buffer:
            epoch, record, _ = self._buffer[0]
        else:
            epoch, record = self._next_record
        offset = self._offset if self._buffer else self._skip
        return {"step": self._step, "epoch": epoch, "record": record, "offset": offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a `state_dict` (a resumed run's checkpoint)."""
        keys = {"step", "epoch", "record", "offset"}
        if set(state) != keys or not all(isinstance(state[k], int) for k in keys):
            raise ValueError(f"state: expected integers {sorted(keys)}, got {state!r}")
        self._step = state["step"]
        self._next_record = (state["epoch"], state["record"])  # the next record to read
        self._buffer: deque[tuple[int, int, np.ndarray]] = deque()  # (epoch, record, tokens)
        self._buffered = 0  # tokens in the buffer
        self._offset = 0  # tokens of the first buffered record already behind the cursor
        self._skip = state["offset"]  # tokens of the next record before the cursor
        self._source = self._records(state["epoch"], state["record"])

    def _records(self, epoch: int, record: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, record, tokens) from a position on, the split repeated epoch after epoch."""
        while True:
            empty = True
            for index, tokens in self.documents(record):
                empty = False
                yield epoch, index, tokens
            if empty and record == 0:
                raise ValueError(f"the streamed corpus has no tokens (epoch {epoch})")
            epoch, record = epoch + 1, 0

    def _fill(self, needed: int) -> None:
        """Read records until the buffer holds ``needed`` tokens past the cursor."""
        while self._buffered - self._offset < needed:
            epoch, record, tokens = next(self._source)
            if not self._buffer:
                self._offset, self._skip = self._skip, 0
            self._buffer.append((epoch, record, tokens))
            self._buffered += len(tokens)
            self._next_record = (epoch, record + 1)

    def _next_block(self) -> np.ndarray:
        """[T] the next block; the cursor moves T - 1 tokens (blocks share one token)."""
        self._fill(self.seq_len)
        pieces, need, offset = [], self.seq_len, self._offset
        for *_, tokens in self._buffer:
            piece = tokens[offset : offset + need]
            pieces.append(piece)
            need, offset = need - len(piece), 0
            if need == 0:
                break
        self._offset += self.seq_len - 1
        while self._buffer and self._offset >= len(self._buffer[0][2]):
            size = len(self._buffer.popleft()[2])
            self._offset -= size
            self._buffered -= size
        return np.concatenate(pieces)

    def batch_at(
        self, step: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """``rank``'s share of the next ``world_size * batch_size`` blocks (as in
        `TokenBlocks.batch_at`; ``seed`` is unused: the order is the stream's).

        Raises:
            ValueError: ``step`` is not the next step of the stream (a resumed run restores
                the cursor with `load_state_dict` first).
        """
        if step != self._step:
            raise ValueError(
                f"step: a streamed corpus is read in order, the next step is {self._step}, "
                f"got {step} (restore the checkpoint's cursor with load_state_dict)"
            )
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank, world_size: expected world_size >= 1 and 0 <= rank < world_size, "
                f"got rank={rank}, world_size={world_size}"
            )
        blocks = np.stack([self._next_block() for _ in range(world_size * batch_size)])
        blocks = blocks[rank * batch_size : (rank + 1) * batch_size].astype(np.int64)  # [B, T]
        self._step += 1
        input_ids = torch.from_numpy(blocks)
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            "num_bytes": torch.from_numpy(self.token_bytes[blocks[:, 1:]].sum(axis=1)),
        }

    def leading_tokens(self, num_blocks: int) -> np.ndarray:
        """The first ``num_blocks * (T - 1) + 1`` tokens of the stream (all of one epoch when
        ``num_blocks`` is 0): what a `TokenBlocks` of an evaluation split is made of."""
        pieces, total, wanted = [], 0, num_blocks * (self.seq_len - 1) + 1
        for _, tokens in self.documents(0):
            pieces.append(tokens)
            total += len(tokens)
            if num_blocks and total >= wanted:
                break
        stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.documents.dtype)
        return stream[:wanted] if num_blocks else stream
