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

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from growmem.models import GrowMemForCausalLM
from growmem.tasks import Tokenizer, load_tokenizer

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as error:
    raise ImportError(
        "growmem.integrations.lm_eval needs lm-evaluation-harness with its Hugging Face "
        f"backend ({error}); install it with: pip install 'growmem[lm-eval]' (or pip install "
        "'lm-eval[hf]')"
    ) from error

__all__ = ["GrowMemLM", "HFTokenizerAdapter", "main"]


class HFTokenizerAdapter:
    """The part of a Hugging Face tokenizer's interface that lm_eval's HFLM uses, over a
    growmem tokenizer (`ByteTokenizer` or `BPETokenizer`).

    Text is always encoded as text (as in growmem's tokenizers): a special token's name inside
    a string is not the special token. ``decode(ids, skip_special_tokens=False)`` shows pad,
    bos and eos by name (the BPE's own strings; ``<pad>``, ``<bos>``, ``<eos>`` for the byte
    tokenizer), which is how lm_eval finds eos in generated text.

    Args:
        tokenizer: a growmem tokenizer.
        model_max_length: longest sequence the model accepts (``truncation=True`` cuts to it).
    """

    chat_template = None

    def __init__(self, tokenizer: Tokenizer, model_max_length: int):
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.name_or_path = tokenizer.fingerprint()
        self.vocab_size = tokenizer.vocab_size
        self.padding_side = "right"
        self.pad_token_id = tokenizer.pad_id
        self.bos_token_id = tokenizer.bos_id
        self.eos_token_id = tokenizer.eos_id
        names = getattr(tokenizer, "special_tokens", {})
        self.pad_token = names.get("pad_token", "<pad>")
        self.bos_token = names.get("bos_token", "<bos>")
        self.eos_token = names.get("eos_token", "<eos>")
        self._names = {
            self.pad_token_id: self.pad_token,
            self.bos_token_id: self.bos_token,
            self.eos_token_id: self.eos_token,
        }

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``, after bos when ``add_special_tokens`` (growmem's language
        models are trained without bos, hence the default)."""
        ids = self.tokenizer.encode(text)
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(
        self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False
    ) -> str:
        """The text of one id or a sequence of ids; pad, bos and eos are dropped when
        ``skip_special_tokens``, else shown by name."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else list(ids)
        if skip_special_tokens:
            return self.tokenizer.decode(ids)
        pieces, run = [], []
        for token in ids:
            if token in self._names:
                pieces += [self.tokenizer.decode(run), self._names[token]]
                run = []
            else:
                run.append(token)
        pieces.append(self.tokenizer.decode(run))
        return "".join(pieces)

    def batch_decode(self, sequences: Iterable, skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each sequence (rows of a 2-D tensor, or lists of ids)."""
        return [self.decode(ids, skip_special_tokens) for ids in sequences]

    def __call__(
        self,
        texts: Sequence[str],
        padding: str = "longest",
        truncation: bool = False,
        return_tensors: str = "pt",
        add_special_tokens: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Encode a batch, padded with pad on ``self.padding_side`` to the longest row.

        Args:
            texts: the strings.
            padding, return_tensors: only "longest" and "pt" are supported.
            truncation: keep at most ``model_max_length`` tokens of each row (the first ones).
            add_special_tokens: as in `encode`.

        Returns: {"input_ids", "attention_mask"}: [len(texts), longest] long tensors, the mask
        1 on tokens and 0 on padding.
        """
        if padding != "longest" or return_tensors != "pt":
            raise ValueError(
                'only padding="longest" and return_tensors="pt" are supported, got '
                f"padding={padding!r}, return_tensors={return_tensors!r}"
            )
        rows = [self.encode(text, add_special_tokens) for text in texts]
        if truncation:
            rows = [row[: self.model_max_length] for row in rows]
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            start = width - len(row) if self.padding_side == "left" else 0
            input_ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, start : start + len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _default_tokenizer(model_folder: str) -> str | Path:
    """``<model_folder>/tokenizer`` when it exists, else ``"byte"``."""
    folder = Path(model_folder) / "tokenizer"
    return folder if model_folder and folder.is_dir() else "byte"


@register_model("growmem")
class GrowMemLM(HFLM):
    """lm_eval's HFLM over a growmem model and its own (non Hugging Face) tokenizer.

    Loglikelihood, rolling loglikelihood (perplexity) and generation all work as in HFLM. An
    empty context conditions on eos: growmem's language models are trained on documents that
    each end with eos, so eos is what precedes a document (bos is never trained).

    Args:
        pretrained: a model folder (``config.json``, ``model.safetensors``, optionally
            ``tokenizer/``, as ``growmem train`` writes it) or a loaded `GrowMemForCausalLM`.
        tokenizer: a growmem tokenizer, a tokenizer folder or ``"byte"``; default: the
            model folder's ``tokenizer/`` when it exists, else the byte tokenizer. Its vocabulary
            must have the model's size.
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
        """Set ``self.tokenizer`` to the adapted growmem tokenizer (Hugging Face tokenizer
        options such as revision or use_fast_tokenizer do not apply and are ignored)."""
        if tokenizer is None:
            model_folder = pretrained if isinstance(pretrained, str) else self.model.name_or_path
            tokenizer = _default_tokenizer(model_folder)
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens, the model {self.config.vocab_size}"
            )
        self.tokenizer = HFTokenizerAdapter(tokenizer, self.config.max_position_embeddings)

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
