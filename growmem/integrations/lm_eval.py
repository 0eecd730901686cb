"""lm-evaluation-harness adapter: `GrowMemLM`, the lm_eval model "growmem".

Importing this module registers the model with lm_eval; it needs lm-evaluation-harness with its
Hugging Face backend (``pip install 'growmem[lm-eval]'``) and raises ImportError otherwise.

From Python::

    import lm_eval
    from growmem.integrations.lm_eval import GrowMemLM

    lm = GrowMemLM(pretrained="runs/x/model", batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

From the command line: the ``lm_eval`` command only knows the models of its own registry, so
run lm_eval's command line through this module, which registers "growmem" first (all of
``lm_eval run``'s arguments apply)::

    python -m growmem.integrations.lm_eval --model growmem \\
        --model_args pretrained=runs/x/model --tasks lambada_openai --device cpu
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from growmem.models import GrowMemForCausalLM
from growmem.tasks import Tokenizer, find_tokenizer, load_tokenizer

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:
    raise ImportError(
        "growmem.integrations.lm_eval needs lm-evaluation-harness with its Hugging Face "
        f"backend ({error}); install it with: pip install 'growmem[lm-eval]' (or pip install "
        "'lm-eval[hf]')"
    ) from error

__all__ = ["GrowMemLM", "main"]


@register_model("growmem")
class GrowMemLM(HFLM):
    """lm_eval's HFLM over a growmem model and the Hugging Face form of its tokenizer.

    Loglikelihood, rolling loglikelihood (perplexity) and generation all work as in HFLM. An
    empty context conditions on eos: growmem's language models are trained on documents that
    each end with eos, so eos is what precedes a document (bos is never trained).

    Args:
        pretrained: a model folder (``config.json``, ``model.safetensors`` and the tokenizer,
            as ``growmem train`` writes it) or a loaded `GrowMemForCausalLM`.
        tokenizer: a growmem tokenizer, a tokenizer folder, ``"byte"`` or a Hugging Face
            tokenizer; default: the model folder's tokenizer (``growmem.tasks.find_tokenizer``:
            also the ``tokenizer/`` of folders written before growmem saved Hugging Face
            tokenizers), else the byte tokenizer. Its vocabulary must have the model's size.
        device: "cpu", "cuda", "cuda:1", ...; default "cuda" when available, else "cpu".
        **kwargs: HFLM's, e.g. batch_size, dtype, max_length (default: the config's
            max_position_embeddings), add_bos_token, prefix_token_id (default: eos),
            mixed_precision_dtype.

    Raises:
        ValueError: the tokenizer's vocabulary size differs from the model's.
    """

    AUTO_MODEL_CLASS = GrowMemForCausalLM

    def __init__(
        self,
        pretrained: str | GrowMemForCausalLM,
        tokenizer: str | Path | Tokenizer | None = None,
        device: str | None = None,
        **kwargs,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(
            pretrained if isinstance(pretrained, GrowMemForCausalLM) else str(pretrained),
            backend="causal",
            tokenizer=tokenizer,
            device=device,
            **kwargs,
        )

    def _create_tokenizer(self, pretrained, tokenizer, **hf_options) -> None:
        """Set ``self.tokenizer`` to the Hugging Face tokenizer: the one given, or the Hugging
        Face form of the growmem tokenizer (``to_transformers``, which is what the model
        folder's ``tokenizer.json`` holds; Hugging Face tokenizer options such as revision
        do not apply to it and are ignored)."""
        if tokenizer is None:
            model_folder = pretrained if isinstance(pretrained, str) else self.model.name_or_path
            tokenizer = (find_tokenizer(model_folder) if model_folder else None) or "byte"
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = tokenizer.to_transformers(self.config.max_position_embeddings)
        if len(tokenizer) != self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens, the model {self.config.vocab_size}"
            )
        self.tokenizer = tokenizer

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context conditions on: the ``prefix_token_id`` given, else eos."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.eot_token_id

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits [batch, seq, vocab] of ``inps`` [batch, seq], without building a cache (the
        seq2seq-only ``attn_mask`` and ``labels`` are never passed to a causal model)."""
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, use_cache=False).logits

    def _model_generate(self, context, max_length, stop, **generation_kwargs) -> torch.Tensor:
        """HFLM's generation, ending each row at eos (padded after it), so that the text a
        row generates after its eos never reaches the answer."""
        generation_kwargs.setdefault("eos_token_id", self.eot_token_id)
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main() -> None:
    """lm_eval's command line (the arguments of ``lm_eval run``) with "growmem" registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
