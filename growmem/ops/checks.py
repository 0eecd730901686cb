"""Argument checks shared by the ops: every bad input becomes a ValueError naming the argument."""

from __future__ import annotations

import contextlib
import math
import os

import torch

LINEAR_RULES = ("linear", "decay", "delta", "gated_delta", "swla")

# Per-token gates each rule reads: g (log-decay), beta (write strength), lam (current-token weight).
RULE_GATES: dict[str, tuple[str, ...]] = {
    "linear": (),
    "decay": ("g",),
    "delta": ("beta",),
    "gated_delta": ("g", "beta"),
    "swla": ("g", "beta", "lam"),
}


def check_tensor(name: str, x, ndim: int, layout: str) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of rank ``ndim``; ``layout`` names its dims."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_shape(name: str, x: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}"
        )


def check_positive_int(name: str, x, allow_none: bool = False) -> None:
    if x is None and allow_none:
        return
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")


def _is_real(x) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_positive_float(name: str, x, allow_none: bool = False) -> None:
    """``x`` must be a finite number > 0 (an int or float; None too when ``allow_none``)."""
    if x is None and allow_none:
        return
    if not (_is_real(x) and x > 0):
        expected = "a positive finite number" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {x!r}")


def check_float(name: str, x, allow_none: bool = False) -> None:
    """``x`` must be a finite number (an int or float; None too when ``allow_none``)."""
    if x is None and allow_none:
        return
    if not _is_real(x):
        expected = "a finite number" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {x!r}")


