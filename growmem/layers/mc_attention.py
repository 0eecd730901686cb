"""MemoryCachingAttention: a token mixer whose recurrent memory is cached segment by segment."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.checks import (
    check_hidden_states,
    check_layer_cache,
    padding_mask,
    resolve_head_dim,
)
from growmem.layers.config import (
    FLAT_DEFAULTS,
    FLAT_PATHS,
    MemoryConfig,
    flat_value,
    nested_from_flat,
    warn_flat,
)
from growmem.layers.conv import ShortConvolution
from growmem.layers.norm import GatedRMSNorm
from growmem.ops.caching import MemoryCache, SegmentPlan, memory_caching
from growmem.ops.checks import check_positive_float


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

    ``layer_config`` fingerprints the layer's sizes and its MemoryConfig, so that a cache is
    never continued by a layer of other settings.
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
    The gated aggregations add per-head gate parameters (a temperature, by default; an
    online-logit bias) and a projection of the summaries' keys as ``MemoryConfig`` says
    (docs/design.md §4.2).

    Args:
        hidden_size: model width.
        num_heads: memory heads.
        config: the memory, its caching and the layer's options (``MemoryConfig``; default:
            gated_delta with grm over segments of 256). ``config.memory`` and
            ``config.caching`` go to the op unchanged.
        head_dim: per-head key/value size (default hidden_size // num_heads).
        norm_eps: epsilon of the output norm (unless ``config.o_norm_eps`` sets its own).
        layer_idx: index of the layer in a model (for caches).
        **flat: deprecated: the flat settings of earlier releases (rule=, aggregation=,
            segment_size=, ...; see ``growmem.layers.config.FLAT_PATHS``), converted to a
            MemoryConfig with a FutureWarning. Pass them or ``config``, not both.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        config: MemoryConfig | None = None,
        *,
        head_dim: int | None = None,
        norm_eps: float = 1e-6,
        layer_idx: int | None = None,
        **flat,
    ):
        super().__init__()
        if flat:
            unknown = sorted(set(flat) - set(FLAT_DEFAULTS))
            if unknown:
                raise TypeError(f"MemoryCachingAttention got unexpected arguments {unknown}")
            if config is not None:
                raise ValueError(
                    f"pass config or the deprecated flat settings {sorted(flat)}, not both"
                )
            config = MemoryConfig.from_dict(nested_from_flat(flat))
            instead = f"pass config=MemoryConfig.from_dict({config.to_dict()})"
            warn_flat("MemoryCachingAttention", flat, instead)
        config = MemoryConfig() if config is None else config
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        check_positive_float("norm_eps", norm_eps)
        head_dim = resolve_head_dim(hidden_size, num_heads, head_dim)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.config, self.layer_idx = config, layer_idx
        inner = num_heads * head_dim

        # q, k, v, the gate queries u_t = x_t W_u (gated aggregations) and the output gate in
        # one matmul: one op instead of five matters when decoding a token at a time
        self.uses_u = config.caching.spec.gated
        self.in_proj = nn.Linear(hidden_size, inner * (5 if self.uses_u else 4), bias=False)
        if self.uses_u:  # the gates' own settings (an ungated aggregation has no gates)
            if config.summary_source == "gate_keys":  # summaries of s_t = x_t W_s
                self.s_proj = nn.Linear(hidden_size, inner, bias=False)
            if config.gate_temperature is not None:  # τ = exp(gate_log_temperature) > 0
                self.gate_log_temperature = nn.Parameter(torch.empty(num_heads))
            if config.gate_online_bias is not None:
                self.gate_online_bias = nn.Parameter(torch.empty(num_heads))
        if config.use_short_conv:  # depthwise over the q, k, v channels together
            self.conv = ShortConvolution(3 * inner, config.conv_size)
        self.deep = config.deep
        if self.deep:
            Dh = config.expansion * head_dim
            self.eta_proj = nn.Linear(hidden_size, num_heads, bias=True)
            # learned initial memory: M(x) = x + N(W1 GELU(W2 x)), per head
            self.W1_0 = nn.Parameter(torch.empty(num_heads, head_dim, Dh))
            self.W2_0 = nn.Parameter(torch.empty(num_heads, Dh, head_dim))
        gates = config.memory.gates
        if "g" in gates:  # a_t = exp(-exp(A_log) softplus(x W_a + dt_bias)), as in Mamba2
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(num_heads))
            self.dt_bias = nn.Parameter(torch.empty(num_heads))
        if "beta" in gates:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        if "lam" in gates:
            self.l_proj = nn.Linear(hidden_size, num_heads, bias=True)
        o_norm_eps = norm_eps if config.o_norm_eps is None else config.o_norm_eps
        self.o_norm = GatedRMSNorm(head_dim, eps=o_norm_eps)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        with torch.no_grad():
            for name, value in self.initial_parameters().items():
                getattr(self, name).copy_(value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters and submodules
        except AttributeError:
            if name not in FLAT_DEFAULTS:
                raise
        warnings.warn(
            f"MemoryCachingAttention.{name} is deprecated: read layer.config.{FLAT_PATHS[name]}",
            FutureWarning,
            stacklevel=2,
        )
        return flat_value(self.config, name)

    def initial_parameters(
        self, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Fresh initial values of the layer's own parameters (its submodules init theirs):
        Mamba2's decay rates A ~ U(1, 16) and time steps dt ~ logU(1e-3, 1e-1) (stored as
        softplus^-1(dt)), the deep rules' initial MLP weights with 1/sqrt(fan-in) std, and the
        gates' temperature (log τ0) and online bias (b0), constants that draw nothing.

        Args:
            generator: a CPU generator to draw from (None: the global RNG).
        """
        values = {}
        H = self.num_heads
        cpu = partial(torch.empty, device="cpu")  # drawn on the CPU whatever the default device
        if hasattr(self, "A_log"):
            values["A_log"] = torch.log(cpu(H).uniform_(1, 16, generator=generator))
            log_dt = cpu(H).uniform_(math.log(1e-3), math.log(1e-1), generator=generator)
            dt = torch.exp(log_dt)
            values["dt_bias"] = dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt)
        if self.deep:
            D, Dh = self.head_dim, self.W1_0.shape[-1]
            values["W1_0"] = cpu(H, D, Dh).normal_(generator=generator) / math.sqrt(Dh)
            values["W2_0"] = cpu(H, Dh, D).normal_(generator=generator) / math.sqrt(D)
        if hasattr(self, "gate_log_temperature"):
            values["gate_log_temperature"] = cpu(H).fill_(math.log(self.config.gate_temperature))
        if hasattr(self, "gate_online_bias"):
            values["gate_online_bias"] = cpu(H).fill_(self.config.gate_online_bias)
        return values

    @property
    def gate_query_rows(self) -> slice | None:
        """The rows of ``in_proj.weight`` that compute the gate queries u (None without u):
        the rows are q, k, v, u, z, each H · D."""
        if not self.uses_u:
            return None
        inner = self.num_heads * self.head_dim
        return slice(3 * inner, 4 * inner)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, {self.config}"

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
        """The settings a cache must have been built with, as (name, value) pairs: the sizes
        and every memory setting (the memory op checks its own again)."""
        sizes = (("hidden_size", self.hidden_size), ("num_heads", self.num_heads))
        return (*sizes, ("head_dim", self.head_dim), *self.config.settings())

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
        if self.config.use_short_conv:
            qkv, conv = self.conv(qkv, group.conv)
        q, k, v = qkv.split(inner, -1)
        q, k, v = (t.reshape(g, n, H, D) for t in (q, k, v))
        if self.config.qk_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = {}
        needed = self.config.memory.gates
        if "eta" in needed:
            gates["eta"] = self.config.eta_max * torch.sigmoid(_at_least_fp32(self.eta_proj(x)))
        if "g" in needed:
            dt = F.softplus(_at_least_fp32(self.a_proj(x)) + self.dt_bias)
            gates["g"] = -self.A_log.exp() * dt  # [g, n, H] log-decay
        if "beta" in needed:
            gates["beta"] = torch.sigmoid(_at_least_fp32(self.b_proj(x)))
        if "lam" in needed:
            gates["lam"] = torch.sigmoid(_at_least_fp32(self.l_proj(x)))
        u = rest[..., :inner].reshape(g, n, H, D) if self.uses_u else None
        if hasattr(self, "gate_log_temperature"):
            gates["temperature"] = _at_least_fp32(self.gate_log_temperature).exp()  # [H]
        if hasattr(self, "gate_online_bias"):
            gates["online_bias"] = self.gate_online_bias  # [H]
        if hasattr(self, "s_proj"):
            gates["summary_keys"] = self.s_proj(x).reshape(g, n, H, D)
        out_gate = rest[..., -inner:].reshape(g, n, H, D)
        o, state = memory_caching(
            q,
            k,
            v,
            u,
            memory=self.config.memory,
            caching=self.config.caching,
            gates=gates,
            init_weights=(self.W1_0, self.W2_0) if self.deep else None,
            cache=group.memory,
            output_cache=True,
            impl=self.config.impl,
        )
        o = self.o_norm(o, out_gate).reshape(g, n, H * D)
        return self.o_proj(o), RowGroup(rows=group.rows, memory=state, conv=conv)

    def state_size(self, T: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the layer's cache holds after T tokens of ``batch_size`` aligned rows (read in
        one call when the segments are "log": they follow the call's length)."""
        H, D = self.num_heads, self.head_dim
        caching = self.config.caching
        plan = SegmentPlan.build(max(T, 1), caching.segment_size, caching.segments)
        starts = plan.starts_between(0, T)  # segment starts after the first token
        cached = len(starts) if caching.spec.keeps_segments else 0
        if self.deep:
            Dh = self.W1_0.shape[-1]
            weights = 2 * H * D * Dh  # W1 and W2 of one memory
            elements = cached * (weights + H * D)  # cached MLP weights and key summaries
            state = weights * (2 if self.config.rule == "titans" else 1)  # + momentum
            in_segment = T - (starts[-1] if starts else 0)
            pending = in_segment % self.config.memory.mini_batch
            # the state after the last token, and when a mini-batch is open also the state
            # it started from and its tokens' k, v and gates (recomputed by the next call)
            elements += state * (2 if pending else 1) + H * D  # + key sum
            elements += pending * H * (2 * D + len(self.config.memory.gates))
        else:
            elements = cached * (H * D * D + H * D)  # cached memories and their key summaries
            elements += 2 * H * D * D + H * D  # sum of cached memories, online memory, key sum
            if self.config.rule == "swla":
                elements += 2 * H * D  # previous key and value
        if self.config.use_short_conv:
            elements += 3 * (self.conv.kernel_size - 1) * H * D
        return batch_size * elements * torch.empty((), dtype=dtype).element_size()
