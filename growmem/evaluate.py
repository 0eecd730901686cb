"""Evaluation of growmem language models on the tasks: MQAR recall, S-NIAH retrieval, language
modelling (loss, perplexity, bits per byte, perplexity by position), with plots.

The evaluations run where the model is: every input goes to the model's device and bf16
autocast is that device's; the scores are gathered on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from growmem.models import GrowMemForCausalLM
from growmem.tasks import (
    MQARSlice,
    NIAHExample,
    TokenBlocks,
    Tokenizer,
    fold_seed,
    mqar_accuracy_by_slice,
    niah_dataset,
    score_exact_match,
)

# The generator seed of held-out evaluation examples (``growmem eval --data-seed``): no
# training uses it (training seeds are small numbers), so every model and seed is scored on the
# same examples, drawn from streams no training drew from.
HELD_OUT_SEED = 100_000


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``: its ``device`` (Hugging Face models), else its parameters'
    (the CPU for a model without any)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def evaluate_mqar(
    model: GrowMemForCausalLM, slices: Sequence[MQARSlice], batch_size: int = 64, bf16=False
) -> dict[str, Any]:
    """Token accuracy of the value predictions on each test slice.

    Returns:
        {"accuracy": over all slices' labelled tokens, "slices": [{"seq_len",
        "num_kv_pairs", "accuracy"}]}.
    """
    model.eval()
    device = model_device(model)

    def predict(ids: torch.Tensor) -> torch.Tensor:
        with _autocast(device, bf16):
            return model(input_ids=ids.to(device), use_cache=False).logits.argmax(-1).cpu()

    accuracy = mqar_accuracy_by_slice(predict, slices, batch_size=batch_size)
    rows = [
        {"seq_len": s.seq_len, "num_kv_pairs": s.num_kv_pairs, "accuracy": accuracy[s.key]}
        for s in slices
    ]
    weights = [s.input_ids.shape[0] * s.num_kv_pairs for s in slices]  # labelled tokens
    overall = sum(w * r["accuracy"] for w, r in zip(weights, rows, strict=True)) / sum(weights)
    return {"accuracy": overall, "slices": rows}


def _pair_segments(slice_: MQARSlice, segment_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every labelled value of an MQAR slice: the position of its query (where the value
    is predicted) and the segment that wrote its pair (the segment of the pair's value token in
    the context; pairs sit at 2j, 2j+1 so an even segment length never splits one).

    Returns: query positions [M] and pair segments [M] (both flattened over examples), and
    the example of each [M].
    """
    ids, labels = slice_.input_ids, slice_.labels  # [N, T]
    K = slice_.num_kv_pairs
    example, value_pos = (labels != -100).nonzero(as_tuple=True)  # [M]
    query_pos = value_pos - 1
    keys = ids[example, query_pos]  # [M]
    context_keys = ids[example, 0 : 2 * K : 2]  # [M, K]
    j = (context_keys == keys[:, None]).int().argmax(1)  # [M] the pair's index
    return query_pos, (2 * j + 1) // segment_size, example


def _routed_segment_size(model: GrowMemForCausalLM) -> int | None:
    """The constant segment length of a model whose gates weigh segments' caches (grm, ssc,
    soup); None for a model without gates, with explicit segments or logarithmic buckets."""
    memory = model.config.memory
    if memory is None or not memory.caching.spec.gated or memory.caching.segments is not None:
        return None
    if memory.caching.spec.select == "log_buckets":
        return None
    return memory.caching.segment_size


def _gate_routing(
    model: GrowMemForCausalLM, segment_size: int, calls: Iterable[tuple[torch.Tensor, ...]]
) -> dict[str, Any]:
    """Gate statistics (`_gate_stats`) summed over forward calls and averaged per layer.

    Args:
        calls: (input ids [B, T], then for each query: its example within the batch [M], its
            position [M] and the segment that wrote what it must recall [M]).
    """
    from growmem.ops.caching.gates import record_gates

    model.eval()
    device = model_device(model)
    sums: dict[int, dict[str, float]] = {}
    for ids, example, query_pos, source_seg in calls:
        with record_gates() as records:
            model(input_ids=ids.to(device), use_cache=False)
        for layer, record in enumerate(records):
            stats = _gate_stats(record, segment_size, example, query_pos, source_seg)
            total = sums.setdefault(layer, {})
            for name, value in stats.items():
                total[name] = total.get(name, 0.0) + value
    layers = []
    for layer in sorted(sums):
        total = sums[layer]
        layers.append(
            {
                "entropy": total["entropy"] / total["tokens"],
                "online_weight": total["online_weight"] / total["tokens"],
                "right_weight": total["right_weight"] / max(total["queries"], 1),
                "right_top": total["right_top"] / max(total["queries"], 1),
                "chance": total["chance"] / max(total["queries"], 1),
            }
        )
    return {"layers": layers}


