"""Shared pieces of the training tests: tiny run configs, text corpora and metrics readers."""

from __future__ import annotations

import copy
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import yaml

from growmem.tasks.corpus import split_of
from growmem.training.config import RunConfig, build_config

REPO = Path(__file__).resolve().parents[2]

TINY_MODEL = {
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_heads": 2,
    "memory": {"rule": "gated_delta", "caching": {"aggregation": "none", "segment_size": 16}},
}

TINY_MQAR = {
    "name": "mqar",
    "vocab_size": 32,
    "seq_len": 32,
    "num_kv_pairs": 2,
    "num_train_examples": 256,
    "num_test_examples": 16,
}

TINY_TRAIN = {
    "steps": 6,
    "batch_size": 4,
    "lr": 1e-2,
    "warmup_steps": 2,
    "log_every": 1,
    "threads": 1,
    "progress": False,
}


def _merge(base: dict, extra: dict | None) -> dict:
    out = copy.deepcopy(base)
    out.update(extra or {})
    return out


def raw_config(
    out_dir: Path | str,
    model: dict | None = None,
    task: dict | None = None,
    train: dict | None = None,
) -> dict[str, Any]:
    """A tiny MQAR run (model/task/train entries replace the defaults key by key)."""
    return {
        "model": _merge(TINY_MODEL, model),
        "task": _merge(TINY_MQAR, task) if (task or {}).get("name", "mqar") == "mqar" else task,
        "train": _merge(TINY_TRAIN, {"out_dir": str(out_dir), **(train or {})}),
    }


def tiny_config(out_dir: Path | str, **sections: dict) -> RunConfig:
    return build_config(raw_config(out_dir, **sections))


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_metrics(out_dir: Path | str) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def loss_lines(out_dir: Path | str) -> list[dict]:
    return [m for m in read_metrics(out_dir) if "loss" in m]


def eval_lines(out_dir: Path | str) -> list[dict]:
    return [m for m in read_metrics(out_dir) if "eval" in m]


def text_corpus(root: Path, num_train: int = 8, num_val: int = 2, chars: int = 1500) -> Path:
    """A folder of small English-like .txt files: ``num_train`` in the train split and
    ``num_val`` in the val split (chosen by the corpus' hashed-path rule)."""
    words = [
        *("the", "memory", "of", "a", "model", "grows", "with", "the", "length", "of"),
        *("its", "context", "and", "each", "segment", "keeps", "a", "cached", "state"),
        *("that", "later", "tokens", "can", "read", "from", "when", "they", "need", "to"),
    ]
    root.mkdir(parents=True, exist_ok=True)
    wanted = {"train": num_train, "val": num_val}
    rng = random.Random(0)
    i = 0
    while any(wanted.values()):
        name = f"doc{i:03d}.txt"
        i += 1
        split = split_of(name)
        if wanted.get(split, 0) == 0:
            continue
        wanted[split] -= 1
        text = []
        while sum(len(w) + 1 for w in text) < chars:
            text.append(rng.choice(words))
        (root / name).write_text(" ".join(text) + ".\n")
    return root


def subprocess_env() -> dict[str, str]:
    """Environment of a child Python process: one thread, the repo importable."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("WORLD_SIZE", None)
    return env


PYTHON = sys.executable
