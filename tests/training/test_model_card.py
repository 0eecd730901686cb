"""The model card and generation files of a model folder (growmem.training.model_card)."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import growmem
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import ByteTokenizer, find_tokenizer, load_tokenizer
from growmem.training.checkpoint import read_run_config, save_model_folder
from growmem.training.model_card import GENERATION_DEFAULTS, model_card
from growmem.utils.provenance import git_commit

from .common import raw_config


def tiny_model() -> GrowMemForCausalLM:
    torch.manual_seed(0)
    config = GrowMemConfig(
        vocab_size=259,
        hidden_size=16,
        num_hidden_layers=2,
        num_heads=2,
        memory={"rule": "titans", "caching": {"aggregation": "ssc", "segment_size": 8}},
        attn_layers=[1],
    )
    return GrowMemForCausalLM(config)


def test_card_names_architecture_training_results_and_version(tmp_path):
    run = raw_config(tmp_path, train={"steps": 10, "batch_size": 3, "grad_accum": 2})
    run["processes"] = 2
    card = model_card(tiny_model().config, run, {"loss": 1.23456, "lengths": [], "ok": True})
    for row in (
        "| model | `titans+ssc@8` |",
        "| memory rule | titans |",
        "| aggregation | ssc |",
        "| segments | 8 |",
        "| attention layers | 1 |",
        f"| training | 10 steps × 12 sequences × {run['task']['seq_len']} tokens",
        "| loss | 1.235 |",
    ):
        assert row in card
    assert "| ok |" not in card and "| lengths |" not in card  # only numbers are listed
    assert "short convolution" not in card
    config = tiny_model().config
    config.attn_conv_size = 4
    assert "| attention short convolution | 4 taps on q, k, v |" in model_card(config, run, {})
    assert f"| growmem | {growmem.__version__}, commit " in card
    if git_commit()["commit"]:
        assert git_commit()["commit"] in card


def test_model_folder_loads_with_auto_classes(tmp_path):
    model, tokenizer = tiny_model(), ByteTokenizer()
    results = json.dumps({"loss": 2.5})
    run = raw_config(tmp_path)
    save_model_folder(tmp_path / "model", model, run, tokenizer, {"eval.json": results})
    folder = tmp_path / "model"
    # the model saved is left as it was: an evaluation that generates during training keeps
    # greedy decoding
    assert model.generation_config.do_sample in (None, False)
    assert model.config.eos_token_id is None
    assert "| loss | 2.5 |" in (folder / "README.md").read_text()
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf("né <eos>")["input_ids"] == tokenizer.encode("né <eos>")
    assert hf.model_max_length == model.config.max_position_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.eos_token_id == tokenizer.eos_id == hf.eos_token_id
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.eos_token_id, generation.pad_token_id) == (258, 256)
    assert generation.temperature == GENERATION_DEFAULTS["temperature"]
    # growmem's own readers find the same tokenizer, and the fingerprint recorded with it
    assert find_tokenizer(folder) == folder
    assert read_run_config(folder)["tokenizer_fingerprint"] == load_tokenizer(folder).fingerprint()
