"""The keyword form of ``memory_caching`` before the memory and caching objects (one release).

``memory_caching(q, k, v, u, rule="gated_delta", g=g, beta=beta, segment_size=256,
aggregation="grm", ...)`` still works: ``from_keywords`` turns its keywords into the objects
the op takes now, with a FutureWarning that names the new form.
"""

from __future__ import annotations

import warnings

from growmem.ops.checks import LINEAR_RULES
from growmem.ops.spec import DEEP_RULES, LEGACY_GATE_NORM, Caching, memory_spec

GATES = ("g", "beta", "lam", "eta")
CACHING = ("segment_size", "segments", "aggregation", "top_k", "init", "summary", "gate_scale")
DEEP_KNOBS = ("norm", "max_grad_norm", "eps", "decay_to")
KEYWORDS = ("rule", *GATES, *CACHING, "chunk_size", "mini_batch", *DEEP_KNOBS)

MESSAGE = (
    "memory_caching's keyword form (rule=, g=, beta=, lam=, eta=, segment_size=, segments=, "
    "aggregation=, top_k=, init=, summary=, gate_scale=, chunk_size=, mini_batch=, norm=, "
    "max_grad_norm=, eps=, decay_to=) is deprecated and will be removed in the next release: "
    "pass memory=MatrixMemory(rule, chunk_size=...) or DeepMemory(rule, mini_batch=..., ...), "
    "caching=Caching(aggregation, segment_size=..., ...) and gates={'g': g, 'beta': beta, ...} "
    "(growmem.ops.spec)"
)


def from_keywords(memory, caching, gates, keywords: dict):
    """(memory, caching, gates) from the old keywords, with a FutureWarning.

    As before, the deep rules' knobs norm, eps and decay_to are ignored for matrix rules, and
    chunk_size for deep rules; mini_batch and max_grad_norm given to a matrix rule are errors.
    The keyword form predates ``gate_norm`` and cannot name it: its gates stay the scaled dot
    product (``LEGACY_GATE_NORM``), as they were.
    """
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise TypeError(f"memory_caching() got unexpected keyword arguments {unknown}")
    if memory is not None or caching is not None or gates is not None:
        raise TypeError(
            "memory_caching takes memory=, caching= and gates=, or the deprecated keywords "
            f"{sorted(keywords)}, not both"
        )
    if "rule" not in keywords:
        raise TypeError("memory_caching() needs memory= (e.g. MatrixMemory('gated_delta'))")
    warnings.warn(MESSAGE, FutureWarning, stacklevel=3)
    rule = keywords["rule"]
    if rule in DEEP_RULES:
        knobs = {n: keywords[n] for n in DEEP_KNOBS if n in keywords}
        if keywords.get("mini_batch") is not None:  # None: the default
            knobs["mini_batch"] = keywords["mini_batch"]
    elif rule in LINEAR_RULES:
        knobs = {"chunk_size": keywords["chunk_size"]} if "chunk_size" in keywords else {}
        for name in ("mini_batch", "max_grad_norm"):
            if keywords.get(name) is not None:
                raise ValueError(f"{name} is only used by the deep rules {list(DEEP_RULES)}")
    else:  # memory_spec names the known rules
        knobs = {}
    return (
        memory_spec(rule, **knobs),
        Caching(**{n: keywords[n] for n in CACHING if n in keywords}, gate_norm=LEGACY_GATE_NORM),
        {n: keywords[n] for n in GATES if keywords.get(n) is not None},
    )
