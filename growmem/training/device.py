"""Where a run computes: the device a setting names, and the random states a checkpoint keeps
for it."""

from __future__ import annotations

from typing import Any

import torch


def parse_device(name: str, setting: str = "train.device") -> torch.device | None:
    """The torch device a device setting names (None for "auto"), without checking that this
    machine has it.

    Raises:
        ValueError: ``name`` is no device string.
    """
    if name == "auto":
        return None
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"{setting} must be 'auto', 'cpu', 'cuda', 'cuda:N' or another torch device such "
            f"as 'mps', got {name!r}"
        ) from None


def resolve_device(
    name: str, setting: str = "train.device", local_rank: int = 0, world_size: int = 1
) -> torch.device:
    """The device ``name`` stands for on this machine, checked to be usable.

    Args:
        name: "auto" (cuda if available, else cpu), "cpu", "cuda" (cuda:``local_rank``),
            "cuda:N" or another torch device string ("mps", ...).
        setting: what ``name`` came from, for messages (``train.device``, ``--device``).
        local_rank: this process's GPU under torchrun.
        world_size: processes of the launch; each takes its own GPU, so "cuda:N" (one GPU
            for all) is refused when there are several.

    Raises:
        ValueError: a malformed name, or a device this machine does not have.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = parse_device(name, setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting}={name!r}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif world_size > 1:
            raise ValueError(
                f"{setting}={name!r} names one GPU for all {world_size} processes; use "
                f"{setting}=cuda (each process takes cuda:LOCAL_RANK)"
            )
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{setting}={name!r}: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            message = " ".join(str(error).split())
            raise ValueError(f"{setting}={name!r} is not usable here: {message}") from None
    return device


def rng_states(device: torch.device) -> dict[str, Any]:
    """The random states a checkpoint keeps: the CPU generator's and, on a GPU, the GPU's."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device) -> None:
    """Put back what ``rng_states`` saved. A GPU state is restored only on a GPU (a run moved
    to the CPU has no GPU generator to restore)."""
    torch.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in states:
        torch.cuda.set_rng_state(states["cuda_rng"], device)
