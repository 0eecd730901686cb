"""Optional linear-family scans through flash-linear-attention (fla) kernels on CUDA.

``chunk_linear_memory`` calls ``fla_op`` first: when it returns an fla op, the scan runs there
(``fla_linear_memory``) instead of growmem's PyTorch chunk path, which stays the fallback and
the reference. The choice is the setting ``scan_impl`` (an argument of chunk_linear_memory; in
Memory Caching and the models, ``MatrixMemory.scan_impl``):

    auto   fla for CUDA tensors of a rule fla covers, when fla is importable at a tested
           version (``FLA_VERSIONS``); else the PyTorch path. A missing or incompatible fla
           gives one warning per process, never an error; CPU tensors never try fla.
    torch  always the PyTorch chunk path.
    fla    always fla: a ValueError (the input) or ImportError (the package) when it cannot.

Conventions, growmem -> fla (fla >= 0.5, both time-first [B, T, H, D]):

    rule          fla op                                    growmem state S_t
    linear        chunk_simple_gla(g=None)                  S + v k^T
    decay         chunk_simple_gla(g)                       a S + v k^T
    delta         chunk_delta_rule(beta)                    S + β (v - S k) k^T
    gated_delta   chunk_gated_delta_rule(g, beta)           a S + β (v - a S k) k^T
    swla          none (PyTorch path)

- state: growmem's S is [B, H, Dv, Dk] (o = S q), fla's h is [B, H, Dk, Dv] (o = h^T q): a
  transpose each way (fla 0.5.0 has no ``state_v_first``).
- scale: growmem reads o_t = S_t q_t unscaled; fla's default is Dk^-0.5: pass scale=1.
- gates: g is a natural-log decay a_t = exp(g_t) [B, T, H] in both; beta [B, T, H] is the
  write strength itself (no sigmoid in the kernel). q and k are normalised by the layer, so
  fla's in-kernel L2 norm stays off.
- per-segment states: fla's public ops return only the final state, so the state after each
  requested token count comes from chained calls, each starting from the previous call's
  final state (``initial_state``); gradients flow through the chain and fla's autograd.
- precision: fla runs its matmuls in the input dtype (bf16 in bf16 models) with fp32
  accumulation and fp32 states; growmem's path computes in fp32. float64 inputs never go to
  fla (its kernels have no float64).
"""

from __future__ import annotations

import functools
import warnings

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from growmem.ops.checks import check_choice
from growmem.ops.precision import compute_dtype
from growmem.ops.spec import SCAN_IMPLS

# The fla releases whose public ops have the signatures used here (checked against 0.5.0,
# 0.5.2 and 0.6.0); keep equal to the ``fla`` extra in pyproject.toml.
FLA_VERSIONS = SpecifierSet(">=0.5.0,<0.7")
# Where and in which dtypes fla's Triton kernels run.
FLA_DEVICE_TYPES = ("cuda",)
FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The growmem rules an fla op computes, and the gates each op takes.
FLA_GATES = {"linear": (), "decay": ("g",), "delta": ("beta",), "gated_delta": ("g", "beta")}

_warned: set[str] = set()  # the fallback reasons already warned about (one warning each)


@functools.cache
def load_fla() -> tuple[dict | None, str]:
    """({rule: fla op}, "") when fla is importable at a version in ``FLA_VERSIONS``, else
    (None, why not). Imported on first use and remembered (``load_fla.cache_clear()``
    forgets it)."""
    try:
        import fla
        from fla.ops import chunk_delta_rule, chunk_gated_delta_rule, chunk_simple_gla
    # a broken install (a Triton or CUDA mismatch) must fall back too, whatever it raises
    except Exception as error:
        return None, (
            f"flash-linear-attention is not importable ({type(error).__name__}: {error}); "
            "pip install 'growmem[fla]'"
        )
    version = str(getattr(fla, "__version__", "unknown"))
    try:
        supported = Version(version) in FLA_VERSIONS
    except InvalidVersion:
        supported = False
    if not supported:
        return None, (
            f"flash-linear-attention {version} is outside the tested range '{FLA_VERSIONS}'; "
            "pip install 'growmem[fla]'"
        )
    ops = {"linear": chunk_simple_gla, "decay": chunk_simple_gla, "delta": chunk_delta_rule}
    return {**ops, "gated_delta": chunk_gated_delta_rule}, ""


