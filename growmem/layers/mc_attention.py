"""MemoryCachingAttention: a token mixer whose recurrent memory is cached segment by segment."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.checks import (
    check_hidden_states,
    check_layer_cache,
    check_memory_options,
    padding_mask,
)
from growmem.layers.conv import ShortConvolution
from growmem.layers.norm import GatedRMSNorm
from growmem.ops.caching import MemoryCache, memory_caching
from growmem.ops.checks import LINEAR_RULES, RULE_GATES, check_choice, check_positive_int
from growmem.ops.deep import DEEP_RULES
from growmem.ops.spec import Caching, DeepMemory, MatrixMemory

# Per-token gates of the deep rules: eta (inner learning rate), g (weight decay), beta
# (momentum).
DEEP_GATES = {"dla": ("eta",), "titans": ("eta", "g", "beta")}


@dataclass
class RowGroup:
    """Batch rows that have seen the same number of tokens, and their streaming state.

    A padded batch holds rows of different lengths; their segments start at different
    positions, so they stream as separate groups (one group when nothing is padded).
    """

    rows: torch.Tensor  # [g] long: batch rows of the group
    memory: MemoryCache | None = None  # None before the first token
    conv: torch.Tensor | None = None  # conv state of q, k, v: [g, K - 1, 3 · H · D]

    def index_select(self, index: torch.Tensor) -> RowGroup:
        """The group restricted to its members ``index`` (positions within ``rows``)."""
        return RowGroup(
            rows=self.rows[index],
            memory=None if self.memory is None else self.memory.index_select(index),
            conv=None if self.conv is None else self.conv.index_select(0, index),
        )

    def nbytes(self) -> int:
        conv = 0 if self.conv is None else self.conv.numel() * self.conv.element_size()
        return conv + (0 if self.memory is None else self.memory.nbytes())


@dataclass
class MemoryCachingLayerCache:
    """What one MemoryCachingAttention layer keeps between calls.

    ``layer_config`` fingerprints the layer settings that shape the state (the memory's own
    configuration is checked by the op), so that a cache is never continued by another layer.
    """

    batch_size: int
    groups: list[RowGroup]
    layer_config: tuple = ()

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(g.nbytes() for g in self.groups)

    def reorder(self, beam_idx) -> MemoryCachingLayerCache:
        """The cache whose row i is this cache's row beam_idx[i] (beam search; the batch may
        grow or shrink, e.g. to expand a prompt into beams)."""
        owner = torch.empty(self.batch_size, dtype=torch.long)
        slot = torch.empty(self.batch_size, dtype=torch.long)
        for j, group in enumerate(self.groups):
            owner[group.rows.cpu()] = j
            slot[group.rows.cpu()] = torch.arange(len(group.rows))
        beam_idx = torch.as_tensor(beam_idx, dtype=torch.long).cpu()
        new_groups = []
        for j, group in enumerate(self.groups):
            new_rows = (owner[beam_idx] == j).nonzero().flatten()
            if len(new_rows):
                picked = group.index_select(slot[beam_idx[new_rows]].to(group.rows.device))
                picked.rows = new_rows.to(group.rows.device)
                new_groups.append(picked)
        return MemoryCachingLayerCache(len(beam_idx), new_groups, self.layer_config)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Gates are computed in fp32 (or fp64 for fp64 models), also under autocast."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class MemoryCachingAttention(nn.Module):
    """Linear-family recurrent memory with Memory Caching, as a drop-in attention layer.

    x -> q, k, v (short causal conv + SiLU; L2-normalised q, k), u (gate queries), per-token
    gates (decay g via a Mamba2-style A_log/dt parameterisation, β and λ via sigmoid; for the
    deep rules the inner learning rate η = eta_max·sigmoid(x W_η), titans' momentum β by
    sigmoid) -> ``memory_caching`` -> per-head RMSNorm with an output gate -> o_proj. The deep
    rules' initial MLP weights are parameters of the layer (per head, shared by the batch).

    Args:
        hidden_size: model width.
        num_heads: memory heads.
        rule: linear | decay | delta | gated_delta | swla (matrix memories) or dla | titans
            (MLP memories).
        aggregation: none | residual | grm | soup | ssc | loglinear | mean.
        segment_size: tokens per cached segment.
        top_k: caches ssc reads per token.
        init: continuous | independent.
        summary: mean | sum (segment key summaries).
        head_dim: per-head key/value size (default hidden_size // num_heads).
        use_short_conv: causal depthwise conv on q, k, v.
        conv_size: its kernel size.
        qk_norm: L2-normalise q and k (needed by the delta rules for stability).
        norm_eps: epsilon of the output norm.
        chunk_size: chunk length of the scans.
        layer_idx: index of the layer in a model (for caches).
        expansion: deep rules: hidden size of the MLP memory is expansion * head_dim.
        mini_batch: deep rules: tokens whose inner gradients share one set of weights.
        eta_max: deep rules: bound of the inner learning rate.
        max_grad_norm: deep rules: per-token soft clamp of the inner gradient norm.
        mlp_norm: deep rules: LayerNorm on the MLP memory's output.
        decay_to: titans: what its decay forgets toward, "init" (the learned initial MLP
            weights) or "zero" (Titans' equation read literally; chaotic at long context with
            mlp_norm, see docs/design.md).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        rule: str = "gated_delta",
        aggregation: str = "grm",
        segment_size: int = 256,
        top_k: int = 2,
        init: str = "continuous",
        summary: str = "mean",
        head_dim: int | None = None,
        use_short_conv: bool = True,
        conv_size: int = 4,
        qk_norm: bool = True,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        layer_idx: int | None = None,
        expansion: int = 4,
        mini_batch: int = 64,
        eta_max: float = 0.1,
        max_grad_norm: float | None = 1.0,
        mlp_norm: bool = True,
        decay_to: str = "init",
    ):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        check_positive_int("num_heads", num_heads)
        check_choice("rule", rule, LINEAR_RULES + DEEP_RULES)
        # the op's caching choices, checked once here
        self.caching = Caching(
            aggregation, segment_size=segment_size, top_k=top_k, init=init, summary=summary
        )
        check_memory_options(
            conv_size=conv_size,
            chunk_size=chunk_size,
            expansion=expansion,
            mini_batch=mini_batch,
            eta_max=eta_max,
            max_grad_norm=max_grad_norm,
            norm_eps=norm_eps,
            use_short_conv=use_short_conv,
            qk_norm=qk_norm,
            mlp_norm=mlp_norm,
            decay_to=decay_to,
        )
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_heads "
                    f"({num_heads}) unless head_dim is given"
                )
            head_dim = hidden_size // num_heads
        check_positive_int("head_dim", head_dim)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.rule, self.aggregation, self.init, self.summary = rule, aggregation, init, summary
        self.segment_size, self.top_k, self.chunk_size = segment_size, top_k, chunk_size
        self.qk_norm, self.layer_idx = qk_norm, layer_idx
        inner = num_heads * head_dim

        # q, k, v, the gate queries u_t = x_t W_u (gated aggregations) and the output gate in
        # one matmul: one op instead of five matters when decoding a token at a time
        self.uses_u = self.caching.spec.gated
        self.in_proj = nn.Linear(hidden_size, inner * (5 if self.uses_u else 4), bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:  # depthwise over the q, k, v channels together
            self.conv = ShortConvolution(3 * inner, conv_size)
        self.deep = rule in DEEP_RULES
        if self.deep:
            self.mini_batch, self.eta_max = mini_batch, float(eta_max)
            self.max_grad_norm, self.mlp_norm = max_grad_norm, mlp_norm
            self.decay_to = decay_to
            # (decay_to is titans' only: dla has no decay, and ignores the layer's setting)
            decay = {"decay_to": decay_to} if rule == "titans" else {}
            self.memory = DeepMemory(
                rule, mini_batch=mini_batch, norm=mlp_norm, max_grad_norm=max_grad_norm, **decay
            )
            Dh = expansion * head_dim
            self.eta_proj = nn.Linear(hidden_size, num_heads, bias=True)
            # learned initial memory: M(x) = x + N(W1 GELU(W2 x)), per head
            self.W1_0 = nn.Parameter(torch.empty(num_heads, head_dim, Dh))
            self.W2_0 = nn.Parameter(torch.empty(num_heads, Dh, head_dim))
        else:
            self.memory = MatrixMemory(rule, chunk_size)
        gates = DEEP_GATES[rule] if self.deep else RULE_GATES[rule]
        if "g" in gates:  # a_t = exp(-exp(A_log) softplus(x W_a + dt_bias)), as in Mamba2
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(num_heads))
            self.dt_bias = nn.Parameter(torch.empty(num_heads))
        if "beta" in gates:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        if "lam" in gates:
            self.l_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        with torch.no_grad():
            for name, value in self.initial_parameters().items():
                getattr(self, name).copy_(value)

    def initial_parameters(self) -> dict[str, torch.Tensor]:
        """Fresh initial values of the layer's own parameters (its submodules init theirs):
        Mamba2's decay rates A ~ U(1, 16) and time steps dt ~ logU(1e-3, 1e-1) (stored as
        softplus^-1(dt)), and the deep rules' initial MLP weights with 1/sqrt(fan-in) std."""
        values = {}
        H = self.num_heads
        if hasattr(self, "A_log"):
            values["A_log"] = torch.log(torch.empty(H).uniform_(1, 16))
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
            values["dt_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
        if self.deep:
            D, Dh = self.head_dim, self.W1_0.shape[-1]
            values["W1_0"] = torch.randn(H, D, Dh) / math.sqrt(Dh)
            values["W2_0"] = torch.randn(H, Dh, D) / math.sqrt(D)
        return values

    def extra_repr(self) -> str:
        return (
            f"rule={self.rule}, aggregation={self.aggregation}, segment_size="
            f"{self.segment_size}, top_k={self.top_k}, init={self.init}, "
            f"heads={self.num_heads}, head_dim={self.head_dim}"
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: MemoryCachingLayerCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, MemoryCachingLayerCache | None]:
        """Mix the tokens of ``hidden_states``.

        Args:
            hidden_states: [B, T, hidden_size].
            attention_mask: [B, T] with 1 (or True) for real tokens and 0 for padding, or None.
                Outputs at real tokens equal those of the same rows without the padding;
                outputs at padding are 0.
            cache: the cache returned by an earlier call (these tokens continue those rows).
            use_cache: return the cache to continue from.

        Returns:
            (o [B, T, hidden_size], the cache or None).
        """
        check_hidden_states(hidden_states, self.hidden_size)
        B, T, _ = hidden_states.shape
        check_layer_cache(cache, MemoryCachingLayerCache, B, self._layer_config())
        groups = (
            cache.groups
            if cache is not None
            else [RowGroup(rows=torch.arange(B, device=hidden_states.device))]
        )
        mask = padding_mask(attention_mask, B, T, hidden_states.device)

        if mask is None and len(groups) == 1:  # every row alike: no gathering
            o, group = self._forward_rows(hidden_states, groups[0])
            return o, (self._cache(B, [group]) if use_cache else None)

        # Rows with padding, or rows at different positions: gather each row's real tokens
        # (in order) and run groups of rows that stay aligned together.
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=hidden_states.device)
        counts = mask.sum(1)  # [B]
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first
        out = None  # created with the first output's dtype (autocast may lower it)
        new_groups = []
        for group in groups:
            group_counts = counts[group.rows]
            for n in group_counts.unique().tolist():
                members = (group_counts == n).nonzero().flatten()
                sub = group if len(members) == len(group.rows) else group.index_select(members)
                if n:
                    pos = order[sub.rows, :n]  # [g, n] positions of the real tokens
                    o, sub = self._forward_rows(hidden_states[sub.rows[:, None], pos], sub)
                    out = o.new_zeros(B, T, self.hidden_size) if out is None else out
                    out = out.index_put((sub.rows[:, None], pos), o)
                new_groups.append(sub)
        if out is None:  # every row was padding
            out = hidden_states.new_zeros(B, T, self.hidden_size)
        return out, (self._cache(B, new_groups) if use_cache else None)

    def _layer_config(self) -> tuple:
        """The settings a cache must have been built with, as (name, value) pairs: those
        that shape its state or what is written to it (the memory op checks its own again;
        chunk_size and norm_eps do neither)."""
        settings = dict(
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            conv_size=self.conv.kernel_size if self.use_short_conv else 0,
            rule=self.rule,
            aggregation=self.aggregation,
            segment_size=self.segment_size,
            # only an aggregation that selects the top k caches reads top_k
            top_k=self.top_k if self.caching.spec.select == "top_k" else None,
            init=self.init,
            summary=self.summary,
            qk_norm=self.qk_norm,
        )
        if self.deep:
            settings.update(
                expansion=self.W1_0.shape[-1] // self.head_dim,
                mini_batch=self.mini_batch,
                eta_max=self.eta_max,
                mlp_norm=self.mlp_norm,
                max_grad_norm=self.max_grad_norm,
                decay_to=self.decay_to,
            )
        return tuple(settings.items())

    def _cache(self, batch_size: int, groups: list[RowGroup]) -> MemoryCachingLayerCache:
        return MemoryCachingLayerCache(batch_size, groups, self._layer_config())

    def _forward_rows(self, x: torch.Tensor, group: RowGroup) -> tuple[torch.Tensor, RowGroup]:
        """x: [g, n, hidden] tokens that continue ``group``; returns (o, the updated group)."""
        g, n, _ = x.shape
        H, D = self.num_heads, self.head_dim
        inner = H * D
        projected = self.in_proj(x)  # [g, n, (3 + uses_u + 1) · H · D]
        qkv, rest = projected[..., : 3 * inner], projected[..., 3 * inner :]
        conv = None
        if self.use_short_conv:
            qkv, conv = self.conv(qkv, group.conv)
        q, k, v = qkv.split(inner, -1)
        q, k, v = (t.reshape(g, n, H, D) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = {}
        needed = DEEP_GATES[self.rule] if self.deep else RULE_GATES[self.rule]
        if "eta" in needed:
            gates["eta"] = self.eta_max * torch.sigmoid(_at_least_fp32(self.eta_proj(x)))
        if "g" in needed:
            dt = F.softplus(_at_least_fp32(self.a_proj(x)) + self.dt_bias)
            gates["g"] = -self.A_log.exp() * dt  # [g, n, H] log-decay
        if "beta" in needed:
            gates["beta"] = torch.sigmoid(_at_least_fp32(self.b_proj(x)))
        if "lam" in needed:
            gates["lam"] = torch.sigmoid(_at_least_fp32(self.l_proj(x)))
        u = rest[..., :inner].reshape(g, n, H, D) if self.uses_u else None
        out_gate = rest[..., -inner:].reshape(g, n, H, D)
        o, memory = memory_caching(
            q,
            k,
            v,
            u,
            memory=self.memory,
            caching=self.caching,
            gates=gates,
            init_weights=(self.W1_0, self.W2_0) if self.deep else None,
            cache=group.memory,
            output_cache=True,
        )
        o = self.o_norm(o, out_gate).reshape(g, n, H * D)
        return self.o_proj(o), RowGroup(rows=group.rows, memory=memory, conv=conv)

    def state_size(self, T: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the layer's cache holds after T tokens of ``batch_size`` aligned rows."""
        H, D = self.num_heads, self.head_dim
        keeps = self.caching.spec.keeps_segments
        cached = (T - 1) // self.segment_size if keeps and T >= 1 else 0
        if self.deep:
            Dh = self.W1_0.shape[-1]
            weights = 2 * H * D * Dh  # W1 and W2 of one memory
            elements = cached * (weights + H * D)  # cached MLP weights and key summaries
            state = weights * (2 if self.rule == "titans" else 1)  # + momentum
            in_segment = (T - 1) % self.segment_size + 1 if T else 0
            pending = in_segment % self.mini_batch
            # the state after the last token, and when a mini-batch is open also the state
            # it started from and its tokens' k, v and gates (recomputed by the next call)
            elements += state * (2 if pending else 1) + H * D  # + key sum
            elements += pending * H * (2 * D + len(DEEP_GATES[self.rule]))
        else:
            elements = cached * (H * D * D + H * D)  # cached memories and their key summaries
            elements += 2 * H * D * D + H * D  # sum of cached memories, online memory, key sum
            if self.rule == "swla":
                elements += 2 * H * D  # previous key and value
        if self.use_short_conv:
            elements += 3 * (self.conv.kernel_size - 1) * H * D
        return batch_size * elements * torch.empty((), dtype=dtype).element_size()
