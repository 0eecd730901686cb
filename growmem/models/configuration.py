"""GrowMemConfig: the Hugging Face configuration of growmem language models."""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedConfig

from growmem.layers.checks import check_memory_options
from growmem.models.cache import CACHE_FIELD
from growmem.ops.caching import check_caching_choices
from growmem.ops.checks import (
    LINEAR_RULES,
    check_bool,
    check_choice,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
)
from growmem.ops.deep import DEEP_RULES

ATTENTION = "attention"
RULES = (*LINEAR_RULES, *DEEP_RULES, ATTENTION)


class GrowMemConfig(PreTrainedConfig):
    """Configuration of a stack of pre-norm blocks (RMSNorm, mixer, RMSNorm, SwiGLU).

    Every mixer is a ``MemoryCachingAttention`` of ``rule`` with ``aggregation``, except the
    layers in ``attn_layers``, which are Transformer++ softmax attention (RoPE, causal SDPA,
    optional sliding window). ``rule="attention"`` makes every layer attention: the
    Transformer++ baseline.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width.
        num_hidden_layers: blocks.
        num_heads: heads of every mixer.
        head_dim: per-head size (default hidden_size // num_heads).
        intermediate_size: SwiGLU width (default 8/3 · hidden_size rounded up to 64).
        rule: linear | decay | delta | gated_delta | swla | dla | titans | attention.
        aggregation: none | residual | grm | soup | ssc | loglinear | mean (memory layers).
        segment_size: tokens per cached segment.
        top_k: caches ssc reads per token (default 2). Stored as ``ssc_top_k`` (also
            accepted as an argument; pass one of the two), because transformers reads a
            model config's ``top_k`` as the top-k of sampling.
        init: continuous | independent (memory at each segment start).
        summary: mean | sum (segment key summaries).
        attn_layers: indices of the layers that use softmax attention (hybrids).
        attn_window: sliding window of the attention layers, or None for full attention.
        max_position_embeddings: longest sequence (prompt + generated tokens) a forward
            accepts.
        rope_theta: RoPE base of the attention layers.
        tie_word_embeddings: share the input embedding and the output projection.
        norm_eps: epsilon of the RMSNorms.
        initializer_range: std of the normal init of linear and embedding weights.
        use_cache: return a cache from forward when not training.
        use_short_conv, conv_size, qk_norm, chunk_size: memory layers' short convolution,
            L2-normalised q/k and scan chunk length.
        expansion, mini_batch, eta_max, max_grad_norm, mlp_norm, decay_to: deep rules' MLP
            memory (see ``MemoryCachingAttention``). Titans models trained before growmem's
            decay toward the initial weights (docs/design.md §2.4) need ``decay_to="zero"``.
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
        rule: str = "gated_delta",
        aggregation: str = "grm",
        segment_size: int = 256,
        top_k: int | None = None,
        init: str = "continuous",
        summary: str = "mean",
        attn_layers: list[int] | tuple[int, ...] = (),
        attn_window: int | None = None,
        max_position_embeddings: int = 65536,
        rope_theta: float = 10000.0,
        tie_word_embeddings: bool = True,
        norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        use_short_conv: bool = True,
        conv_size: int = 4,
        qk_norm: bool = True,
        chunk_size: int = 64,
        expansion: int = 4,
        mini_batch: int = 64,
        eta_max: float = 0.1,
        max_grad_norm: float | None = 1.0,
        mlp_norm: bool = True,
        decay_to: str = "init",
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        use_cache: bool = True,
        ssc_top_k: int | None = None,
        **kwargs,
    ):
        # top_k is the argument's name everywhere else; the error names the one passed
        if top_k is not None and ssc_top_k is not None and top_k != ssc_top_k:
            raise ValueError(
                f"top_k ({top_k!r}) and ssc_top_k ({ssc_top_k!r}) name one setting: pass one"
            )
        if top_k is not None:
            check_positive_int("top_k", top_k)
        else:
            ssc_top_k = 2 if ssc_top_k is None else ssc_top_k
            check_positive_int("ssc_top_k", ssc_top_k)
        top_k = ssc_top_k if top_k is None else top_k
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_heads", num_heads),
            ("segment_size", segment_size),
            ("max_position_embeddings", max_position_embeddings),
        ):
            check_positive_int(name, value)
        check_memory_options(
            conv_size=conv_size,
            chunk_size=chunk_size,
            expansion=expansion,
            mini_batch=mini_batch,
            eta_max=eta_max,
            max_grad_norm=max_grad_norm,
            norm_eps=norm_eps,
            use_short_conv=use_short_conv,
            qk_norm=qk_norm,
            mlp_norm=mlp_norm,
            decay_to=decay_to,
        )
        check_nonnegative_float("initializer_range", initializer_range)
        check_bool("tie_word_embeddings", tie_word_embeddings)
        check_bool("use_cache", use_cache)
        check_choice("rule", rule, RULES)
        check_caching_choices(aggregation, init, summary)
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(
                    f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}) "
                    "unless head_dim is given"
                )
            head_dim = hidden_size // num_heads
        check_positive_int("head_dim", head_dim)
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
        check_positive_float("rope_theta", rope_theta)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_heads, self.head_dim = (
            num_hidden_layers,
            num_heads,
            head_dim,
        )
        self.intermediate_size = intermediate_size
        self.rule, self.aggregation, self.segment_size, self.ssc_top_k = (
            rule,
            aggregation,
            segment_size,
            top_k,
        )
        self.init, self.summary = init, summary
        self.attn_layers, self.attn_window = sorted(set(attn_layers)), attn_window
        self.max_position_embeddings, self.rope_theta = max_position_embeddings, float(rope_theta)
        self.norm_eps, self.initializer_range = norm_eps, initializer_range
        self.use_short_conv, self.conv_size, self.qk_norm = use_short_conv, conv_size, qk_norm
        self.chunk_size, self.expansion, self.mini_batch = chunk_size, expansion, mini_batch
        self.eta_max, self.max_grad_norm, self.mlp_norm = eta_max, max_grad_norm, mlp_norm
        self.decay_to = decay_to
        self.use_cache = use_cache
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def is_attention_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` uses softmax attention."""
        return self.rule == ATTENTION or layer_idx in self.attn_layers