@torch.no_grad()
def mqar_gate_routing(
    model: GrowMemForCausalLM, slices: Sequence[MQARSlice], batch_size: int = 64
) -> dict[str, Any] | None:
    """How the gates of a gated Memory Caching model (grm, ssc, soup) route on MQAR.

    Per gated layer, over the tokens that see at least one cache:
    - ``entropy``: the gate weights' entropy divided by log(number of memories the token
      weighs), 1 = uniform, 0 = one memory;
    - ``online_weight``: the mean weight of the online memory;
    and at the query positions whose pair sits in an earlier segment:
    - ``right_weight``: the mean weight of the cache of the segment that wrote the queried
      pair (the oracle of the capacity probe);
    - ``right_top``: how often that cache has the largest weight;
    - ``chance``: the mean of 1 / (memories weighed), right_weight under uniform gates.

    Args:
        model: a model with constant segments (``caching.segment_size``).
        slices: MQAR test slices.
    Returns: {"layers": [per gated layer {...}]}, or None for a model without gates.
    """
    S = _routed_segment_size(model)
    if S is None:
        return None

    def calls():
        for s in slices:
            query_pos, pair_seg, example = _pair_segments(s, S)
            for start in range(0, s.input_ids.shape[0], batch_size):
                ids = s.input_ids[start : start + batch_size]
                rows = (example >= start) & (example < start + ids.shape[0])
                yield ids, example[rows] - start, query_pos[rows], pair_seg[rows]

    return _gate_routing(model, S, calls())


def _copy_sources(example: NIAHExample, segment_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every answer token of an S-NIAH example read teacher-forced (prompt + answer): the
    position that predicts it and the segment holding the needle's copy of it (the answer's
    tokens stand verbatim in the needle).

    Returns: query positions [A] and source segments [A].

    Raises:
        ValueError: the answer's tokens do not occur in the prompt.
    """
    ids, answer = example.input_ids, example.answer_ids
    A = len(answer)
    start = next((i for i in range(len(ids) - A + 1) if ids[i : i + A] == answer), None)
    if start is None:
        raise ValueError("example: the answer's tokens do not occur in the prompt")
    query_pos = torch.arange(A) + len(ids) - 1  # [A] the token before each answer token
    return query_pos, (torch.arange(A) + start) // segment_size


@torch.no_grad()
def niah_gate_routing(
    model: GrowMemForCausalLM, examples: Iterable[NIAHExample]
) -> dict[str, Any] | None:
    """How the gates of a gated Memory Caching model route on S-NIAH: `mqar_gate_routing`'s
    statistics, with the answer's tokens as the queries (teacher-forced) and, as the right
    cache, the segment holding the needle's copy of the token each query predicts.

    Args:
        model: a model with constant segments (``caching.segment_size``).
        examples: S-NIAH examples (one forward call each; not read for a model without
            gates).
    Returns: {"layers": [per gated layer {...}]}, or None for a model without gates.
    """
    S = _routed_segment_size(model)
    if S is None:
        return None

    def calls():
        for e in examples:
            query_pos, source_seg = _copy_sources(e, S)
            ids = torch.tensor([e.input_ids + e.answer_ids])  # [1, T]
            yield ids, torch.zeros_like(query_pos), query_pos, source_seg

    return _gate_routing(model, S, calls())


def _gate_stats(record, segment_size, example, query_pos, pair_seg) -> dict[str, float]:
    """Sums behind `mqar_gate_routing` for one recorded call: ``record`` from
    ``record_gates``; the queries' example (within the batch), position and pair segment."""
    gamma = record.gamma.float().cpu()  # [B, H, T, K + 1]
    B, H, T, K1 = gamma.shape
    n_tok = torch.full((T,), record.num_caches) if record.n_tok is None else record.n_tok.cpu()
    if record.idx is None:  # candidate i is cache i, visible while i < n_tok
        idx = torch.arange(K1 - 1).expand(B, H, T, K1 - 1)
        valid = idx < n_tok[None, None, :, None]
    else:
        idx = record.idx.cpu()
        valid = torch.ones_like(idx, dtype=torch.bool) if record.valid is None else record.valid
        valid = valid.cpu()
    weighed = valid.sum(-1) + 1  # [B, H, T] memories each token weighs
    seen = n_tok >= 1  # [T]
    plogp = torch.where(gamma > 0, gamma * gamma.clamp_min(1e-30).log(), torch.zeros(()))
    entropy = -plogp.sum(-1) / weighed.clamp_min(2).float().log()  # [B, H, T]
    stats = {
        "tokens": float(seen.sum()) * B * H,
        "entropy": float(entropy[..., seen].sum()),
        "online_weight": float(gamma[..., -1][..., seen].sum()),
    }
    cached = pair_seg < query_pos // segment_size  # the pair is in a cache, not online
    b, t, right = example[cached], query_pos[cached], pair_seg[cached]  # [M]
    g = gamma[b, :, t]  # [M, H, K + 1]
    hit = (idx[b, :, t] == right[:, None, None]) & valid[b, :, t]  # [M, H, K]
    right_weight = (g[..., :-1] * hit).sum(-1)  # [M, H]
    top = g.argmax(-1)  # [M, H]
    right_top = hit.gather(-1, top.clamp_max(K1 - 2)[..., None])[..., 0] & (top < K1 - 1)
    stats.update(
        queries=float(right.numel() * H),
        right_weight=float(right_weight.sum()),
        right_top=float(right_top.sum()),
        chance=float((1.0 / weighed[b, :, t].float()).sum()),
    )
    return stats


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def niah_eval_examples(
    tokenizer: Tokenizer,
    variant: int,
    length: int,
    num_examples: int,
    seed: int,
    haystack: str | None = None,
    num_needles: int = 1,
) -> list[NIAHExample]:
    """The S-NIAH evaluation examples of `evaluate_niah` at one length: a seed stream disjoint
    from training's (``fold_seed(seed, 1, length)``), the queried needle's depths on an even
    grid."""
    return niah_dataset(
        tokenizer,
        variant=variant,
        length=length,
        num_examples=num_examples,
        seed=fold_seed(seed, 1, length),
        haystack=haystack,
        num_needles=num_needles,
    )