def fla_op(scan_impl: str, rule: str, q: torch.Tensor):
    """The fla op that should compute ``rule`` on tensors like ``q``, or None for growmem's
    PyTorch path.

    Args:
        scan_impl: auto | torch | fla.
        rule: the memory rule.
        q: the queries (their device and dtype decide).

    Raises:
        ValueError: a bad scan_impl, or scan_impl "fla" for a rule, device or dtype fla does
            not cover. ImportError: scan_impl "fla" without a usable fla.
    """
    check_choice("scan_impl", scan_impl, SCAN_IMPLS)
    if scan_impl == "torch":
        return None
    why = None
    if rule not in FLA_GATES:
        why = f"rule {rule!r} has no fla kernel (fla covers {list(FLA_GATES)})"
    elif q.device.type not in FLA_DEVICE_TYPES:
        why = f"fla's kernels run on {list(FLA_DEVICE_TYPES)}, the tensors are on {q.device}"
    elif q.dtype not in FLA_DTYPES:
        why = f"fla's kernels take {[str(d) for d in FLA_DTYPES]}, got {q.dtype}"
    if why is not None:  # the PyTorch path is the expected one here: no warning for auto
        if scan_impl == "fla":
            raise ValueError(f"scan_impl 'fla' cannot run: {why}")
        return None
    ops, why = load_fla()
    if ops is None:
        if scan_impl == "fla":
            raise ImportError(f"scan_impl 'fla' cannot run: {why}")
        if why not in _warned:
            _warned.add(why)
            warnings.warn(
                f"scan_impl 'auto': {why}. The linear-family scans use growmem's PyTorch "
                "chunk path (correct, slower on GPUs).",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    return ops[rule]


def fla_linear_memory(
    op,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rule: str,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    ends: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``chunk_linear_memory``'s contract computed by the fla ``op`` (from ``fla_op``).

    Args:
        op: the fla op of ``rule``.
        q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H] as the rule needs.
        rule: linear, decay, delta or gated_delta.
        initial_state: [B, H, Dv, Dk] or None (zeros).
        ends: token counts (1..T) after which to return the state; None returns the final one.

    Returns:
        o: [B, T, H, Dv]; states: [B, H, Dv, Dk] or [B, len(ends), H, Dv, Dk]; both in the
        compute dtype (float32).
    """
    T = q.shape[1]
    dtype = compute_dtype(q)
    # fla's kernels take q, k, v of one dtype (growmem's path casts each to the compute dtype)
    # and accumulate the log-decays in fp32 (the compute dtype)
    k, v = k.to(q.dtype), v.to(q.dtype)
    g = None if g is None else g.to(dtype)
    gates = {n: x for n, x in (("g", g), ("beta", beta)) if n in FLA_GATES[rule]}
    extra = {"use_qk_l2norm_in_kernel": False} if "beta" in gates else {}
    # fla's state layout [B, H, Dk, Dv], in fp32 as its kernels keep it
    h = None if initial_state is None else initial_state.transpose(-1, -2).to(dtype)
    outputs, after = [], {}
    start = 0
    for end in sorted({*(ends or ()), T}):  # one call per piece, chained through the state
        o, h = op(
            q[:, start:end],
            k[:, start:end],
            v[:, start:end],
            **{n: x[:, start:end] for n, x in gates.items()},
            scale=1.0,
            initial_state=h,
            output_final_state=True,
            **extra,
        )
        outputs.append(o)
        after[end] = h
        start = end
    o = torch.cat(outputs, 1).to(dtype)  # [B, T, H, Dv]
    if ends is None:
        return o, h.transpose(-1, -2).to(dtype)
    states = torch.stack([after[e] for e in ends], 1)  # [B, P, H, Dk, Dv]
    return o, states.transpose(-1, -2).to(dtype)
