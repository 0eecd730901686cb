"""Precision rules shared by the ops: memory states and scans run in fp32 (fp64 for fp64)."""

from __future__ import annotations

import contextlib

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the scans run in for inputs like ``x``: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_off(device_type: str):
    """A context that disables autocast, so that it cannot lower the scans (a no-op, and no
    cost on the decode path, when autocast is not on)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
