"""Plain re-implementations of growmem's token mixers and models: the tests' model-level truth.

Written from docs/design.md and the layers' docstrings, not from growmem's layer or
model code, one formula per line, with explicit loops over tokens where the code has a fast
path (the causal short convolution, the attention). They read a module's *own* parameters by
name (``module.state_dict()``) and rebuild every projection, gate and norm from them, so a
wrong formula in growmem/layers or growmem/models shows as a mismatch. Options (rule,
segment size, eta_max, ...: a MemoryConfig) are passed explicitly, never read back from the
module.

From growmem they import only the per-token references of the ops (growmem/ops/*/naive.py,
the spec of the memory rules and of Memory Caching) and the objects that describe a memory and
its caching (growmem/layers/config.py, growmem/ops/spec.py).

The layer, for one row of tokens x_t (docs/design.md §4):
    [q; k; v; u; z] = x_t W_in                    rows of in_proj in this order (u: grm, soup,
                                                   ssc, loglinear only; z: the output gate)
    q, k, v = SiLU(Σ_j w_j ⊙ x_{t-K+1+j} + b)      causal depthwise conv over q, k, v (not u, z)
    q, k = q / ‖q‖, k / ‖k‖                       per head (qk_norm)
    g = -exp(A_log) · softplus(x W_a + dt_bias)   log-decay (Mamba2)
    β = σ(x W_b + b_b), λ = σ(x W_l + b_l)        write strength, current-token weight
    η = eta_max · σ(x W_η + b_η)                  deep rules' inner learning rate; titans'
                                                   momentum is β above
    s = x_t W_s                                   summary keys (summary_source "gate_keys";
                                                   else the keys k above)
    τ = exp(gate_log_temperature), b = gate_online_bias    per head (when configured)
    o = memory_caching(q, k, v, u; gates, τ, b, s) per-token op reference, gate scale
                                                   caching.gate_scale, or 1/√D for
                                                   gate_norm "none" and 1 otherwise
    y = (RMSNorm_head(o) · w ⊙ SiLU(z)) W_o       eps: o_norm_eps, else the layer's norm_eps
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from growmem.layers import MemoryConfig
from growmem.ops.caching.naive import memory_caching_reference

# Gates per rule (docs/design.md §2 and §4.2): g log-decay, beta write strength
# (titans: momentum), lam current-token weight, eta inner learning rate.
GATES = {
    "linear": (),
    "decay": ("g",),
    "delta": ("beta",),
    "gated_delta": ("g", "beta"),
    "swla": ("g", "beta", "lam"),
    "dla": ("eta",),
    "titans": ("eta", "g", "beta"),
}
DEEP = ("dla", "titans")
GATED = ("grm", "soup", "ssc", "loglinear")  # aggregations scored by <u_t, c_i>


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """x W^T (+ b), nn.Linear's convention: weight [out, in]."""
    y = x @ weight.T
    return y if bias is None else y + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) · weight over the last dim."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SiLU of the causal depthwise convolution, token by token (zeros before the start).

    x: [B, T, C]; weight: [C, 1, K] (Conv1d's layout; tap K - 1 multiplies the current token);
    bias: [C]. y_t = SiLU(b + Σ_{j<K} w_j ⊙ x_{t-K+1+j}).
    """
    T, K = x.shape[1], weight.shape[-1]
    out = []
    for t in range(T):
        acc = bias.expand_as(x[:, t])
        for j in range(K):
            s = t - K + 1 + j
            if s >= 0:
                acc = acc + weight[:, 0, j] * x[:, s]
        out.append(silu(acc))
    return torch.stack(out, 1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def memory_layer_reference(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    config: MemoryConfig,
    num_heads: int,
    head_dim: int,
    norm_eps: float,
) -> torch.Tensor:
    """MemoryCachingAttention over unpadded rows x [B, T, hidden]: [B, T, hidden].

    Args:
        params: the layer's state_dict (names relative to the layer).
        config: the settings the layer was built with (the memory's rule and knobs, the
            caching choices, the layer's options); num_heads, head_dim, norm_eps: the layer's.
    """
    memory, caching = config.memory, config.caching
    rule, aggregation = memory.rule, caching.aggregation
    B, T, _ = x.shape
    H, D = num_heads, head_dim
    inner = H * D
    proj = linear(x, params["in_proj.weight"])  # [B, T, (4 or 5) · inner]
    qkv = proj[..., : 3 * inner]
    if config.use_short_conv:
        qkv = causal_conv(qkv, params["conv.weight"], params["conv.bias"])
    q, k, v = (qkv[..., i * inner : (i + 1) * inner].reshape(B, T, H, D) for i in range(3))
    if config.qk_norm:
        q, k = l2_normalize(q), l2_normalize(k)
    gated = aggregation in GATED
    u = proj[..., 3 * inner : 4 * inner].reshape(B, T, H, D) if gated else None
    z = proj[..., (4 if gated else 3) * inner :].reshape(B, T, H, D)  # output gate

    gates = {}
    for name in GATES[rule]:
        if name == "g":
            dt = softplus(linear(x, params["a_proj.weight"]) + params["dt_bias"])  # [B, T, H]
            gates["g"] = -torch.exp(params["A_log"]) * dt
        elif name == "beta":
            gates["beta"] = sigmoid(linear(x, params["b_proj.weight"], params["b_proj.bias"]))
        elif name == "lam":
            gates["lam"] = sigmoid(linear(x, params["l_proj.weight"], params["l_proj.bias"]))
        else:
            logits = linear(x, params["eta_proj.weight"], params["eta_proj.bias"])
            gates["eta"] = config.eta_max * sigmoid(logits)

    if gated:  # the gates' own inputs, each only when the layer is configured with it
        if config.summary_source == "gate_keys":
            gates["summary_keys"] = linear(x, params["s_proj.weight"]).reshape(B, T, H, D)
        if config.gate_temperature is not None:
            tau = torch.exp(params["gate_log_temperature"])  # [H]
            gates["temperature"] = tau.expand(B, T, H)
        if config.gate_online_bias is not None:
            gates["online_bias"] = params["gate_online_bias"].expand(B, T, H)

    # the gate scale the layer leaves to the op (docs/design.md §3.2): 1/sqrt(head_dim) for the
    # dot product (gate_norm "none"), 1 for the cosine logits of "l2" and "centered"
    default_scale = 1.0 / math.sqrt(D) if caching.gate_norm == "none" else 1.0
    scale = default_scale if caching.gate_scale is None else caching.gate_scale
    o = memory_caching_reference(
        q,
        k,
        v,
        u,
        memory=memory,
        caching=replace(caching, gate_scale=scale),
        gates=gates,
        init_weights=(params["W1_0"], params["W2_0"]) if rule in DEEP else None,
    )
    eps = norm_eps if config.o_norm_eps is None else config.o_norm_eps
    o = rms_norm(o, params["o_norm.weight"], eps) * silu(z)  # [B, T, H, D]
    return linear(o.reshape(B, T, inner), params["o_proj.weight"])


def rotate_half(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """RoPE of one token x [..., D]: the pair (i, i + D/2) rotated by position · θ^(-2i/D)."""
    D = x.shape[-1]
    angle = position * theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # [D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention_reference(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    num_heads: int,
    head_dim: int,
    window: int | None,
    rope_theta: float,
    conv: bool = False,
) -> torch.Tensor:
    """Causal softmax attention with RoPE over unpadded rows x [B, T, hidden], query by query:
    query t attends to keys s <= t with t - s < window: [B, T, hidden]. With ``conv``, q, k
    and v first go through the short convolution (``causal_conv``), as in the memory layers."""
    B, T, _ = x.shape
    H, D = num_heads, head_dim
    qkv = torch.cat([linear(x, params[f"{n}_proj.weight"]) for n in "qkv"], -1)
    if conv:
        qkv = causal_conv(qkv, params["conv.weight"], params["conv.bias"])
    q, k, v = (t.reshape(B, T, H, D) for t in qkv.split(H * D, -1))
    q = torch.stack([rotate_half(q[:, t], t, rope_theta) for t in range(T)], 1)
    k = torch.stack([rotate_half(k[:, t], t, rope_theta) for t in range(T)], 1)
    outs = []
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, lo : t + 1]) / math.sqrt(D)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        outs.append(torch.einsum("bhs,bshd->bhd", weights, v[:, lo : t + 1]).reshape(B, -1))
    return linear(torch.stack(outs, 1), params["o_proj.weight"])


def sub_params(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a state_dict under ``prefix`` (e.g. "model.layers.0.mixer."), renamed
    relative to it."""
    return {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}


def causal_lm_reference(params: dict[str, torch.Tensor], config, ids: torch.Tensor):
    """GrowMemForCausalLM's logits for unpadded rows ids [B, T]: [B, T, vocab].

    Embedding -> blocks (x + mixer(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)), SwiGLU(h) =
    (SiLU(h W_gate) ⊙ h W_up) W_down) -> RMSNorm -> lm_head (the embedding when tied). A layer's
    mixer is softmax attention when the config has no memory (Transformer++) or its index is
    in attn_layers.

    Args:
        params: the model's state_dict; config: its GrowMemConfig (options are read from it).
    """
    eps = config.norm_eps
    embedding = params["model.embed_tokens.weight"]  # [V, hidden]
    x = embedding[ids]  # [B, T, hidden]
    for i in range(config.num_hidden_layers):
        block = sub_params(params, f"model.layers.{i}.")
        mixer = sub_params(block, "mixer.")
        h = rms_norm(x, block["mixer_norm.weight"], eps)
        if config.memory is None or i in config.attn_layers:
            h = attention_reference(
                mixer,
                h,
                num_heads=config.num_heads,
                head_dim=config.head_dim,
                window=config.attn_window,
                rope_theta=config.rope_theta,
                conv=config.attn_conv_size is not None,
            )
        else:
            h = memory_layer_reference(
                mixer,
                h,
                config=config.memory,
                num_heads=config.num_heads,
                head_dim=config.head_dim,
                norm_eps=eps,
            )
        x = x + h
        h = rms_norm(x, block["mlp_norm.weight"], eps)
        h = silu(linear(h, block["mlp.gate_proj.weight"])) * linear(h, block["mlp.up_proj.weight"])
        x = x + linear(h, block["mlp.down_proj.weight"])
    x = rms_norm(x, params["model.norm.weight"], eps)
    head = embedding if config.tie_word_embeddings else params["lm_head.weight"]
    return linear(x, head)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the targets labels[:, t + 1] != -100 of -log softmax(logits[:, t])[target]."""
    total, count = logits.new_zeros(()), 0
    B, T, _ = logits.shape
    for b in range(B):
        for t in range(T - 1):
            target = int(labels[b, t + 1])
            if target != -100:
                row = logits[b, t]
                log_z = row.max() + torch.log(torch.exp(row - row.max()).sum())
                total, count = total + log_z - row[target], count + 1
    return total / count
