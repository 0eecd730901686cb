"""GrowMemModel and GrowMemForCausalLM: growmem language models on the Hugging Face stack."""

from __future__ import annotations

import hashlib
import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from growmem.layers import Attention, MemoryCachingAttention, RMSNorm, SwiGLU
from growmem.layers.checks import padding_mask
from growmem.models.cache import CACHE_FIELD, GrowMemCache
from growmem.models.configuration import GrowMemConfig
from growmem.ops.checks import check_tensor, value_checks_enabled

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# GrowMemConfig arguments that shape neither a model's state nor what it computes per token:
# caches carry over between models differing only in these.
_NOT_IN_FINGERPRINT = frozenset(
    {
        "self",
        "kwargs",
        "use_cache",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "initializer_range",
        "max_position_embeddings",
        "tie_word_embeddings",
    }
)


def cache_fingerprint(config: GrowMemConfig) -> dict:
    """The configuration a GrowMemCache is built for: every GrowMemConfig argument except
    those in ``_NOT_IN_FINGERPRINT`` (so that a new config option is included by default),
    the memory settings one by one (``memory.rule``, ``memory.caching.segment_size``, ...)."""
    names = inspect.signature(type(config).__init__).parameters
    values = {n: getattr(config, n, None) for n in names if n not in _NOT_IN_FINGERPRINT}
    if values["memory"] is not None:
        values.update({f"memory.{k}": v for k, v in values.pop("memory").settings()})
    return values