def check_nonnegative_float(name: str, x) -> None:
    """``x`` must be a finite number >= 0 (an int or float)."""
    if not (_is_real(x) and x >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")


def check_bool(name: str, x) -> None:
    """``x`` must be True or False (not a string such as 'no', nor a number)."""
    if not isinstance(x, bool):
        raise ValueError(f"{name} must be True or False, got {x!r}")


def check_choice(name: str, x, choices) -> None:
    if x not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {x!r}")


def check_qkv(q, k, v) -> tuple[int, int, int, int, int]:
    """Check q, k: [B, T, H, Dk] and v: [B, T, H, Dv]; returns (B, T, H, Dk, Dv)."""
    check_tensor("q", q, 4, "[B, T, H, Dk]")
    check_tensor("k", k, 4, "[B, T, H, Dk]")
    check_tensor("v", v, 4, "[B, T, H, Dv]")
    B, T, H, Dk = q.shape
    check_shape("k", k, (B, T, H, Dk), "[B, T, H, Dk] like q")
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"v must have shape [B, T, H, Dv] with B, T, H = {(B, T, H)} as q, got {tuple(v.shape)}"
        )
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    # (an empty batch, B = 0, is fine: its outputs and states are empty)
    if H < 1 or Dk < 1:
        raise ValueError(f"q must have H >= 1 heads of Dk >= 1 dims, got shape {tuple(q.shape)}")
    if v.shape[-1] < 1:
        raise ValueError(f"v must have Dv >= 1 dims, got shape {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return B, T, H, Dk, v.shape[-1]


def check_gates(rule: str, B: int, T: int, H: int, **gates) -> None:
    """Check that exactly the gates ``rule`` needs are given, each of shape [B, T, H] (their
    values: ``check_values``)."""
    check_choice("rule", rule, LINEAR_RULES)
    needed = RULE_GATES[rule]
    for name, x in gates.items():
        if name in needed:
            if x is None:
                raise ValueError(f"{name} is required by rule {rule!r}: a [B, T, H] tensor")
            check_tensor(name, x, 3, "[B, T, H]")
            check_shape(name, x, (B, T, H), "[B, T, H]")
        elif x is not None:
            raise ValueError(
                f"{name} is not used by rule {rule!r} (it reads {list(needed)}); pass {name}=None"
            )


# The range of each per-token gate's finite values, and why (a non-finite value is a failed
# activation, carried causally like a non-finite q, k or v: ops/nonfinite.py). eta scales the
# inner gradient steps, which must not ascend; titans' beta is a momentum, kept in [0, 1].
_GATE_RANGES = {
    "eta": (lambda x: x >= 0, "must be >= 0 (inner learning rates)"),
}
_TITANS_BETA = (lambda x: (x >= 0) & (x <= 1), "must lie in [0, 1] (titans' momentum)")


# The debug switch of the checks that read tensor values: True runs them always (even while
# torch.compile traces, at the cost of a graph break each), False never, None (the default)
# where reading values costs no device synchronisation: in eager mode on CPU tensors.
_ENV_DEBUG_CHECKS = "GROWMEM_DEBUG_CHECKS"


def _env_debug_checks() -> bool | None:
    """GROWMEM_DEBUG_CHECKS as the switch: 1 on, 0 off, unset or empty: automatic."""
    raw = os.environ.get(_ENV_DEBUG_CHECKS, "").strip()
    if raw == "":
        return None
    if raw in ("0", "1"):
        return raw == "1"
    raise ValueError(f"{_ENV_DEBUG_CHECKS} must be 0, 1 or unset, got {raw!r}")


_debug_checks: bool | None = _env_debug_checks()  # read once: the hot path reads no env


def set_debug_checks(enabled: bool | None) -> None:
    """Switch the value checks (``check_values`` and the other checks that read tensor
    values) on (True), off (False) or back to automatic (None: on in eager mode for CPU
    tensors, off on accelerators and while torch.compile traces). The environment variable
    GROWMEM_DEBUG_CHECKS=1 (or 0), read when growmem is imported, sets the starting value.
    See docs/design.md §2.3.

    Args:
        enabled: True, False or None.
    """
    global _debug_checks
    if enabled is not None:
        check_bool("enabled", enabled)
    _debug_checks = enabled


@contextlib.contextmanager
def debug_checks(enabled: bool | None = True):
    """``set_debug_checks(enabled)`` inside a ``with`` block, the previous setting after it."""
    global _debug_checks
    previous = _debug_checks
    set_debug_checks(enabled)
    try:
        yield
    finally:
        _debug_checks = previous


def host_reads_free(*tensors: torch.Tensor) -> bool:
    """Whether reading the values of ``tensors`` on the host is free: in eager mode (not while
    torch.compile traces, where it breaks the graph) and on CPU (elsewhere it waits for the
    device). Code that may branch on tensor values (checks, routing with Python lists) asks
    here first, and takes a path of static shapes when not."""
    if torch.compiler.is_compiling():
        return False
    return all(x.device.type == "cpu" for x in tensors)


def value_checks_enabled(*tensors: torch.Tensor) -> bool:
    """Whether the checks that read the values of ``tensors`` run: the debug switch
    (``set_debug_checks``, GROWMEM_DEBUG_CHECKS) when set, else ``host_reads_free``."""
    return host_reads_free(*tensors) if _debug_checks is None else _debug_checks


def check_values(
    inputs: tuple[torch.Tensor, ...] = (),
    gates: dict[str, torch.Tensor | None] | None = None,
    rule: str | None = None,
) -> bool:
    """Every check of the ops that reads tensor values, in one host synchronisation.

    Reading values synchronises with the device, so all such checks live here and run only
    when ``value_checks_enabled`` (the debug switch; by default in eager mode on CPU). They
    are: the range of the finite values of each per-token gate of ``rule`` (eta >= 0;
    titans' beta in [0, 1]; None is skipped), an error when
    violated; and whether ``inputs`` (e.g. q, k, v, u) and the gates are finite, which is not
    an error: a NaN or inf is a failed activation upstream, and the ops carry it causally
    (ops/nonfinite.py: the outputs that read it are NaN, earlier ones and their gradients are
    untouched).

    Returns:
        True when every tensor of ``inputs`` and ``gates`` is finite. (A sum that overflows
        counts as non-finite: that only costs the guarded path.) False, without reading any
        value, when the checks are off: the caller then takes the guarded path, which gives
        the same numbers on finite inputs (ops/nonfinite.py) and needs no host read.

    Raises:
        ValueError naming the first gate with a finite value outside its range.
    """
    present = {name: x for name, x in (gates or {}).items() if x is not None}
    tensors = [*inputs, *present.values()]
    if not tensors:
        return True
    if not value_checks_enabled(*tensors):
        return False
    ranges = {
        name: _TITANS_BETA if (rule, name) == ("titans", "beta") else _GATE_RANGES[name]
        for name in present
        if name in _GATE_RANGES or (rule, name) == ("titans", "beta")
    }
    # finite values out of range (a non-finite one is carried, not an error)
    flags = [
        (~ranges[name][0](x) & torch.isfinite(x)).any()
        for name, x in present.items()
        if name in ranges
    ]
    flags += [~torch.isfinite(x.sum()) for x in tensors]  # one pass each, no full-size mask
    bad = torch.stack(flags).tolist()  # the one host synchronisation
    for name, is_bad in zip(ranges, bad[: len(ranges)], strict=True):
        if is_bad:
            raise ValueError(f"{name} {ranges[name][1]}")
    return not any(bad[len(ranges) :])


def check_state(name: str, x, expected: tuple[int, ...], layout: str) -> None:
    if x is None:
        return
    check_tensor(name, x, len(expected), layout)
    check_shape(name, x, expected, layout)
