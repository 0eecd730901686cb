"""GrowMemConfig: the Hugging Face configuration of growmem language models."""

from __future__ import annotations

import warnings
from typing import ClassVar

from transformers import PreTrainedConfig

from growmem.layers.checks import resolve_head_dim
from growmem.layers.config import (
    FLAT_PATHS,
    MemoryConfig,
    flat_value,
    nested_from_flat,
    warn_flat,
    with_legacy_gates,
)
from growmem.models.cache import CACHE_FIELD
from growmem.ops.checks import (
    LINEAR_RULES,
    check_bool,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)
from growmem.ops.spec import DEEP_RULES

# The flat settings of earlier releases (``rule="attention"``: Transformer++). ``top_k`` is only
# taken as an argument: as an attribute transformers would read it as sampling's top-k.
FLAT_ARGUMENTS = frozenset(FLAT_PATHS)
ATTENTION = "attention"
RULES = (*LINEAR_RULES, *DEEP_RULES, ATTENTION)  # the values of the flat ``rule``
_DEFAULT_MEMORY = MemoryConfig()


def memory_from_flat(flat: dict, memory: dict | None = None) -> dict | None:
    """GrowMemConfig's ``memory`` dict of the flat settings of earlier releases (written over
    ``memory``, e.g. a base config's, see ``growmem.layers.config.nested_from_flat``); None for
    ``rule="attention"``, the Transformer++ (its other flat settings never applied)."""
    if flat.get("rule") == ATTENTION:
        return None
    return nested_from_flat(flat, memory)


