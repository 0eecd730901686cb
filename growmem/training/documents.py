"""Packed documents read as if each were alone: the recurrent state (and the Memory Caching
segments, the short convolution, attention) restart at every document start.

Training blocks are cut from a stream of documents joined by eos, so a block usually holds
the end of one document and the start of the next, and the memory carries the first into
the second. With ``task.reset_at_documents`` a block is split at its document starts (the
token after each eos; the block's first token starts one too) and its documents run as
separate rows of one padded batch (right padding, masked): every model of growmem gives a
real token the output it has without the padding, so each document's logits are exactly
those of that document run alone, from the initial state — its cached segments, gate reads,
convolution taps and attention never see another document. The eos closes its document:
the prediction of the next document's first token is made from the document it ends.

This is exact for every memory rule and aggregation without a change to the ops, at a cost:
the padded batch has a row per document (as long as the longest), and a Memory Caching layer
runs one group of rows per distinct document length. Blocks holding one document each take
the plain path.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast


def document_starts(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] bool: True where a document starts, the first token of each row and every token
    after an eos.

    Args:
        input_ids: [B, T] token ids.
        eos_id: the id that ends a document.
    """
    starts = torch.zeros_like(input_ids, dtype=torch.bool)  # [B, T]
    starts[:, 0] = True
    starts[:, 1:] = input_ids[:, :-1] == eos_id
    return starts


def split_documents(
    input_ids: torch.Tensor, starts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documents of packed rows as a right-padded batch of their own.

    Args:
        input_ids: [B, T] token ids.
        starts: [B, T] bool, True at each document's first token; every row starts one.
    Returns:
        (doc_ids [N, L] (padding 0), mask [N, L] bool (True at real tokens), doc [B, T] the
        row of each token in the document batch, pos [B, T] its position there), for N
        documents, the longest of L tokens; ``doc_ids[doc, pos] == input_ids``.

    Raises:
        ValueError: shapes that differ, or a row that does not start a document.
    """
    if input_ids.dim() != 2 or starts.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, starts: expected two [B, T] tensors, got {tuple(input_ids.shape)} "
            f"and {tuple(starts.shape)}"
        )
    if not bool(starts[:, 0].all()):
        raise ValueError("starts: every row must start a document (starts[:, 0] all True)")
    B, T = input_ids.shape
    flat = starts.flatten()  # [B * T]
    doc = flat.long().cumsum(0) - 1  # [B * T] the document of each token
    first = flat.nonzero().squeeze(1)  # [N] flat index of each document's first token
    pos = torch.arange(B * T, device=input_ids.device) - first[doc]  # [B * T]
    N, L = len(first), int(pos.max()) + 1
    doc_ids = input_ids.new_zeros(N, L)
    mask = torch.zeros(N, L, dtype=torch.bool, device=input_ids.device)
    doc_ids[doc, pos] = input_ids.flatten()
    mask[doc, pos] = True
    return doc_ids, mask, doc.reshape(B, T), pos.reshape(B, T)


class DocumentResets(nn.Module):
    """A causal LM (or its DDP wrapper) whose forward reads each packed document alone.

    Called as the model is in training and evaluation (``input_ids``, ``use_cache=False``);
    returns an output whose ``logits`` [B, T, V] are at every position those of the
    position's document run alone.

    Args:
        model: a GrowMemForCausalLM, or the module wrapping it for training.
        eos_id: the id that ends a document (the tokenizer's eos).
    """

    def __init__(self, model: nn.Module, eos_id: int):
        super().__init__()
        self.model = model
        self.eos_id = eos_id

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> CausalLMOutputWithPast:
        if use_cache:
            raise ValueError("use_cache: DocumentResets reads whole blocks; decode the model")
        starts = document_starts(input_ids, self.eos_id)  # [B, T]
        if int(starts.sum()) == input_ids.shape[0]:  # one document a row: nothing to split
            return self.model(input_ids=input_ids, use_cache=False)
        doc_ids, mask, doc, pos = split_documents(input_ids, starts)
        logits = self.model(input_ids=doc_ids, attention_mask=mask, use_cache=False).logits
        return CausalLMOutputWithPast(logits=logits[doc, pos])  # [B, T, V]
