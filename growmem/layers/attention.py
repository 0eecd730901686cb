"""Softmax attention of Transformer++: RoPE, causal SDPA, optional sliding window and short
convolution, a KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from growmem.layers.checks import (
    check_hidden_states,
    check_layer_cache,
    padding_mask,
    resolve_head_dim,
)
from growmem.layers.conv import ShortConvolution
from growmem.ops.checks import (
    check_positive_float,
    check_positive_int,
    check_values,
    host_reads_free,
)


class _SlotBuffer:
    """Preallocated storage of cached slots shared by the caches that extend one another.

    ``filled`` is how many slots some cache has written; a cache of that length may append in
    place, any other (an older cache being continued a second time) copies first. Older caches
    never see their slots change, so caches stay values while decoding appends in O(1).
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], filled: int):
        self.tensors = tensors  # each [B, ..., capacity, ...] along its slot dim
        self.filled = filled


# slot dimension of keys [B, H, S, D], values [B, H, S, D], valid [B, S], positions [B, S]
_SLOT_DIMS = (2, 2, 1, 1)


@dataclass
class AttentionLayerCache:
    """What one Attention layer keeps between calls: its keys and values.

    Slots are tokens in the order they arrived, padding included (``valid`` marks the real
    ones), so that a left-padded batch keeps one rectangular cache. With a sliding window the
    slots no query can reach any more are dropped.
    """

    buffer: _SlotBuffer
    start: int  # first live slot
    length: int  # one past the last live slot
    seen: torch.Tensor  # [B] long: real tokens each row has seen
    layer_config: tuple = ()
    conv: torch.Tensor | None = None  # [B, K - 1, 3 · H · D]: the last real q, k, v inputs

    def _live(self, i: int) -> torch.Tensor:
        return self.buffer.tensors[i].narrow(_SLOT_DIMS[i], self.start, self.length - self.start)

    @property
    def keys(self) -> torch.Tensor:  # [B, H, S, D] rotated keys
        return self._live(0)

    @property
    def values(self) -> torch.Tensor:  # [B, H, S, D]
        return self._live(1)

    @property
    def valid(self) -> torch.Tensor:  # [B, S] bool: the slot holds a real token
        return self._live(2)

    @property
    def positions(self) -> torch.Tensor:  # [B, S] long: position among the row's real tokens
        return self._live(3)

    @property
    def batch_size(self) -> int:
        return self.seen.shape[0]

    def nbytes(self) -> int:
        """Bytes of the live slots (keys, values, valid flags, positions) and counters."""
        live = sum(self._live(i).numel() * self._live(i).element_size() for i in range(4))
        conv = 0 if self.conv is None else self.conv.numel() * self.conv.element_size()
        return live + conv + self.seen.numel() * self.seen.element_size()

    def append(self, new: tuple[torch.Tensor, ...]) -> AttentionLayerCache:
        """This cache extended by ``new`` (keys, values, valid, positions of the new slots)."""
        n = new[0].shape[2]
        buffer, start, length = self.buffer, self.start, self.length
        capacity = buffer.tensors[0].shape[2]
        in_place = (
            buffer.filled == length
            and length + n <= capacity
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in new))
        )
        if not in_place:  # copy the live slots into a buffer with room to grow
            live = length - start
            capacity = max(2 * (live + n), 64)
            tensors = []
            for i, dim in enumerate(_SLOT_DIMS):
                shape = list(new[i].shape)
                shape[dim] = capacity
                t = new[i].new_empty(shape)
                t.narrow(dim, 0, live).copy_(self._live(i))
                tensors.append(t)
            buffer, start, length = _SlotBuffer(tuple(tensors), live), 0, live
        for t, x, dim in zip(buffer.tensors, new, _SLOT_DIMS, strict=True):
            t.narrow(dim, length, n).copy_(x)
        buffer.filled = length + n
        return AttentionLayerCache(
            buffer, start, length + n, self.seen, self.layer_config, self.conv
        )

    def drop_unreachable(self, window: int) -> AttentionLayerCache:
        """Drop leading slots that no later query can attend to (all beyond its window)."""
        reachable = self.valid & (self.positions > self.seen[:, None] - window)  # [B, S]
        any_reachable = reachable.any(0)
        first = int(any_reachable.float().argmax()) if bool(any_reachable.any()) else None
        start = self.length if first is None else self.start + first
        return AttentionLayerCache(
            self.buffer, start, self.length, self.seen, self.layer_config, self.conv
        )

    def reorder(self, beam_idx) -> AttentionLayerCache:
        """The cache whose row i is this cache's row beam_idx[i] (beam search)."""
        index = torch.as_tensor(beam_idx, dtype=torch.long, device=self.seen.device)
        live = tuple(self._live(i).index_select(0, index) for i in range(4))
        return AttentionLayerCache(
            _SlotBuffer(live, live[0].shape[2]),
            0,
            live[0].shape[2],
            self.seen.index_select(0, index),
            self.layer_config,
            None if self.conv is None else self.conv.index_select(0, index),
        )