class GrowMemConfig(PreTrainedConfig):
    """Configuration of a stack of pre-norm blocks (RMSNorm, mixer, RMSNorm, SwiGLU).

    Every mixer is a ``MemoryCachingAttention`` with the settings ``memory``, except the
    layers in ``attn_layers``, which are Transformer++ softmax attention (RoPE, causal SDPA,
    optional sliding window). ``memory=None`` makes every layer attention: the Transformer++
    baseline.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width.
        num_hidden_layers: blocks.
        num_heads: heads of every mixer.
        head_dim: per-head size (default hidden_size // num_heads).
        intermediate_size: SwiGLU width (default 8/3 · hidden_size rounded up to 64).
        memory: the memory layers' settings: a ``MemoryConfig`` (its memory and rule knobs,
            its caching choices, the layer's options) or its dict (``MemoryConfig.to_dict``:
            ``{"rule": "titans", "mini_batch": 16, "caching": {"aggregation": "grm",
            "segment_size": 16}}``), which is how config.json stores it; None: no memory
            layers. Default: gated_delta with grm over segments of 256 tokens.
        attn_layers: indices of the layers that use softmax attention (hybrids).
        attn_window: sliding window of the attention layers, or None for full attention.
        attn_conv_size: kernel size of a short causal convolution on the attention layers'
            q, k and v (as the memory layers have), or None for none: the standard
            Transformer++.
        max_position_embeddings: longest sequence (prompt + generated tokens) a forward
            accepts.
        rope_theta: RoPE base of the attention layers.
        tie_word_embeddings: share the input embedding and the output projection.
        norm_eps: epsilon of the RMSNorms (and of the memory layers' output norm).
        initializer_range: std of the normal init of linear and embedding weights.
        use_cache: return a cache from forward when not training.
        **kwargs: also the flat memory settings of earlier releases (rule, aggregation,
            segment_size, top_k or ssc_top_k, init, summary, chunk_size, expansion, mini_batch,
            eta_max, max_grad_norm, mlp_norm, decay_to, use_short_conv, conv_size, qk_norm;
            rule="attention": memory=None), which config.json files saved by them hold:
            converted to ``memory`` with a FutureWarning (save_pretrained writes the new form).
            Titans models trained before growmem's decay toward the initial weights
            (docs/design.md §2.4) need ``decay_to="zero"``.

    A saved config (``from_dict``, which ``from_pretrained`` uses) whose memory lacks the gate
    settings of today's defaults was saved before they existed and keeps the gates it had
    (``growmem.layers.config.with_legacy_gates``); a ``memory`` dict passed here takes today's
    defaults.
    """

    model_type = "growmem"
    # output fields the Trainer leaves out of predictions: the cache, under the installed name
    keys_to_ignore_at_inference: ClassVar[list[str]] = [CACHE_FIELD]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        head_dim: int | None = None,
        intermediate_size: int | None = None,
        memory: MemoryConfig | dict | None = _DEFAULT_MEMORY,
        attn_layers: list[int] | tuple[int, ...] = (),
        attn_window: int | None = None,
        attn_conv_size: int | None = None,
        max_position_embeddings: int = 65536,
        rope_theta: float = 10000.0,
        tie_word_embeddings: bool = True,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        flat = {k: kwargs.pop(k) for k in FLAT_ARGUMENTS & set(kwargs)}
        if flat:
            if memory is not _DEFAULT_MEMORY:
                raise ValueError(
                    f"pass memory or the deprecated flat settings {sorted(flat)}, not both"
                )
            memory = memory_from_flat(flat)
            warn_flat("GrowMemConfig", flat, f"pass memory={memory!r}")
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_heads", num_heads),
            ("max_position_embeddings", max_position_embeddings),
        ):
            check_positive_int(name, value)
        check_positive_float("norm_eps", norm_eps)
        check_nonnegative_float("initializer_range", initializer_range)
        check_bool("tie_word_embeddings", tie_word_embeddings)
        check_bool("use_cache", use_cache)
        head_dim = resolve_head_dim(hidden_size, num_heads, head_dim)
        if intermediate_size is None:
            intermediate_size = -(-8 * hidden_size // 3 // 64) * 64
        check_positive_int("intermediate_size", intermediate_size)
        attn_layers = list(attn_layers)
        for i in attn_layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_hidden_layers:
                raise ValueError(
                    f"attn_layers must hold layer indices in [0, {num_hidden_layers}), got "
                    f"{attn_layers}"
                )
        if attn_window is not None:
            check_positive_int("attn_window", attn_window)
        if attn_conv_size is not None:
            check_positive_int("attn_conv_size", attn_conv_size)
        check_positive_float("rope_theta", rope_theta)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_heads, self.head_dim = (
            num_hidden_layers,
            num_heads,
            head_dim,
        )
        self.intermediate_size = intermediate_size
        self.memory = memory  # checked (and a dict converted) by __setattr__
        self.attn_layers, self.attn_window = sorted(set(attn_layers)), attn_window
        self.attn_conv_size = attn_conv_size
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, float(rope_theta)
        self.norm_eps, self.initializer_range = norm_eps, initializer_range
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """The config of a saved ``config_dict`` (config.json; ``from_pretrained`` and the Auto
        classes call this): a memory dict saved before ``caching.gate_norm`` and
        ``gate_temperature`` existed gets the values it meant (``with_legacy_gates``; every
        memory dict saved since holds them). ``kwargs``: as transformers' ``from_dict``; a
        ``memory`` among them takes today's defaults.
        """
        if isinstance(config_dict, dict) and isinstance(config_dict.get("memory"), dict):
            config_dict = {**config_dict, "memory": with_legacy_gates(config_dict["memory"])}
        return super().from_dict(config_dict, **kwargs)

    def __setattr__(self, name, value):
        # config.memory always holds a checked MemoryConfig (or None), also when a dict is
        # assigned (from_pretrained's keyword overrides set attributes after __init__)
        if name == "memory" and value is not None:
            value = MemoryConfig.from_dict(value)
        elif name in FLAT_ARGUMENTS:
            raise AttributeError(
                f"GrowMemConfig.{name} is now config.memory.{FLAT_PATHS[name]}: assign a new "
                "config.memory (e.g. dataclasses.replace(config.memory, ...))"
            )
        super().__setattr__(name, value)

    def __getattr__(self, name):
        # only reached for names that are not attributes: the flat settings of earlier releases
        memory = self.__dict__.get("memory")
        if name not in FLAT_ARGUMENTS or name == "top_k" or "memory" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        warnings.warn(
            f"GrowMemConfig.{name} is deprecated: read config.memory.{FLAT_PATHS[name]}",
            FutureWarning,
            stacklevel=2,
        )
        if memory is None:
            if name == "rule":
                return ATTENTION
            raise AttributeError(f"a Transformer++ config (memory=None) has no {name!r}")
        return flat_value(memory, name)

    def to_dict(self) -> dict:
        """The configuration as plain values (``memory`` as its dict), for config.json."""
        output = super().to_dict()
        if self.memory is not None:
            output["memory"] = self.memory.to_dict()
        return output

    def is_attention_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` uses softmax attention."""
        return self.memory is None or layer_idx in self.attn_layers