def _one_cache(cache, past_key_values):
    """The cache passed as ``cache`` or under its older name ``past_key_values`` (transformers
    before 5.24 passes that one during generate)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as cache or as past_key_values (its older name), not both")
    return past_key_values if cache is None else cache


class GrowMemBlock(nn.Module):
    """Pre-norm block: x + mixer(RMSNorm(x)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, config: GrowMemConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        if config.is_attention_layer(layer_idx):
            self.mixer = Attention(
                config.hidden_size,
                config.num_heads,
                head_dim=config.head_dim,
                window=config.attn_window,
                rope_theta=config.rope_theta,
                conv_size=config.attn_conv_size,
                layer_idx=layer_idx,
            )
        else:
            self.mixer = MemoryCachingAttention(
                config.hidden_size,
                config.num_heads,
                config.memory,
                head_dim=config.head_dim,
                norm_eps=config.norm_eps,
                layer_idx=layer_idx,
            )
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        # output projections get the scaled init of residual branches
        self.mixer.o_proj.is_residual_output = True
        self.mlp.down_proj.is_residual_output = True

    def forward(self, x, attention_mask=None, cache=None, use_cache=False):
        """x: [B, T, hidden]; returns (x after the block, the mixer's cache or None)."""
        h, cache = self.mixer(self.mixer_norm(x), attention_mask, cache=cache, use_cache=use_cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class GrowMemPreTrainedModel(PreTrainedModel):
    """Weight init and the Hugging Face plumbing shared by the growmem models."""

    config_class = GrowMemConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["GrowMemBlock"]
    _supports_sdpa = True

    def __init__(self, config: GrowMemConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        # drawn before any submodule exists (their constructors draw from the global RNG as
        # much as their sizes ask): the seed of this model's init streams
        self._init_seed = int(torch.randint(0, 2**62, (), device="cpu").item())

    def initialize_weights(self) -> None:
        """Initialise every weight, each module from a random stream of its own (paired starts).

        One draw from the global RNG, made when the model is constructed and before any of its
        modules, seeds the model; a module's stream is seeded by that draw and the module's
        name. So models built after the same ``torch.manual_seed`` that differ only in their
        Memory Caching aggregation share every weight they have in common, bit for bit (the
        gate queries' rows of ``in_proj`` draw from a stream of their own), and a comparison of
        base, residual, grm, soup and ssc starts from the same network.
        """
        streams = _InitStreams(self, self._init_seed)
        models = [m for m in self.modules() if isinstance(m, GrowMemPreTrainedModel)]
        for model in models:  # transformers hands nested models' modules to their own init
            model._init_streams = streams
        try:
            super().initialize_weights()
        finally:
            for model in models:
                del model._init_streams

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, std divided by
        sqrt(2 · layers) for the projections that write into the residual stream (GPT-2), zero
        biases; growmem layers' own parameters (decay rates, MLP memories, conv taps) get the
        init their layer defines. Values are drawn on the CPU from the module's stream
        (``initialize_weights``), so a model starts the same on every device."""
        streams = getattr(self, "_init_streams", None)
        stream = _InitStreams.fresh if streams is None else streams.generator
        std = self.config.initializer_range

        def normal(shape, std, part=""):
            return torch.empty(shape, device="cpu").normal_(
                0.0, std, generator=stream(module, part)
            )

        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_output", False):
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.copy_(module.weight, normal(module.weight.shape, std))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.copy_(module.weight, normal(module.weight.shape, std))
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        if isinstance(module, MemoryCachingAttention) and module.gate_query_rows is not None:
            # The ungated layers' in_proj rows (q, k, v, z) from in_proj's stream, the gate
            # queries' rows from their own: base and gated models share q, k, v and z.
            weight, rows = module.in_proj.weight, module.gate_query_rows
            shared = torch.empty(
                weight.shape[0] - (rows.stop - rows.start), weight.shape[1], device="cpu"
            )
            shared.normal_(0.0, std, generator=stream(module.in_proj))
            u = normal((rows.stop - rows.start, weight.shape[1]), std, ".gate_queries")
            init.copy_(weight, torch.cat([shared[: rows.start], u, shared[rows.start :]]))
        if hasattr(module, "initial_parameters"):  # growmem layers with parameters of their own
            values = module.initial_parameters(generator=stream(module))
            for name, value in values.items():
                init.copy_(getattr(module, name), value)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not create a DynamicCache: the model creates its GrowMemCache
        return False


class _InitStreams:
    """The random streams of one ``initialize_weights`` call: one CPU generator per module,
    seeded by the model's seed and the module's qualified name."""

    def __init__(self, model: nn.Module, seed: int):
        self.seed = seed
        self.names = {id(m): name for name, m in model.named_modules()}

    def generator(self, module: nn.Module, part: str = "") -> torch.Generator:
        name = self.names.get(id(module))
        if name is None:  # a module added after the call began: a fresh stream
            return self.fresh(module)
        digest = hashlib.blake2b(f"{self.seed}/{name}{part}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    @staticmethod
    def fresh(module: nn.Module, part: str = "") -> torch.Generator:
        """A stream seeded from the global RNG (``_init_weights`` called on its own, e.g. for
        resized embeddings)."""
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), device="cpu").item()))


class GrowMemModel(GrowMemPreTrainedModel):
    """Embeddings, blocks and the final norm; returns the last hidden states."""

    def __init__(self, config: GrowMemConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            GrowMemBlock(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: GrowMemCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: GrowMemCache | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the blocks over new tokens, continuing ``cache`` when given.

        Accepts exactly the keyword arguments that ``generate`` passes (transformers 5.23 to
        5.25); any other is a TypeError.

        Args:
            input_ids: [B, T] integer token ids in [0, vocab_size), B, T >= 1 (or
                ``inputs_embeds`` [B, T, hidden_size], floating point).
            attention_mask: [B, T] or [B, past + T] (as ``generate`` passes it): 1 for real
                tokens, 0 for padding. Real tokens' outputs do not depend on the padding.
            cache: the GrowMemCache of an earlier call of this model, or None.
            use_cache: return the cache (default: config.use_cache, off while training).
            output_attentions: only None/False: growmem's mixers have no attention weights.
            output_hidden_states: also return every block's input and the final output.
            return_dict: False returns a tuple (the output's fields that are not None).
            past_key_values: ``cache`` under the name transformers before 5.24 passes it by;
                give at most one of the two.

        Returns:
            BaseModelOutputWithPast: last_hidden_state [B, T, hidden_size], the cache (under
            the field name of the installed transformers, ``CACHE_FIELD``) when
            ``use_cache``, hidden_states when ``output_hidden_states``.
        """
        cache = _one_cache(cache, past_key_values)
        if output_attentions:
            raise ValueError(
                "output_attentions=True is not supported: growmem's mixers compute no "
                "attention weights"
            )
        inputs_embeds = self._embed(input_ids, inputs_embeds)
        B, T, _ = inputs_embeds.shape
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if cache is not None:
            if not isinstance(cache, GrowMemCache):
                raise ValueError(
                    "cache (past_key_values) must be a GrowMemCache (the one a growmem model "
                    f"returned), got {type(cache).__name__}"
                )
            cache.check_compatible(
                len(self.layers), inputs_embeds.dtype, cache_fingerprint(self.config)
            )
        past = 0 if cache is None else cache.seen_tokens
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {past + T} (cached {past} + new {T}) exceeds "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        mask = self._new_tokens_mask(attention_mask, B, past, T)
        if use_cache and cache is None:
            cache = GrowMemCache(
                len(self.layers), inputs_embeds.dtype, cache_fingerprint(self.config)
            )

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for i, block in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            layer_cache = cache.layers[i] if cache is not None else None
            hidden_states, layer_cache = block(
                hidden_states, mask, cache=layer_cache, use_cache=use_cache
            )
            if use_cache:
                cache.layers[i] = layer_cache
        hidden_states = self.norm(hidden_states)
        if mask is not None:
            hidden_states = hidden_states * mask[..., None]
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        if use_cache:
            cache.seen_tokens = past + T
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return out if return_dict is not False else out.to_tuple()

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Check the token input and return its embeddings [B, T, hidden_size]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            check_tensor("inputs_embeds", inputs_embeds, 3, "[B, T, hidden_size]")
            B, T, width = inputs_embeds.shape
            if B == 0 or T == 0 or width != self.config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must have shape [B >= 1, T >= 1, hidden_size="
                    f"{self.config.hidden_size}], got {tuple(inputs_embeds.shape)}"
                )
            return inputs_embeds
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(
                f"input_ids must be a [B, T] tensor of token ids, got {type(input_ids).__name__}"
            )
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(
                f"input_ids must have shape [B >= 1, T >= 1], got {tuple(input_ids.shape)}"
            )
        if input_ids.dtype not in _INTEGER_DTYPES:
            raise ValueError(f"input_ids must hold integer ids, got dtype {input_ids.dtype}")
        if value_checks_enabled(input_ids):  # reads values: the debug switch decides
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), got "
                    f"values in [{low}, {high}]"
                )
        return self.embed_tokens(input_ids)

    @staticmethod
    def _new_tokens_mask(attention_mask, B: int, past: int, T: int) -> torch.Tensor | None:
        """The [B, T] padding mask of the new tokens, or None when nothing is padded."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(
                "attention_mask must be a 2-D [batch, tokens] tensor of 0/1, got "
                f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
            )
        if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
            raise ValueError(
                f"attention_mask must have shape [B, T] = {(B, T)} or [B, past + T] = "
                f"{(B, past + T)}, got {tuple(attention_mask.shape)}"
            )
        return padding_mask(attention_mask[:, -T:], B, T, attention_mask.device)


class GrowMemForCausalLM(GrowMemPreTrainedModel, GenerationMixin):
    """GrowMemModel with a language-modelling head; computes the shifted next-token loss."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}
    # forward takes num_items_in_batch: the Trainer passes it and then leaves the loss unscaled
    # under gradient accumulation (forward has no **kwargs it could infer this from)
    accepts_loss_kwargs = True

    def __init__(self, config: GrowMemConfig):
        super().__init__(config)
        self.model = GrowMemModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: GrowMemCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        past_key_values: GrowMemCache | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits of the next token at every (or the last ``logits_to_keep``) position.

        Accepts exactly the keyword arguments that ``generate`` and the Hugging Face
        ``Trainer`` pass (transformers 5.23 to 5.25); any other is a TypeError.

        Args:
            labels: [B, T] targets aligned with input_ids; the loss is the cross-entropy of
                predicting labels[:, t + 1] at position t, ignoring -100: the mean over the
                batch's targets, or their sum divided by ``num_items_in_batch``.
            logits_to_keep: compute logits for the last this many positions only (0: all).
            num_items_in_batch: the number of targets (labels[:, 1:] != -100) of all the
                batches of one optimizer step, as the Trainer passes it with gradient
                accumulation, so that the accumulated loss is the mean over the whole step.
            Others as in ``GrowMemModel.forward``.

        Returns:
            CausalLMOutputWithPast: loss (when labels), logits [B, T or logits_to_keep, vocab],
            the cache (field ``CACHE_FIELD``) and hidden_states as in ``GrowMemModel``.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            if labels.shape != logits.shape[:2] or logits_to_keep:
                raise ValueError(
                    f"labels must have shape [B, T] = {tuple(logits.shape[:2])} (and "
                    f"logits_to_keep=0), got {tuple(labels.shape)}"
                )
            loss_dtype = torch.promote_types(logits.dtype, torch.float32)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).to(loss_dtype),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
                reduction="mean" if num_items_in_batch is None else "sum",
            )
            if num_items_in_batch is not None:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return out if return_dict is not False else out.to_tuple()
