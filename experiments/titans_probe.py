"""Why titans does not learn MQAR here: two probes of its memory at initialisation.

    python -m experiments.titans_probe   # -> results/experiments/titans_probe.json

1. **Storage.** Write P random (key, value) pairs into a fresh titans memory with fixed gates,
   optionally followed by F writes of one other pair (MQAR's filler token, written again and
   again), then read every stored key. Reports the argmax recall among the P values and the
   mean cosine between each read-out M(k) - k and its target v - k. A matrix memory with the
   delta rule is unaffected by the filler writes (they touch one key direction only); an MLP
   memory's writes move its output for every input, and within a mini-batch the filler's
   gradients, all taken at the weights the mini-batch starts from, add up instead of fading as
   the memory learns the filler pair (the rows with smaller mini-batches).
2. **Read path.** In a freshly initialised ``MemoryCachingAttention`` fed MQAR sequences, the
   gradient norm of the outputs at the query positions with respect to the context tokens
   (the key-value pairs), relative to that with respect to the query token itself: how much
   of what a layer returns at a query can come from the memory at the start of training.
3. **Cost.** Seconds of one forward and backward of the `mqar` model with titans at
   mini-batches 16, 4, 2 and 1, and with gated_delta, on this machine.
4. **Stability.** The norm of the training gradient of a fresh titans `mqar` model against
   the mini-batch and the bound of the inner learning rate: with small mini-batches the
   chain of inner updates turns chaotic at large rates.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from growmem.layers import MemoryCachingAttention, MemoryConfig
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.ops.deep.api import deep_memory
from growmem.ops.linear.api import linear_memory
from growmem.ops.spec import DEEP_RULES
from growmem.tasks.mqar import MQARConfig, generate_mqar
from growmem.utils.provenance import write_json

OUT = Path(__file__).resolve().parent.parent / "results" / "experiments" / "titans_probe.json"


def _storage_sequence(num_pairs, fillers, batch, head_dim, value_norm, generator):
    """Keys, values and queries: the pairs, the filler writes, then a read of every key.

    Returns (q, k, v [B, T, 1, D], writes [B, T, 1] (1 where a token writes), k_pairs, v_pairs
    [B, P, 1, D]).
    """
    B, P, D = batch, num_pairs, head_dim

    def keys(n: int) -> torch.Tensor:  # [B, n, 1, D] unit keys
        return F.normalize(torch.randn(B, n, 1, D, generator=generator), dim=-1)

    def values(n: int) -> torch.Tensor:  # [B, n, 1, D]
        return torch.randn(B, n, 1, D, generator=generator) * value_norm / math.sqrt(D)

    k, v = keys(P), values(P)
    K = torch.cat([k, keys(1).expand(B, fillers, 1, D), keys(P)], 1)
    V = torch.cat([v, values(1).expand(B, fillers, 1, D), torch.zeros(B, P, 1, D)], 1)
    Q = torch.cat([k, k[:, :1].expand(B, fillers, 1, D), k], 1)
    writes = torch.cat([torch.ones(B, P + fillers, 1), torch.zeros(B, P, 1)], 1)
    return Q, K, V, writes, k, v


def _recall(read: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Argmax recall and mean diagonal cosine of reads vs targets [B, P, 1, D]."""
    sim = torch.einsum(
        "bphd,bqhd->bhpq", F.normalize(read, dim=-1), F.normalize(target, dim=-1)
    )  # [B, 1, P, P]
    P = read.shape[1]
    recall = (sim.argmax(-1) == torch.arange(P)).float().mean().item()
    return {"recall": recall, "cosine": sim.diagonal(dim1=-2, dim2=-1).mean().item()}


