"""Tests of GrowMemConfig's argument checks: every bad value is a ValueError naming it."""

from __future__ import annotations

import math
import re

import pytest

from growmem.models import GrowMemConfig

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2)


def arg(name: str) -> str:
    """A message that starts with the argument's name."""
    return r"^" + re.escape(name) + r"\b"


BAD = {
    "conv_size 0": ("conv_size", dict(conv_size=0)),
    "chunk_size 0": ("chunk_size", dict(chunk_size=0)),
    "mini_batch 0": ("mini_batch", dict(mini_batch=0)),
    "expansion 0": ("expansion", dict(expansion=0)),
    "eta_max 0": ("eta_max", dict(eta_max=0.0)),
    "eta_max negative": ("eta_max", dict(eta_max=-0.1)),
    "eta_max inf": ("eta_max", dict(eta_max=math.inf)),
    "eta_max nan": ("eta_max", dict(eta_max=math.nan)),
    "eta_max string": ("eta_max", dict(eta_max="0.1")),
    "max_grad_norm negative": ("max_grad_norm", dict(max_grad_norm=-1.0)),
    "max_grad_norm 0": ("max_grad_norm", dict(max_grad_norm=0)),
    "norm_eps 0": ("norm_eps", dict(norm_eps=0.0)),
    "norm_eps negative": ("norm_eps", dict(norm_eps=-1e-6)),
    "norm_eps nan": ("norm_eps", dict(norm_eps=math.nan)),
    "initializer_range negative": ("initializer_range", dict(initializer_range=-0.02)),
    "initializer_range inf": ("initializer_range", dict(initializer_range=math.inf)),
    "use_short_conv 'no'": ("use_short_conv", dict(use_short_conv="no")),
    "qk_norm 1": ("qk_norm", dict(qk_norm=1)),
    "mlp_norm 'false'": ("mlp_norm", dict(mlp_norm="false")),
    "decay_to 'one'": ("decay_to", dict(decay_to="one")),
    "tie_word_embeddings 'no'": ("tie_word_embeddings", dict(tie_word_embeddings="no")),
    "use_cache 0": ("use_cache", dict(use_cache=0)),
    "rope_theta inf": ("rope_theta", dict(rope_theta=math.inf)),
    "rope_theta string": ("rope_theta", dict(rope_theta="1e4")),
    # the error names the argument the user passed
    "ssc_top_k 0": ("ssc_top_k", dict(ssc_top_k=0)),
    "ssc_top_k float": ("ssc_top_k", dict(ssc_top_k=1.5)),
    "top_k 0": ("top_k", dict(top_k=0)),
    "top_k and ssc_top_k differ": ("top_k", dict(top_k=2, ssc_top_k=3)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_value_raises_value_error_naming_it(case):
    name, kwargs = BAD[case]
    with pytest.raises(ValueError, match=arg(name)):
        GrowMemConfig(**BASE, **kwargs)


def test_good_values_are_accepted():
    config = GrowMemConfig(
        **BASE,
        max_grad_norm=None,  # no clamp
        initializer_range=0,  # zero init is allowed
        eta_max=1,  # an int is a number
        conv_size=1,
        use_short_conv=False,
        top_k=3,
        ssc_top_k=3,  # both, agreeing
    )
    assert config.ssc_top_k == 3
    assert GrowMemConfig(**BASE).ssc_top_k == 2
    assert GrowMemConfig(**BASE, ssc_top_k=4).ssc_top_k == 4
    assert GrowMemConfig(**config.to_dict()).ssc_top_k == 3


def test_decay_to_reaches_the_titans_layers():
    """The model config chooses what titans' decay forgets toward; the two choices compute
    different functions (the literal equation is kept for models trained with it)."""
    import torch

    from growmem.models import GrowMemForCausalLM

    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = {}
    for decay_to in ("init", "zero"):
        config = GrowMemConfig(**BASE, rule="titans", aggregation="none", mini_batch=4,
                               decay_to=decay_to)  # fmt: skip
        assert GrowMemConfig(**config.to_dict()).decay_to == decay_to
        torch.manual_seed(0)
        model = GrowMemForCausalLM(config).double()
        assert {layer.mixer.decay_to for layer in model.model.layers} == {decay_to}
        logits[decay_to] = model(ids).logits
    assert not torch.allclose(logits["init"], logits["zero"])
