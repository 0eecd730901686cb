"""The model-size presets (growmem/configs/lm_760m.yaml, lm_1.3b.yaml): the paper's sizes."""

from __future__ import annotations

import pytest
import torch

from growmem.cli import CONFIGS
from growmem.models import GrowMemConfig
from growmem.models.modeling import GrowMemForCausalLM
from growmem.training.config import load_config

# preset: (nominal parameters, the paper's blocks, d_model, heads; PAPER.md "Scales")
SIZES = {"lm_760m": (760e6, 24, 1536, 16), "lm_1.3b": (1.3e9, 18, 2048, 8)}


@pytest.mark.parametrize("spec", ["gated_delta", "gated_delta+grm"])
@pytest.mark.parametrize("preset", list(SIZES))
def test_size_presets_have_the_papers_shapes_and_parameter_counts(preset, spec):
    nominal, layers, hidden, heads = SIZES[preset]
    config = load_config(CONFIGS / f"{preset}.yaml", model=spec, presets=CONFIGS)
    model = config.model
    assert (model["num_hidden_layers"], model["hidden_size"], model["num_heads"]) == (
        layers,
        hidden,
        heads,
    )
    assert config.task.seq_len == 4096 and config.task.bpe_vocab_size == 32000
    with torch.device("meta"):  # no memory, no initialisation
        net = GrowMemForCausalLM(GrowMemConfig(vocab_size=config.task.bpe_vocab_size, **model))
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / nominal - 1) <= 0.10, f"{preset} {spec}: {count / 1e6:.0f}M parameters"