def storage_probe(
    rule: str,
    rate: float,
    fillers: int,
    log_decay: float = 0.0,
    num_pairs: int = 8,
    batch: int = 64,
    head_dim: int = 64,
    expansion: int = 4,
    value_norm: float = 8.0,
    mini_batch: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Recall of ``num_pairs`` pairs after ``fillers`` writes of one more pair.

    Args:
        rule: "titans" (MLP memory, momentum β = 0.5 = sigmoid(0), its initial value) or
            "gated_delta" (matrix memory).
        rate: titans' inner learning rate η, or the delta rule's write strength β, of every
            write (the reads write nothing).
        fillers: writes of the filler pair between the pairs and the reads.
        log_decay: g of every token (a_t = exp(g)).
        num_pairs, batch, head_dim, expansion: sizes (one head; expansion: titans' MLP).
        value_norm: norm of the values (the titans memory's LayerNorm output has norm
            sqrt(D)).
        mini_batch: titans: tokens whose inner gradients are taken at the same weights.
        seed: seeds the pairs and the initial weights.

    Returns:
        {"recall": argmax accuracy among the pairs, "cosine": mean cosine between each read
        and its target (titans: M(k) - k against v - k; gated_delta: S k against v)}.
    """
    generator = torch.Generator().manual_seed(seed)
    Q, K, V, writes, k, v = _storage_sequence(
        num_pairs, fillers, batch, head_dim, value_norm, generator
    )
    g = torch.full_like(writes, log_decay)  # [B, T, 1]
    if rule == "gated_delta":
        o, _ = linear_memory(Q, K, V, rule=rule, g=g, beta=rate * writes)
        return _recall(o[:, -num_pairs:], v)
    D, Dh = head_dim, expansion * head_dim
    init = (
        torch.randn(1, D, Dh, generator=generator) / math.sqrt(Dh),
        torch.randn(1, Dh, D, generator=generator) / math.sqrt(D),
    )
    o, _ = deep_memory(
        Q,
        K,
        V,
        rule=rule,
        eta=rate * writes,
        g=g,
        beta=torch.full_like(writes, 0.5),
        init_weights=init,
        mini_batch=mini_batch,
        max_grad_norm=1.0,
    )
    return _recall(o[:, -num_pairs:] - k, v - k)


def read_path_probe(rule: str, eta_max: float = 0.1, seed: int = 0) -> float:
    """|d o_query / d x_context| / |d o_query / d x_query| of a fresh layer on MQAR inputs.

    Args:
        rule: memory rule of a 2-head, 128-wide ``MemoryCachingAttention`` (no caching).
        eta_max: deep rules' bound of the inner learning rate.
        seed: seeds the layer, the embeddings and the probe direction.
    """
    config = MQARConfig(vocab_size=64, seq_len=64, num_kv_pairs=8, num_examples=16)
    data = generate_mqar(config, seed)
    torch.manual_seed(seed)
    embeddings = torch.randn(config.vocab_size, 128)
    deep = {"eta_max": eta_max, "mini_batch": 16} if rule == "titans" else {}
    memory = {"rule": rule, **deep, "caching": {"aggregation": "none"}}
    layer = MemoryCachingAttention(128, 2, MemoryConfig.from_dict(memory))
    x = embeddings[data["input_ids"]].requires_grad_()  # [N, T, 128]
    o, _ = layer(x)
    # the query key token sits just before each labelled value
    query = torch.zeros_like(data["labels"], dtype=torch.bool)
    query[:, :-1] = data["labels"][:, 1:] != -100
    (o * torch.randn_like(o) * query[..., None]).sum().backward()
    norms = x.grad.norm(dim=-1)  # [N, T]
    context = norms[:, : 2 * config.num_kv_pairs].mean()
    return (context / norms[query].mean()).item()


def _mqar_model(rule: str, mini_batch: int = 16, eta_max: float = 0.1) -> GrowMemForCausalLM:
    """A freshly initialised `mqar` model (seeded) with ``rule`` in every layer."""
    torch.manual_seed(0)
    deep = {"mini_batch": mini_batch, "eta_max": eta_max} if rule in DEEP_RULES else {}
    memory = {"rule": rule, **deep, "caching": {"aggregation": "none", "segment_size": 16}}
    config = GrowMemConfig(
        vocab_size=64, hidden_size=128, num_hidden_layers=2, num_heads=2, memory=memory
    )
    return GrowMemForCausalLM(config)


def step_seconds(rule: str, mini_batch: int = 16, repeats: int = 2) -> float:
    """Seconds of one forward and backward of the `mqar` model (batch 32 of 64 tokens).

    Args:
        rule: memory rule of every layer.
        mini_batch: deep rules' mini-batch.
        repeats: timed passes after one warm-up; the fastest is returned.
    """
    model = _mqar_model(rule, mini_batch)
    ids = torch.randint(0, 64, (32, 64))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if i:  # the first pass warms up
            times.append(time.perf_counter() - start)
    return min(times)


def outer_gradient_norm(mini_batch: int, eta_max: float) -> float:
    """Norm of the training gradient of a fresh titans `mqar` model on 8 MQAR sequences: how
    sensitive the outputs are to the parameters through the chain of inner updates."""
    config = MQARConfig(vocab_size=64, seq_len=64, num_kv_pairs=8, num_examples=8)
    data = generate_mqar(config, 0)
    model = _mqar_model("titans", mini_batch, eta_max)
    model(input_ids=data["input_ids"], labels=data["labels"]).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    storage = [
        {"rule": rule, "rate": rate, "fillers": fillers, "log_decay": g}
        | {"mini_batch": 16 if rule == "titans" else None}
        | storage_probe(rule, rate, fillers, g)
        for rule, rates in (("titans", (0.05, 0.1, 1.0)), ("gated_delta", (0.5,)))
        for rate in rates
        for fillers in (0, 40)
        for g in (0.0, -0.02)
    ]
    # identical filler gradients taken at one mini-batch's entry weights pile up instead of
    # fading as the memory learns the filler pair: smaller mini-batches
    storage += [
        {"rule": "titans", "rate": rate, "fillers": 40, "log_decay": 0.0, "mini_batch": b}
        | storage_probe("titans", rate, 40, mini_batch=b)
        for rate, sizes in ((1.0, (1, 2, 4, 8)), (0.3, (1, 2)))
        for b in sizes
    ]
    read_path = {
        "gated_delta": read_path_probe("gated_delta"),
        "titans, eta_max 0.1": read_path_probe("titans", 0.1),
        "titans, eta_max 1.0": read_path_probe("titans", 1.0),
    }
    # what smaller mini-batches cost: one training pass of the `mqar` model, this machine
    step = {"gated_delta": step_seconds("gated_delta")}
    step |= {f"titans, mini-batch {b}": step_seconds("titans", b) for b in (16, 4, 2, 1)}
    # the chain of small-mini-batch updates at a large inner learning rate: exploding gradients
    gradient = [
        {"mini_batch": b, "eta_max": eta, "norm": outer_gradient_norm(b, eta)}
        for b in (16, 2, 1)
        for eta in (0.1, 0.3, 1.0)
    ]
    for row in storage:
        print(
            f"{row['rule']:<11} rate {row['rate']:<4} fillers {row['fillers']:>2} "
            f"g {row['log_decay']:<5} mini-batch {row['mini_batch'] or '-':>2}: "
            f"recall {row['recall']:.3f}, cosine {row['cosine']:.3f}"
        )
    for name, ratio in read_path.items():
        print(f"read path, {name}: context / query gradient {ratio:.3f}")
    for name, seconds in step.items():
        print(f"forward and backward, {name}: {seconds:.2f} s")
    for row in gradient:
        print(
            f"outer gradient norm at init, mini-batch {row['mini_batch']:>2}, "
            f"eta_max {row['eta_max']}: {row['norm']:.4g}"
        )
    probes = {
        "storage": storage,
        "read_path": read_path,
        "step_seconds": step,
        "outer_gradient_norm": gradient,
    }
    write_json(args.out, probes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
