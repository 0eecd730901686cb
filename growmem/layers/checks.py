"""Argument checks shared by the token mixers."""

from __future__ import annotations

import torch

from growmem.ops.checks import check_positive_int, value_checks_enabled


def resolve_head_dim(hidden_size: int, num_heads: int, head_dim: int | None) -> int:
    """The per-head size: ``head_dim``, or hidden_size // num_heads when None (then
    num_heads must divide hidden_size); a ValueError names what is wrong."""
    check_positive_int("hidden_size", hidden_size)
    check_positive_int("num_heads", num_heads)
    if head_dim is None:
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
                "unless head_dim is given"
            )
        head_dim = hidden_size // num_heads
    check_positive_int("head_dim", head_dim)
    return head_dim


def check_hidden_states(hidden_states, hidden_size: int) -> None:
    """hidden_states must be a [B, T >= 1, hidden_size] tensor."""
    if (
        not isinstance(hidden_states, torch.Tensor)
        or hidden_states.dim() != 3
        or hidden_states.shape[-1] != hidden_size
        or hidden_states.shape[1] == 0
    ):
        shape = getattr(hidden_states, "shape", type(hidden_states).__name__)
        raise ValueError(
            f"hidden_states must have shape [B, T >= 1, {hidden_size}], got {tuple(shape)}"
        )


def check_layer_cache(cache, cache_type: type, batch_size: int, layer_config: tuple) -> None:
    """A cache handed to a layer must be of its type, batch size and configuration.

    Args:
        layer_config: the layer's settings as (name, value) pairs.
    """
    if cache is None:
        return
    if not isinstance(cache, cache_type):
        raise ValueError(f"cache must be a {cache_type.__name__}, got {type(cache).__name__}")
    if cache.batch_size != batch_size:
        raise ValueError(
            f"cache holds batch size {cache.batch_size}, hidden_states has {batch_size}"
        )
    if cache.layer_config != layer_config:
        built, here = dict(cache.layer_config), dict(layer_config)
        diffs = [
            f"{name}: cache has {built.get(name)!r}, layer has {here.get(name)!r}"
            for name in {**built, **here}
            if built.get(name) != here.get(name)
        ]
        raise ValueError("cache was built by a layer of another configuration: " + "; ".join(diffs))


def padding_mask(mask, batch_size: int, length: int, device) -> torch.Tensor | None:
    """``mask`` [B, T] (1/True real token, 0/False padding) as a bool tensor, or None when
    there is no padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch_size, length):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"attention_mask must have shape [B, T] = {(batch_size, length)}, got {shape}"
        )
    if mask.dtype != torch.bool:
        if value_checks_enabled(mask) and ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1 (or booleans)")
        mask = mask != 0
    # (whether a row is padded decides the shapes the layers compute with: a host read even
    # when the value checks are off; pass no mask when nothing is padded)
    return None if bool(mask.all()) else mask.to(device)