@torch.no_grad()
def evaluate_niah(
    model: GrowMemForCausalLM,
    tokenizer: Tokenizer,
    *,
    variant: int,
    lengths: Sequence[int],
    num_examples: int,
    seed: int,
    haystack: str | None = None,
    bf16: bool = False,
    num_needles: int = 1,
    train_length: int | None = None,
) -> dict[str, Any]:
    """Exact-match retrieval of the queried needle's value, generated greedily for as many
    tokens as the answer has, at each length, and the teacher-forced accuracy of the answer's
    tokens (partial credit: a model that gets 5 of 7 digits right scores 0 on exact match but
    5/7 here).

    Examples come from a seed stream disjoint from training's (``fold_seed(seed, 1, length)``)
    with the queried needle's depths on an even grid.

    Args:
        model: a causal LM with ``generate`` (Hugging Face style).
        tokenizer: the model's tokenizer.
        variant, haystack, num_needles: the examples' (`growmem.tasks.niah.make_niah_example`);
            a model trained with K needles is evaluated with K needles.
        lengths: evaluation lengths in tokens (prompt + answer).
        num_examples: examples per length.
        seed: the run's data seed.
        bf16: autocast to bfloat16 on the model's device.
        train_length: the model's training length, if known: each length is then marked
            "within" (<= train_length) or "beyond" it (extrapolation) and each group gets its
            own means, so extrapolation is reported apart from the task itself.

    Returns:
        {"accuracy": mean over lengths, "token_accuracy": mean over lengths, "num_needles",
        "lengths": [{"length", "accuracy", "token_accuracy", "depths": [[depth, correct], ...]}]};
        with several needles each row also has "distractor_rate", the share of examples whose
        generation is another needle's value (a needle was read, but not the one asked for;
        a wrong answer that is no needle's value read none);
        with ``train_length`` also "train_length", each row's "regime" ("within" or "beyond")
        and, for each regime present, "<regime>_accuracy" and "<regime>_token_accuracy" (means
        over its lengths).

    Raises:
        ValueError: a train_length that is not a positive int.
    """
    if train_length is not None and (
        isinstance(train_length, bool) or not isinstance(train_length, int) or train_length < 1
    ):
        raise ValueError(f"train_length: expected None or an int >= 1, got {train_length!r}")
    model.eval()
    device = model_device(model)
    rows = []
    for length in lengths:
        examples = niah_eval_examples(
            tokenizer, variant, length, num_examples, seed, haystack, num_needles
        )
        hits, token_hits, confused = [], [], []
        for example in examples:
            ids = torch.tensor([example.input_ids]).to(device)  # [1, T]
            with_answer = torch.tensor([example.input_ids + example.answer_ids]).to(device)
            prompt_len, answer = len(example.input_ids), torch.tensor(example.answer_ids)
            with _autocast(device, bf16):
                forced = model(with_answer).logits  # [1, T + A, V]
                predicted = forced[0, prompt_len - 1 : prompt_len - 1 + len(answer)].argmax(-1)
                predicted = predicted.cpu()
                token_hits.append((predicted == answer).float().mean().item())
                # as many tokens as the answer has: the models are not trained to end an
                # answer, so the tokens after it are arbitrary (often more digits, which would
                # make a right value fail the whole-token match)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=len(example.answer_ids),
                    do_sample=False,
                    pad_token_id=tokenizer.pad_id,
                    eos_token_id=tokenizer.eos_id,
                )
            text = tokenizer.decode(out[0, ids.shape[1] :].tolist())
            hits.append(score_exact_match(text, example.answer))
            confused.append(any(score_exact_match(text, v) for _, v in example.distractors))
        row = {
            "length": length,
            "accuracy": sum(hits) / len(hits),
            "token_accuracy": sum(token_hits) / len(token_hits),
            "depths": [[e.depth, h] for e, h in zip(examples, hits, strict=True)],
        }
        if num_needles > 1:
            row["distractor_rate"] = sum(confused) / len(confused)
        if train_length is not None:
            row["regime"] = "within" if length <= train_length else "beyond"
        rows.append(row)
    results = {
        "accuracy": _mean(rows, "accuracy"),
        "token_accuracy": _mean(rows, "token_accuracy"),
        "num_needles": num_needles,
        "lengths": rows,
    }
    if train_length is not None:
        results["train_length"] = train_length
        for regime in ("within", "beyond"):
            group = [r for r in rows if r["regime"] == regime]
            if group:
                results[f"{regime}_accuracy"] = _mean(group, "accuracy")
                results[f"{regime}_token_accuracy"] = _mean(group, "token_accuracy")
    return results


