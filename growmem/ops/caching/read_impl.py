"""Which implementation computes Memory Caching's reads of cached matrix memories: PyTorch
(``reads.py``) or the Triton kernels (``triton_reads.py``, the optional extra
``growmem[triton]``). ``memory_caching``'s ``impl`` argument chooses; this module resolves it
without importing triton unless the kernels are wanted.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys

import torch

# memory_caching's impl: "auto" picks "triton" for CUDA tensors when triton imports, else
# "chunk" (the PyTorch chunkwise path); "reference" is the per-token loop.
IMPLS = ("auto", "chunk", "triton", "reference")
# those of a layer (MemoryConfig.impl), which streams: no per-token reference
LAYER_IMPLS = ("auto", "chunk", "triton")
# the reads a backend is built with (MemoryBackend.reads)
READS = ("torch", "triton")
# compute dtypes the kernels take (memory_caching computes in float32, or float64 for float64
# inputs, which stay on torch)
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INSTALL = "pip install 'growmem[triton]'"


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` works (tried once per process)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether the Triton interpreter runs the kernels (TRITON_INTERPRET=1): they then take CPU
    tensors. The variable must be set before growmem first imports the kernels."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_reads(impl: str, dtype: torch.dtype, device: torch.device) -> str:
    """The reads ("torch" or "triton") of ``memory_caching(..., impl=impl)`` for states of
    ``dtype`` on ``device``.

    Raises:
        ImportError: impl "triton" without triton installed (names the extra to install).
        ValueError: impl "triton" for a CPU tensor outside the Triton interpreter, or for a
            compute dtype the kernels do not take (float64).
    """
    if impl == "auto":
        usable = device.type == "cuda" and dtype in TRITON_DTYPES
        return "triton" if usable and triton_importable() else "torch"
    if impl != "triton":
        return "torch"
    if not triton_importable():
        raise ImportError(f"impl='triton' needs the triton package: {INSTALL}")
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"impl='triton' computes in float32, float16 or bfloat16, but these inputs compute "
            f"in {dtype} (float64 inputs): use impl='chunk'"
        )
    if device.type != "cuda":
        kernels = sys.modules.get("growmem.ops.caching.triton_reads")
        if not interpreting() or (kernels is not None and not kernels.INTERPRETED):
            raise ValueError(
                f"impl='triton' runs on CUDA tensors, or on CPU in the Triton interpreter "
                f"(TRITON_INTERPRET=1 set before growmem first runs the kernels); the inputs "
                f"are on {device.type}: use impl='auto' or 'chunk'"
            )
    return "triton"
