"""What a model folder holds beside its weights for Hugging Face users: the special-token ids
(``config.json``), the generation defaults (``generation_config.json``) and a model card
(``README.md``: architecture, memory, training, evaluation, provenance)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from growmem.models import GrowMemConfig
from growmem.models.model_spec import spec_of
from growmem.utils.provenance import git_commit, package_versions

# ``growmem generate``'s defaults and a saved model's generation_config.json: sampling at a
# moderate temperature (greedy decoding of a small model repeats itself).
GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.8, "top_k": 50}


def generation_config(tokenizer=None) -> GenerationConfig:
    """``GENERATION_DEFAULTS`` with the special-token ids of ``tokenizer`` (a growmem tokenizer;
    None: no ids, an MQAR model). Generation stops at eos and pads with pad."""
    ids = {}
    if tokenizer is not None:
        ids = {
            "pad_token_id": tokenizer.pad_id,
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
        }
    return GenerationConfig(**GENERATION_DEFAULTS, **ids)


def write_generation_files(folder: Path, config: GrowMemConfig, tokenizer=None) -> None:
    """Write ``config.json`` (``config`` with the special-token ids of ``tokenizer``) and
    ``generation_config.json`` (`generation_config`) into ``folder``, over what
    ``save_pretrained`` wrote. The model itself is left as it is: a training model keeps
    the generation settings it had (an evaluation that generates is not turned to sampling).

    Args:
        folder: the model or checkpoint folder.
        config: the model's configuration.
        tokenizer: its growmem tokenizer, or None (ids stay unset).
    """
    config = copy.deepcopy(config)
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_id
        config.bos_token_id = tokenizer.bos_id
        config.eos_token_id = tokenizer.eos_id
    config.save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)


def _training_line(run_config: dict[str, Any]) -> str:
    train, task = run_config.get("train", {}), run_config.get("task", {})
    needed = (train.get("steps"), train.get("batch_size"), task.get("seq_len"))
    if not all(isinstance(v, int) for v in needed):
        return "not recorded"
    steps, batch, seq_len = needed
    sequences = batch * train.get("grad_accum", 1) * run_config.get("processes", 1)
    return (
        f"{steps} steps × {sequences} sequences × {seq_len} tokens = "
        f"{steps * sequences * seq_len:,} token slots (padding included)"
    )


def model_card(
    config: GrowMemConfig, run_config: dict[str, Any], results: dict[str, Any] | None = None
) -> str:
    """The model card (``README.md``) of a model folder.

    Args:
        config: the model's configuration.
        run_config: the run config the folder records (run.yaml: model, task, train sections,
            ``processes``).
        results: the final evaluation (eval.json); its numbers are listed.
    """
    spec = spec_of(config)
    memory = config.memory
    task = run_config.get("task", {})
    versions, git = package_versions(), git_commit()
    commit = git["commit"] or "unknown (not a git checkout)"
    if git["dirty"]:
        commit += " (with uncommitted changes)"
    rows = [
        ("model", f"`{spec}`"),
        (
            "architecture",
            f"GrowMemForCausalLM: {config.num_hidden_layers} layers, width {config.hidden_size}, "
            f"{config.num_heads} heads, vocabulary {config.vocab_size}",
        ),
    ]
    if memory is not None:
        caching = memory.caching
        segments = caching.segment_size if caching.segments is None else caching.segments
        rows += [
            ("memory rule", memory.rule),
            ("aggregation", caching.aggregation),
            ("segments", str(segments)),
        ]
    if config.attn_layers and memory is not None:
        rows.append(("attention layers", ", ".join(map(str, config.attn_layers))))
    if config.attn_conv_size is not None and (memory is None or config.attn_layers):
        rows.append(("attention short convolution", f"{config.attn_conv_size} taps on q, k, v"))
    task_text = ", ".join(f"{k}={v}" for k, v in task.items() if isinstance(v, (str, int)))
    rows += [
        ("task", task_text or "not recorded"),
        ("training", _training_line(run_config)),
        ("growmem", f"{versions.get('growmem')}, commit {commit}"),
    ]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [growmem, memory-caching]",
        "---",
        f"# growmem `{spec}`",
        "",
        "A growmem language model (Memory Caching over a recurrent memory), written by "
        "`growmem train`.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
    ]
    numbers = {
        k: v
        for k, v in (results or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    if numbers:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in numbers.items()]
        lines += ["", "All results: `eval.json`.", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import growmem  # registers the architecture with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        "```",
        "",
        'or `growmem generate THIS_FOLDER --prompt "..."`.',
        "",
    ]
    return "\n".join(lines)
