"""Multi-query associative recall (MQAR), following Zoology's ``multiquery_ar``.

Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language
Models" (2023). One example of length T with K key-value pairs, vocabulary V:

    position   0   1   2   3  ...  2K-1 | 2K ...                                   T-1
    input      k1  v1  k2  v2 ...  vK   | filler .. k2 v2 .. filler .. k1 v1 .. filler
    label      -100 everywhere          | -100   .. -100 v2 ..  -100  .. -100 v1 .. -100

* Keys are K distinct tokens of [1, V//2), values K distinct tokens of [V//2, V) (disjoint
  halves; token 0 is never a key or value).
* After the 2K-token context every key is queried once. Query i sits at ``2K + 2*g_i`` where
  the gaps g_i are K distinct slots of [0, (T - 2K) // 2) drawn without replacement with
  probability proportional to ``(g + 1) ** (power_a - 1)`` — Zoology's power law: small
  ``power_a`` puts most queries early, ``power_a = 1`` is uniform. Query order follows draw order,
  as in Zoology.
* The token after a query is its value, in the inputs too (Zoology leaves it to the filler).
* Filler: uniform random tokens of [0, V) (Zoology's ``random_non_queries=True``; a filler can
  repeat a key, and is never labelled), or token 0 with ``random_non_queries=False``.

Labels use the Hugging Face causal-LM convention: ``labels[t] = input_ids[t]`` at the K value
positions that follow a query and -100 elsewhere; the model shifts internally, so a loss
``cross_entropy(logits[:, :-1], labels[:, 1:])`` trains exactly the predictions made at the
query positions. `mqar_accuracy` applies the same shift to unshifted model outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from growmem.tasks._common import IGNORE_INDEX, fold_seed

__all__ = [
    "PAD_ID",
    "MQARConfig",
    "MQARSlice",
    "MQARSplits",
    "generate_mqar",
    "mqar_accuracy",
    "mqar_accuracy_by_slice",
    "mqar_splits",
]

# Right-padding token of mixed-length training sets (never a key or value).
PAD_ID = 0
# Random numbers drawn per chunk of examples when sampling without replacement.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, kw_only=True)
class MQARConfig:
    """One MQAR setting.

    Args:
        vocab_size: V; keys come from [1, V//2) and values from [V//2, V), so V >= 2K + 2.
        seq_len: T >= 4K (the 2K-token context plus room for K query-value pairs).
        num_kv_pairs: K >= 1.
        power_a: exponent of the query-position power law, > 0 (1 = uniform).
        num_examples: N >= 1.
        random_non_queries: random filler tokens (True, as Zoology) or token 0.

    Raises:
        ValueError: a field out of range, naming it.
    """

    vocab_size: int
    seq_len: int
    num_kv_pairs: int
    num_examples: int
    power_a: float = 0.01
    random_non_queries: bool = True

    def __post_init__(self):
        k = self.num_kv_pairs
        if k < 1:
            raise ValueError(f"num_kv_pairs: expected >= 1, got {k}")
        if self.num_examples < 1:
            raise ValueError(f"num_examples: expected >= 1, got {self.num_examples}")
        if self.seq_len < 4 * k:
            raise ValueError(
                f"seq_len: expected >= 4 * num_kv_pairs = {4 * k} (context plus queries), "
                f"got {self.seq_len}"
            )
        if self.vocab_size < 2 * k + 2:
            raise ValueError(
                f"vocab_size: expected >= 2 * num_kv_pairs + 2 = {2 * k + 2} (keys in "
                f"[1, V//2), values in [V//2, V)), got {self.vocab_size}"
            )
        if not (self.power_a > 0 and math.isfinite(self.power_a)):
            raise ValueError(f"power_a: expected a finite number > 0, got {self.power_a}")


def _sample_without_replacement(
    m: int,
    num_rows: int,
    k: int,
    generator: torch.Generator,
    log_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """k distinct indices of [0, m) per row, drawn in turn ∝ exp(log_weights) (None: uniform).

    Gumbel top-k: the k largest of ``log_weights + Gumbel noise``, in decreasing order, are
    distributed as k sequential draws without replacement, in draw order. With uniform weights
    the Gumbel transform is monotone, so the uniform noise itself is ranked.

    Args:
        log_weights: [m] float64, or None.
    Returns: [num_rows, k] int64.
    """
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // m)
    chunks = []
    for start in range(0, num_rows, rows_per_chunk):
        n = min(rows_per_chunk, num_rows - start)
        scores = torch.rand(n, m, generator=generator, dtype=torch.float64)  # [n, m]
        if log_weights is not None:
            scores = log_weights - torch.log(-torch.log(scores))
        chunks.append(scores.topk(k, dim=1).indices)
    return torch.cat(chunks)


def generate_mqar(config: MQARConfig, seed: int) -> dict[str, torch.Tensor]:
    """MQAR examples of one config, a deterministic function of (config, seed).

    Args:
        config: the setting.
        seed: non-negative; drives a private torch.Generator (the global RNG is untouched).
    Returns: ``input_ids`` [N, T] and ``labels`` [N, T], int64; see the module docstring.
    """
    if seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed}")
    generator = torch.Generator().manual_seed(seed)
    n, t, k, v = config.num_examples, config.seq_len, config.num_kv_pairs, config.vocab_size
    half = v // 2
    context = 2 * k
    slots = (t - context) // 2

    keys = _sample_without_replacement(half - 1, n, k, generator) + 1  # [N, K] in [1, V//2)
    values = _sample_without_replacement(v - half, n, k, generator) + half  # [N, K] in [V//2, V)
    log_weights = (config.power_a - 1) * torch.arange(1, slots + 1, dtype=torch.float64).log()
    gaps = _sample_without_replacement(slots, n, k, generator, log_weights)  # [N, K]

    if config.random_non_queries:
        input_ids = torch.randint(0, v, (n, t), generator=generator)  # [N, T]
    else:
        input_ids = torch.zeros(n, t, dtype=torch.long)
    input_ids[:, 0:context:2] = keys
    input_ids[:, 1:context:2] = values
    queries = context + 2 * gaps  # [N, K] positions of the queried keys
    input_ids.scatter_(1, queries, keys)
    input_ids.scatter_(1, queries + 1, values)
    labels = torch.full((n, t), IGNORE_INDEX, dtype=torch.long)  # [N, T]
    labels.scatter_(1, queries + 1, values)
    return {"input_ids": input_ids, "labels": labels}


@dataclass(frozen=True)
class MQARSlice:
    """The test examples of one (seq_len, num_kv_pairs) setting.

    Attributes:
        input_ids, labels: [N, seq_len] int64.
    """

    seq_len: int
    num_kv_pairs: int
    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def key(self) -> tuple[int, int]:
        """(seq_len, num_kv_pairs)."""
        return (self.seq_len, self.num_kv_pairs)


@dataclass(frozen=True)
class MQARSplits:
    """Training set and test slices from `mqar_splits`.

    Attributes:
        train: ``input_ids`` and ``labels`` [N_train, T_max]: the train configs' examples in
            config order (not shuffled), shorter ones right-padded with `PAD_ID` / -100.
        test: one `MQARSlice` per test config, in the given order.
    """

    train: dict[str, torch.Tensor]
    test: list[MQARSlice]


def mqar_splits(
    train: MQARConfig | Sequence[MQARConfig], test: Sequence[MQARConfig], seed: int
) -> MQARSplits:
    """Training and test data from disjoint seed streams.

    Train config j uses seed ``fold_seed(seed, 0, j)``, test config j ``fold_seed(seed, 1, j)``,
    so no two sets share a random stream. Right padding is harmless to a causal model: padded
    positions come after every real token and carry no label.

    Args:
        train: one config or several (their examples are concatenated).
        test: configs with distinct (seq_len, num_kv_pairs).
        seed: non-negative.

    Raises:
        ValueError: no train or test config, or two test configs with the same slice key.
    """
    train = [train] if isinstance(train, MQARConfig) else list(train)
    if not train:
        raise ValueError("train: expected at least one MQARConfig")
    if not test:
        raise ValueError("test: expected at least one MQARConfig")
    keys = [(c.seq_len, c.num_kv_pairs) for c in test]
    if len(set(keys)) != len(keys):
        raise ValueError(f"test: (seq_len, num_kv_pairs) must be distinct, got {keys}")

    parts = [generate_mqar(c, fold_seed(seed, 0, j)) for j, c in enumerate(train)]
    width = max(c.seq_len for c in train)

    def padded(name: str, fill: int) -> torch.Tensor:
        tensors = [p[name] for p in parts]
        return torch.cat(
            [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=fill) for x in tensors]
        )

    slices = []
    for j, c in enumerate(test):
        data = generate_mqar(c, fold_seed(seed, 1, j))
        slices.append(MQARSlice(c.seq_len, c.num_kv_pairs, data["input_ids"], data["labels"]))
    train_set = {"input_ids": padded("input_ids", PAD_ID), "labels": padded("labels", IGNORE_INDEX)}
    return MQARSplits(train=train_set, test=slices)


def _count_correct(outputs: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, labelled) predictions; outputs are unshifted logits [N,T,V] or ids [N,T]."""
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [N, T], got shape {tuple(labels.shape)}")
    if outputs.is_floating_point():
        if outputs.dim() != 3 or outputs.shape[:2] != labels.shape:
            raise ValueError(
                f"outputs: expected logits [N, T, V] with [N, T] = {tuple(labels.shape)}, "
                f"got shape {tuple(outputs.shape)}"
            )
        outputs = outputs.argmax(dim=-1)
    elif outputs.shape != labels.shape:
        raise ValueError(
            f"outputs: expected predicted ids of shape {tuple(labels.shape)}, "
            f"got {tuple(outputs.shape)}"
        )
    predictions, targets = outputs[:, :-1], labels[:, 1:]  # prediction at t is for token t + 1
    mask = targets != IGNORE_INDEX
    return int((predictions[mask] == targets[mask]).sum()), int(mask.sum())


def mqar_accuracy(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled tokens predicted correctly.

    ``outputs`` are what a causal LM returns for ``input_ids``, aligned with the inputs and NOT
    shifted: position t holds the prediction of token t + 1. The function compares
    ``argmax(outputs[:, t])`` with ``labels[:, t + 1]`` wherever that label is not -100.

    Args:
        outputs: logits [N, T, V] (floating point) or predicted ids [N, T] (integer).
        labels: [N, T] as produced by `generate_mqar`.

    Raises:
        ValueError: mismatched shapes, or no labelled position.
    """
    correct, total = _count_correct(outputs, labels)
    if total == 0:
        raise ValueError("labels: no position is labelled (all are -100)")
    return correct / total


def mqar_accuracy_by_slice(
    predict: Callable[[torch.Tensor], torch.Tensor],
    slices: Sequence[MQARSlice],
    batch_size: int = 256,
) -> dict[tuple[int, int], float]:
    """Token accuracy of each test slice, under ``torch.no_grad``.

    Args:
        predict: maps input_ids [B, T] to unshifted logits [B, T, V] or ids [B, T], e.g.
            ``lambda x: model(input_ids=x).logits``.
        slices: from `mqar_splits(...).test`.
        batch_size: examples per call of ``predict``.
    Returns: {(seq_len, num_kv_pairs): accuracy over all labelled tokens of the slice}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    results = {}
    with torch.no_grad():
        for s in slices:
            correct = total = 0
            for start in range(0, s.input_ids.shape[0], batch_size):
                outputs = predict(s.input_ids[start : start + batch_size])
                c, n = _count_correct(outputs, s.labels[start : start + batch_size])
                correct, total = correct + c, total + n
            results[s.key] = correct / total
    return results