@torch.no_grad()
def evaluate_lm(
    model: GrowMemForCausalLM,
    blocks: TokenBlocks,
    *,
    max_blocks: int = 0,
    batch_size: int = 8,
    position_buckets: int = 8,
    bf16: bool = False,
) -> dict[str, Any]:
    """Next-token loss over evaluation blocks (the first ``max_blocks``, 0 = all).

    Returns:
        {"loss" (nats/token), "perplexity", "bits_per_byte", "tokens", "by_position":
        [{"start", "end", "loss", "perplexity"}]} where by_position buckets the target
        positions 1..T-1 into ``position_buckets`` equal ranges.
    """
    model.eval()
    device = model_device(model)
    T = blocks.seq_len
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    position_nll = torch.zeros(T - 1, dtype=torch.float64)
    seen = 0
    for batch in blocks.eval_batches(batch_size):
        if max_blocks and seen >= max_blocks:
            break
        ids = batch["input_ids"][: max_blocks - seen if max_blocks else None].to(device)
        num_bytes = batch["num_bytes"][: ids.shape[0]]
        with _autocast(device, bf16):
            logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        nll = nll.cpu().double()  # [B, T - 1]; on the CPU, as not every device has float64
        total_nll += float(nll.sum())
        total_tokens += nll.numel()
        total_bytes += int(num_bytes.sum())
        position_nll += nll.sum(0)
        seen += ids.shape[0]
    if seen == 0:
        raise ValueError("blocks: the evaluation split has no block")
    loss = total_nll / total_tokens
    edges = torch.linspace(0, T - 1, position_buckets + 1).round().long().tolist()
    by_position = []
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            bucket = float(position_nll[lo:hi].sum()) / ((hi - lo) * seen)
            by_position.append(
                {"start": lo + 1, "end": hi, "loss": bucket, "perplexity": math.exp(bucket)}
            )
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
        "tokens": total_tokens,
        "blocks": seen,
        "by_position": by_position,
    }


def plot_results(task: str, results: dict[str, Any], path: Path, title: str = "") -> Path:
    """A PNG of an evaluation: MQAR accuracy against key-value pairs (one line per length),
    S-NIAH accuracy against length, LM perplexity against position."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if task == "mqar":
        for T in sorted({s["seq_len"] for s in results["slices"]}):
            rows = [s for s in results["slices"] if s["seq_len"] == T]
            ax.plot(
                [r["num_kv_pairs"] for r in rows],
                [r["accuracy"] for r in rows],
                "o-",
                label=f"seq_len {T}",
            )
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend()
    elif task == "niah":
        rows = results["lengths"]
        ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], "o-")
        if "train_length" in results:  # right of the line: extrapolation
            ax.axvline(results["train_length"], color="grey", ls="--", label="training length")
            ax.legend()
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.02)
    else:
        rows = results["by_position"]
        ax.plot([(r["start"] + r["end"]) / 2 for r in rows], [r["perplexity"] for r in rows], "o-")
        ax.set_xlabel("token position")
        ax.set_ylabel("perplexity")
    ax.set_title(title or task)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