def rotary_angles(positions: torch.Tensor, dim: int, theta: float, dtype) -> torch.Tensor:
    """RoPE angles of ``positions`` [B, T] for a head size ``dim``: [B, T, dim // 2]."""
    exponent = torch.arange(0, dim, 2, device=positions.device, dtype=dtype) / dim
    inv_freq = theta**-exponent  # [dim // 2]
    return positions.to(dtype)[..., None] * inv_freq


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head of x [B, T, H, D] by angles [B, T, D // 2]."""
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]  # [B, T, 1, D // 2]
    x1, x2 = x.float().chunk(2, dim=-1) if x.dtype != torch.float64 else x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head causal softmax attention with rotary position embeddings (Transformer++).

    Positions count each row's real tokens, so a padded row attends and rotates exactly as
    the same row without padding. Outputs at padding are 0.

    Args:
        hidden_size: model width.
        num_heads: attention heads.
        head_dim: per-head size (default hidden_size // num_heads); must be even (RoPE).
        window: attend only to the last ``window`` tokens (sliding window), or None.
        rope_theta: RoPE base.
        conv_size: kernel size of a short causal depthwise convolution (with SiLU) on q, k
            and v, as in the memory layers, or None for none (the standard Transformer++). It
            hands every token its neighbours' projections, so attention need not learn a
            previous-token head before it can match keys (docs/design.md §5).
        layer_idx: index of the layer in a model.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        window: int | None = None,
        rope_theta: float = 10000.0,
        conv_size: int | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        head_dim = resolve_head_dim(hidden_size, num_heads, head_dim)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
        if window is not None:
            check_positive_int("window", window)
        check_positive_float("rope_theta", rope_theta)
        if conv_size is not None:
            check_positive_int("conv_size", conv_size)
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.window, self.rope_theta, self.layer_idx = window, float(rope_theta), layer_idx
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        self.conv_size = conv_size
        # depthwise over the q, k, v channels together
        self.conv = None if conv_size is None else ShortConvolution(3 * inner, conv_size)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}, "
            f"conv_size={self.conv_size}"
        )

    def _layer_config(self) -> tuple:
        """The settings a cache must have been built with, as (name, value) pairs."""
        return (
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("window", self.window),
            ("rope_theta", self.rope_theta),
            ("conv_size", self.conv_size),
        )

    def state_size(self, T: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes the layer's cache holds after T tokens of ``batch_size`` unpadded rows."""
        slots = T if self.window is None else min(T, self.window)
        itemsize = torch.empty((), dtype=dtype).element_size()
        kv = 2 * self.num_heads * self.head_dim * itemsize
        conv = 0  # the last K - 1 real q, k, v inputs
        if self.conv is not None:
            conv = (self.conv_size - 1) * 3 * self.num_heads * self.head_dim * itemsize
        return batch_size * (slots * (kv + 1 + 8) + conv + 8)  # + valid, positions, seen

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: AttentionLayerCache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, AttentionLayerCache | None]:
        """Attend from the tokens of ``hidden_states`` to themselves and the cached tokens.

        Args:
            hidden_states: [B, T, hidden_size].
            attention_mask: [B, T] with 1 (or True) for real tokens and 0 for padding, or None.
            cache: the cache returned by an earlier call (these tokens continue those rows).
            use_cache: return the cache to continue from.

        Returns:
            (o [B, T, hidden_size], the cache or None).
        """
        check_hidden_states(hidden_states, self.hidden_size)
        B, T, _ = hidden_states.shape
        device = hidden_states.device
        check_layer_cache(cache, AttentionLayerCache, B, self._layer_config())
        mask = padding_mask(attention_mask, B, T, device)
        valid = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask
        seen = cache.seen if cache is not None else torch.zeros(B, dtype=torch.long, device=device)
        positions = seen[:, None] + valid.long().cumsum(1) - 1  # [B, T]
        positions = positions.clamp_min(0)

        H, D = self.num_heads, self.head_dim
        projections = (self.q_proj, self.k_proj, self.v_proj)
        conv = None
        if self.conv is None:
            q, k, v = (p(hidden_states).view(B, T, H, D) for p in projections)
        else:
            qkv = torch.cat([p(hidden_states) for p in projections], -1)  # [B, T, 3 · H · D]
            qkv, conv = self._short_conv(qkv, mask, None if cache is None else cache.conv)
            q, k, v = (t.reshape(B, T, H, D) for t in qkv.split(H * D, -1))
        angle_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        angles = rotary_angles(positions, D, self.rope_theta, angle_dtype)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        q, k = q.to(v.dtype), k.to(v.dtype)
        # SDPA reads masked keys with weight 0 (0 · NaN = NaN): non-finite inputs take the
        # guarded path (one token has no other token of its call to reach)
        finite = T == 1 or check_values((q, k, v))
        if not finite:  # a NaN at padding is never read: store padding finite
            pad = ~valid[:, None, :, None]
            k, v = (torch.where(pad, torch.nan_to_num(t, 0.0, 0.0, 0.0), t) for t in (k, v))
        new = (k, v, valid, positions)
        if cache is not None:
            if cache.keys.dtype != v.dtype:  # appending would round silently
                raise ValueError(
                    f"cache holds keys and values in {cache.keys.dtype}, this call computes "
                    f"{v.dtype} ones: continue a cache in the dtype (and autocast setting) "
                    "that built it"
                )
            cache = cache.append(new)
            k, v, key_valid, key_positions = cache.keys, cache.values, cache.valid, cache.positions
        else:
            key_valid, key_positions = valid, positions
        # (padding_mask returns None when nothing is padded; the cached slots' flags are
        # read on the host only where that is free: the masked path is right in every case)
        padded = mask is not None or (
            cache is not None and (not host_reads_free(key_valid) or not bool(key_valid.all()))
        )
        if not finite:
            o = self._attend_nonfinite(
                q, k, v, self._mask(valid, positions, key_valid, key_positions)
            )
        elif not padded and self.window is None and cache is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif not padded and self.window is None and T == 1:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            mask = self._mask(valid, positions, key_valid, key_positions)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o = o.transpose(1, 2).reshape(B, T, H * D)
        if mask is not None:
            o = o.masked_fill(~valid[..., None], 0.0)  # (not a product: a pad may be NaN)
        o = self.o_proj(o)
        if not use_cache:
            return o, None
        seen = seen + valid.long().sum(1)
        # a fresh cache holds the new tensors themselves; the first append copies them
        buffer, start, length = (
            (_SlotBuffer(new, T), 0, T)
            if cache is None
            else (cache.buffer, cache.start, cache.length)
        )
        cache = AttentionLayerCache(buffer, start, length, seen, self._layer_config(), conv)
        return o, cache if self.window is None else cache.drop_unreachable(self.window)

    def _short_conv(
        self, qkv: torch.Tensor, mask: torch.Tensor | None, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The short convolution of qkv [B, T, C] over each row's real tokens (``mask`` [B, T],
        None: all real) after the state [B, K - 1, C] of the row's earlier real tokens.

        A padded row convolves exactly as the same row without its padding: its real tokens
        are moved to the front (in order), convolved, and put back; the new state is the last
        K - 1 real inputs. Returns (output [B, T, C], the new state [B, K - 1, C]).
        """
        if mask is None:
            return self.conv(qkv, state)
        B, T, C = qkv.shape
        K = self.conv.kernel_size
        order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices  # real first
        index = order[..., None].expand(B, T, C)
        real_first = qkv.gather(1, index)  # [B, T, C]
        y, _ = self.conv(real_first, state)
        if state is None:
            state = qkv.new_zeros(B, K - 1, C)
        inputs = torch.cat([state.to(qkv.dtype), real_first], 1)  # [B, K - 1 + T, C]
        last = mask.long().sum(1)[:, None] + torch.arange(K - 1, device=qkv.device)  # [B, K - 1]
        new_state = inputs.gather(1, last[..., None].expand(B, K - 1, C))
        return torch.empty_like(y).scatter(1, index, y), new_state

    @staticmethod
    def _attend_nonfinite(q, k, v, allowed) -> torch.Tensor:
        """SDPA when q [B, H, T, D] or the keys and values k, v [B, H, S, D] hold NaN or inf.

        It runs on the inputs with the non-finite tokens zeroed, then sets to NaN the outputs
        of the queries that are non-finite or attend (``allowed`` [B, 1, T, S]) a non-finite
        key or value; their gradient is 0, so no NaN reaches an earlier token's either.
        """
        ok_q = torch.isfinite(q).all(-1)  # [B, H, T]
        ok_kv = torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1)  # [B, H, S]
        q = torch.where(ok_q[..., None], q, 0.0)
        k, v = (torch.where(ok_kv[..., None], t, 0.0) for t in (k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        reads_bad = ~ok_q | (allowed & ~ok_kv[:, :, None, :]).any(-1)  # [B, H, T]
        return o.masked_fill(reads_bad[..., None], math.nan)

    def _mask(self, valid, positions, key_valid, key_positions) -> torch.Tensor:
        """[B, 1, T, S + T] bool: which key slots each query may attend to.

        A query sees the real keys that arrived no later than itself (slot order is arrival
        order) and, with a window, lie fewer than ``window`` positions behind it. A padding
        query sees its own slot only, so that no softmax row is empty.
        """
        T, S_all = valid.shape[1], key_valid.shape[1]
        device = valid.device
        query_slot = torch.arange(S_all - T, S_all, device=device)  # [T]
        key_slot = torch.arange(S_all, device=device)  # [S_all]
        allowed = (key_slot[None, :] <= query_slot[:, None])[None] & key_valid[:, None, :]
        if self.window is not None:
            gap = positions[:, :, None] - key_positions[:, None, :]  # [B, T, S_all]
            allowed = allowed & (gap < self.window)
        own = key_slot[None, :] == query_slot[:, None]  # [T, S_all]
        allowed = torch.where(valid[:, :, None], allowed, own[None])
        return allowed[:, None]
