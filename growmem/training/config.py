"""Run configurations: YAML files of three sections (model, task, train) checked key by key.

The model section holds GrowMemConfig's arguments, the memory layers' settings nested under
``memory`` as GrowMemConfig stores them::

    model:
      hidden_size: 128
      memory:
        rule: gated_delta
        caching: {aggregation: grm, segment_size: 16}

A task base may also hold ``per_model``: settings added when the model is of one family (a
rule, or ``transformer``), e.g. the Transformer++'s own learning rate on a task. A model spec
(``--model gated_delta+grm``, growmem.models.model_spec) sets the mixer of a base.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from growmem.layers.config import warn_flat, with_legacy_gates
from growmem.models import GrowMemConfig
from growmem.models.configuration import FLAT_ARGUMENTS, memory_from_flat
from growmem.models.model_spec import MEMORY_RULES, TRANSFORMER, ModelSpec
from growmem.ops.spec import MatrixMemory
from growmem.training.config_files import merge, parse_override, read_yaml_config
from growmem.training.device import parse_device

TASKS = ("mqar", "niah", "lm")
PARALLEL = ("none", "ddp", "fsdp")  # train.parallel
SCHEDULES = ("cosine", "wsd")  # train.schedule


@dataclass
class MQARTask:
    """Multi-query associative recall (growmem.tasks.mqar).

    Args:
        vocab_size: token ids of the task (keys from the lower half, values from the upper).
        seq_len: training sequence length.
        num_kv_pairs: key-value pairs per training example (one or a list of settings).
        num_train_examples: training examples per setting (sampled with replacement epochs).
        test_seq_lens: sequence lengths of the test slices (default: seq_len).
        test_num_kv_pairs: key-value pairs of the test slices (default: num_kv_pairs).
        num_test_examples: examples per test slice.
        power_a: query-gap power law exponent.
        random_non_queries: random filler tokens between the queries (Zoology's default), or
            token 0. With a small vocabulary random filler repeats the keys with other
            values after them, which makes recall ambiguous.
    """

    name: str = "mqar"
    vocab_size: int = 8192
    seq_len: int = 256
    num_kv_pairs: int | list[int] = 16
    num_train_examples: int = 20000
    test_seq_lens: list[int] | None = None
    test_num_kv_pairs: list[int] | None = None
    num_test_examples: int = 256
    power_a: float = 0.01
    random_non_queries: bool = True


@dataclass
class NIAHTask:
    """Needles in a haystack, S-NIAH-1/2/3 and multi-key (growmem.tasks.niah).

    Args:
        variant: 1 (passkey, noise haystack), 2 (7-digit number, essay), 3 (UUID, essay).
        seq_len: training length in tokens.
        num_train_examples: training examples.
        eval_lengths: evaluation lengths in tokens (default 1x, 2x, 4x, 8x seq_len); lengths up
            to seq_len are reported as "within" the training length, longer ones as "beyond"
            (extrapolation), each group with its own mean.
        num_eval_examples: examples per evaluation length (needle depths on a grid).
        haystack: "noise" or "essay" (default per variant).
        tokenizer: "byte", "bpe" (a BPE trained on this task's own text with digits split,
            growmem.tasks.niah.niah_tokenizer; the same on every run) or a saved tokenizer
            directory.
        bpe_vocab_size: the most tokens of a "bpe" tokenizer.
        train_on_prompt: train every token of an example (language-modelling loss), not only
            the answer's.
        num_needles: needles per training example (one count or a mixture, example i gets
            the (i mod n)-th): 1 is S-NIAH; K > 1 hides K needles with distinct keys and
            values (RULER's niah_multikey style) and asks for one, so the model must keep K
            pairs apart. Each needle and the haystack sentence that keeps it apart from the
            next cost about 80 byte tokens, and every length must hold them all (variant 1,
            byte tokens: about 600 tokens for K = 4; the "bpe" tokenizer: about 165).
        eval_num_needles: needles per evaluation example (default: the most of num_needles).
        curriculum_steps: with a list of num_needles, the training step at which each count
            takes over (a curriculum, the first 0; e.g. num_needles [1, 4] and [0, 500]: one
            needle for 500 steps, then four); None mixes the counts in every batch.
    """

    name: str = "niah"
    variant: int = 1
    seq_len: int = 512
    num_train_examples: int = 4000
    eval_lengths: list[int] | None = None
    num_eval_examples: int = 20
    haystack: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 1024
    train_on_prompt: bool = False
    num_needles: int | list[int] = 1
    eval_num_needles: int | None = None
    curriculum_steps: list[int] | None = None


@dataclass
class LMTask:
    """Language modelling on a text corpus (growmem.tasks.corpus).

    Args:
        corpus: "stdlib" (the running Python's standard library source), a local file or
            folder, "hf:<dataset>[:<config>]" (needs the datasets package; streamed and
            read in order, growmem.tasks.streaming), or a file of token ids: ``.bin`` (raw,
            of ``token_dtype``, as nanoGPT writes them) or ``.npy``, memory-mapped.
        seq_len: tokens per training block.
        tokenizer: "byte", "bpe" (trained on the training split and saved with the run) or a
            saved tokenizer directory (for token files: the tokenizer that made them).
        bpe_vocab_size: vocabulary of a trained BPE.
        eval_split: "val" or "test"; for "hf:" corpora any split of the dataset ("val" is
            its "validation").
        eval_blocks: blocks of the evaluation split scored at each evaluation (0: all).
        cache_dir: where tokenized streams are kept (default: <out_dir>/../.token_cache).
        train_split: "hf:" corpora: the dataset's training split (others: "train").
        text_field: "hf:" corpora: the column holding the text.
        num_workers: "hf:" corpora: processes that tokenize the stream (0: the training
            process); any number gives the same blocks.
        token_dtype: ``.bin`` token files: "uint16" or "uint32" (``.npy`` files say theirs).
        eval_corpus: token files: the evaluation split's token file; without one the last
            ``eval_fraction`` of the corpus is held out for evaluation.
        eval_fraction: token files without eval_corpus: the held-out tail, in (0, 1).
        reset_at_documents: read each document of a block as if it were alone (the memory,
            its cached segments, the convolution and attention restart after every eos),
            in training and evaluation (growmem.training.documents).
    """

    name: str = "lm"
    corpus: str = "stdlib"
    seq_len: int = 512
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    eval_split: str = "val"
    eval_blocks: int = 64
    cache_dir: str | None = None
    train_split: str = "train"
    text_field: str = "text"
    num_workers: int = 0
    token_dtype: str = "uint16"
    eval_corpus: str | None = None
    eval_fraction: float = 0.01
    reset_at_documents: bool = False


TASK_TYPES = {"mqar": MQARTask, "niah": NIAHTask, "lm": LMTask}


@dataclass
class TrainSettings:
    """Optimisation, logging and checkpointing.

    Args:
        out_dir: run folder (metrics.jsonl, checkpoints/, model/).
        steps: optimizer steps.
        batch_size: sequences per process per optimizer step (before accumulation: each
            step takes batch_size * grad_accum sequences per process).
        grad_accum: micro-batches per optimizer step.
        lr, min_lr_ratio, warmup_steps: AdamW peak rate, the schedule's floor (fraction of
            lr), linear warmup.
        schedule: after the warmup, "cosine" (decay to the floor over the remaining steps) or
            "wsd" (warmup-stable-decay: the peak rate until the last decay_fraction of the
            steps, then a 1 - sqrt decay to the floor; growmem.train.warmup_stable_decay).
        decay_fraction: the fraction of train.steps a "wsd" schedule decays over, in (0, 1].
        weight_decay: on matrices only (not on norms, biases, gates or embeddings).
        betas, eps: AdamW.
        grad_clip: max global gradient norm (0: off).
        bf16: bfloat16 autocast for the forward (memory states stay fp32).
        seed: model init and data order.
        eval_every: steps between evaluations, the first before training (0: only at the end).
        log_every: steps between metric lines.
        checkpoint_every: steps between checkpoints (0: only at the end).
        keep_checkpoints: most recent checkpoints kept.
        threads: torch threads per process (0: torch's default).
        progress: show a progress bar.
        device: "auto" (cuda if available, else cpu), "cpu", "cuda" (under torchrun each
            process takes cuda:LOCAL_RANK) or another torch device such as "cuda:1" or "mps".
        parallel: how the processes of a torchrun launch share the work
            (growmem.training.parallel): "ddp" (a replica per process, gradients averaged;
            one process without torchrun), "fsdp" (FSDP2: parameters, gradients and
            optimizer states sharded over the processes; needs torchrun with 2 or more) or
            "none" (one process, no torchrun launch of several).
        activation_checkpointing: recompute each block's activations in the backward
            instead of keeping them (less memory, about one more forward of compute).
        compile: torch.compile the training forward: false (default), true (the inductor
            backend) or a backend's name (e.g. "aot_eager": no code generation, for checks).
            Evaluation and checkpoints use the uncompiled model.
        tensorboard: also write the metrics as TensorBoard scalars into <out_dir>/tensorboard
            (needs the optional tensorboard package).
    """

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    threads: int = 0
    progress: bool = True
    device: str = "auto"
    parallel: str = "ddp"
    activation_checkpointing: bool = False
    compile: bool | str = False
    tensorboard: bool = False


@dataclass
class RunConfig:
    """A whole run: GrowMemConfig arguments (vocab_size comes from the task; ``memory`` as a
    dict), the task and the training settings."""

    model: dict[str, Any]
    task: MQARTask | NIAHTask | LMTask
    train: TrainSettings

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "task": dataclasses.asdict(self.task),
            "train": dataclasses.asdict(self.train),
        }


def _model_keys() -> list[str]:
    params = inspect.signature(GrowMemConfig.__init__).parameters
    return [p for p in params if p not in ("self", "kwargs", "vocab_size")]


def nested_model(model: dict) -> dict:
    """The model section with the flat memory keys of earlier releases (rule, aggregation,
    segment_size, ...) moved into ``memory`` (written over the memory a base gave), with a
    FutureWarning that shows the new keys."""
    flat = {k: model[k] for k in FLAT_ARGUMENTS & set(model)}
    if not flat:
        return model
    model = {k: v for k, v in model.items() if k not in flat}
    base = model.get("memory")
    model["memory"] = memory_from_flat(flat, base if isinstance(base, dict) else None)
    warn_flat("config section 'model'", flat, f"write memory: {model['memory']}")
    return model


def model_settings(model: dict) -> dict:
    """Every GrowMemConfig setting of a model section (defaults filled in, ``memory`` as its
    full dict, flat keys of earlier releases read as nested ones): equal for two sections
    exactly when they build the same model."""
    config = GrowMemConfig(vocab_size=1, **nested_model(model)).to_dict()
    return {k: v for k, v in config.items() if k not in ("vocab_size", "transformers_version")}


def model_record(model: dict) -> dict:
    """A (nested) model section as a run folder records it (run.yaml): ``memory`` as its full
    dict, every setting written out, so that the record keeps its meaning when a default
    changes (``model_from_record`` reads it back)."""
    memory = GrowMemConfig(vocab_size=1, **model).memory
    return {**model, "memory": None if memory is None else memory.to_dict()}


def model_from_record(model: dict) -> dict:
    """The model section of a run.yaml as the run that wrote it meant it. Records written since
    ``model_record`` hold every memory setting; earlier ones hold the section as the run's
    config file gave it, so a setting it leaves out had the default of then: a memory dict
    without the gate settings gets their values of then (``with_legacy_gates``), and a section
    without ``memory`` was the default memory of then. Flat memory keys (older still) are
    left to their conversion, which does the same (``nested_model``)."""
    if FLAT_ARGUMENTS & set(model):
        return model
    return {**model, "memory": with_legacy_gates(model.get("memory", {}))}


def _check_keys(section: str, given: dict, valid: list[str]) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in section '{section}'; valid keys: {sorted(valid)}"
        )


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as of type ``hint`` (int, float, bool, str, list[X], unions with None); an
    int where a float is expected becomes a float.

    Raises:
        TypeError: the value is not of that type.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option)
            except TypeError:
                pass
    elif hint is type(None):
        if value is None:
            return value
    elif typing.get_origin(hint) is list:
        if isinstance(value, list):
            return [_convert(v, typing.get_args(hint)[0]) for v in value]
    elif isinstance(value, bool) or hint is bool:
        if isinstance(value, bool) and hint is bool:
            return value
    elif hint is float and isinstance(value, int):
        return float(value)
    elif isinstance(value, hint):
        return value
    raise TypeError(f"{value!r} is not of type {hint}")


def _typed(section: str, cls: type, values: dict) -> Any:
    """Instantiate dataclass ``cls`` from ``values``, checking key names and value types
    (the fields' annotations)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(section, values, list(fields))
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        try:
            values[key] = _convert(value, hints[key])
        except TypeError:
            raise ValueError(
                f"{section}.{key} must be of type {fields[key].type}, got {value!r}"
            ) from None
    return cls(**values)


def _check_range(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """``value`` (a number or a list of them) is finite and lies between ``low`` and
    ``high`` (the bounds included unless ``open_low`` / ``open_high``)."""
    for v in value if isinstance(value, list) else [value]:
        below = v < low or (open_low and v == low)
        above = v > high or (open_high and v == high)
        if not math.isfinite(v) or below or above:
            if high == math.inf:
                expected = f"{'>' if open_low else '>='} {low}"
            else:
                expected = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            finite = " and finite" if isinstance(v, float) else ""
            raise ValueError(f"{name} must be {expected}{finite}, got {value!r}")


# Lower bounds of the counts: a step count or size is >= 1, an interval may be 0 (off).
_TRAIN_AT_LEAST = {
    "steps": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "log_every": 1,
    "keep_checkpoints": 1,
    "eval_every": 0,
    "checkpoint_every": 0,
    "warmup_steps": 0,
    "threads": 0,
    "seed": 0,
}
_TASK_AT_LEAST = {
    "vocab_size": 1,
    "seq_len": 1,
    "num_kv_pairs": 1,
    "num_train_examples": 1,
    "test_seq_lens": 1,
    "test_num_kv_pairs": 1,
    "num_test_examples": 1,
    "eval_lengths": 1,
    "num_eval_examples": 1,
    "num_needles": 1,
    "eval_num_needles": 1,
    "bpe_vocab_size": 1,
    "eval_blocks": 0,
    "num_workers": 0,
}


def _check_train(train: TrainSettings) -> None:
    for key, low in _TRAIN_AT_LEAST.items():
        _check_range(f"train.{key}", getattr(train, key), low)
    _check_range("train.lr", train.lr, 0.0, open_low=True)
    _check_range("train.eps", train.eps, 0.0, open_low=True)
    _check_range("train.min_lr_ratio", train.min_lr_ratio, 0.0, 1.0)
    _check_range("train.weight_decay", train.weight_decay, 0.0)
    _check_range("train.grad_clip", train.grad_clip, 0.0)
    _check_range("train.decay_fraction", train.decay_fraction, 0.0, 1.0, open_low=True)
    if train.schedule not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {list(SCHEDULES)}, got {train.schedule!r}")
    if len(train.betas) != 2:
        raise ValueError(f"train.betas must be two numbers [beta1, beta2], got {train.betas!r}")
    _check_range("train.betas", train.betas, 0.0, 1.0, open_high=True)
    if not train.out_dir.strip():
        raise ValueError("train.out_dir must name a folder, got an empty string")
    parse_device(train.device, "train.device")
    if train.parallel not in PARALLEL:
        raise ValueError(
            f"train.parallel must be one of {list(PARALLEL)} (growmem.training.parallel), "
            f"got {train.parallel!r}"
        )
    if isinstance(train.compile, str):
        from torch._dynamo import list_backends  # (imported here: loading it is slow)

        backends = list_backends(exclude_tags=())
        if train.compile not in backends:
            raise ValueError(
                f"train.compile must be true, false or a torch.compile backend {backends}, "
                f"got {train.compile!r}"
            )


def _check_task(task: MQARTask | NIAHTask | LMTask) -> None:
    for key, low in _TASK_AT_LEAST.items():
        value = getattr(task, key, None)
        if value is not None:
            _check_range(f"task.{key}", value, low)
    if isinstance(task, NIAHTask):
        if task.variant not in (1, 2, 3):
            raise ValueError(f"task.variant must be 1, 2 or 3, got {task.variant}")
        if task.haystack not in (None, "noise", "essay"):
            raise ValueError(f"task.haystack must be 'noise' or 'essay', got {task.haystack!r}")
        if task.num_needles == []:
            raise ValueError("task.num_needles must be a count or a non-empty list, got []")
        _check_curriculum(task)
    if isinstance(task, LMTask):
        _check_lm_task(task)


def _check_curriculum(task: NIAHTask) -> None:
    steps = task.curriculum_steps
    if steps is None:
        return
    counts = task.num_needles if isinstance(task.num_needles, list) else [task.num_needles]
    if len(steps) != len(counts):
        raise ValueError(
            f"task.curriculum_steps must give a step per count of task.num_needles {counts}, "
            f"got {steps}"
        )
    if steps[0] != 0 or any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(f"task.curriculum_steps must increase from 0, got {steps}")


def _check_lm_task(task: LMTask) -> None:
    from growmem.tasks.corpus import TOKEN_DTYPES, is_token_file

    if task.corpus.startswith("hf:"):
        for key in ("train_split", "eval_split", "text_field"):
            if not getattr(task, key).strip():
                raise ValueError(f"task.{key} must name a split or column, got an empty string")
        return
    if task.eval_split not in ("val", "test"):
        raise ValueError(f"task.eval_split must be 'val' or 'test', got {task.eval_split!r}")
    if task.train_split != "train":
        raise ValueError(
            f"task.train_split applies to hf: corpora (local corpora split by file hash), "
            f"got {task.train_split!r}"
        )
    if is_token_file(task.corpus):
        if task.tokenizer == "bpe":
            raise ValueError(
                "task.tokenizer: a token file needs the tokenizer that made it ('byte' or a "
                "saved tokenizer folder), not a BPE trained on it"
            )
        if task.token_dtype not in TOKEN_DTYPES:
            raise ValueError(
                f"task.token_dtype must be one of {list(TOKEN_DTYPES)}, got {task.token_dtype!r}"
            )
        _check_range(
            "task.eval_fraction", task.eval_fraction, 0.0, 1.0, open_low=True, open_high=True
        )


def build_config(raw: dict[str, Any]) -> RunConfig:
    """A RunConfig from a dict with sections model, task and train (all keys checked).

    Raises:
        ValueError: an unknown section or key (listing the valid ones), a wrong value type or
            range, an unknown task name, or model settings GrowMemConfig rejects.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    _check_keys("<top level>", raw, ["model", "task", "train"])
    sections = {}
    for name in ("model", "task", "train"):
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise ValueError(f"section '{name}' must be a mapping, got {value!r}")
        sections[name] = dict(value)
    model = nested_model(sections["model"])
    _check_keys("model", model, _model_keys())
    GrowMemConfig(**model)  # rejects bad values early, naming the argument
    task_name = sections["task"].get("name", "mqar")
    if task_name not in TASK_TYPES:
        raise ValueError(f"task.name must be one of {list(TASKS)}, got {task_name!r}")
    task = _typed("task", TASK_TYPES[task_name], sections["task"])
    _check_task(task)
    train = _typed("train", TrainSettings, sections["train"])
    _check_train(train)
    return RunConfig(model=model, task=task, train=train)


def _per_model(raw: dict, source: str) -> dict:
    """The checked ``per_model`` section of a raw config: {family: {section: settings}}."""
    per_model = raw.pop("per_model", None) or {}
    families = [TRANSFORMER, *MEMORY_RULES]
    if not isinstance(per_model, dict) or not set(per_model) <= set(families):
        raise ValueError(
            f"{source}: per_model must map model families {families} to settings, got {per_model!r}"
        )
    for family, settings in per_model.items():
        if not isinstance(settings, dict) or not set(settings) <= {"model", "task", "train"}:
            raise ValueError(
                f"{source}: per_model.{family} must map sections (model, task, train) to "
                f"settings, got {settings!r}"
            )
    return per_model


def load_config(
    path: str | Path,
    overrides: list[str] = (),
    presets: Path | None = None,
    model: str | None = None,
) -> RunConfig:
    """Read a YAML run config (with its ``base:`` chain), set its model to the spec ``model``,
    add its ``per_model`` settings for the model's family and apply ``--set`` overrides.

    Args:
        path: the YAML file.
        overrides: ``section.key=value`` strings; values are parsed as YAML (``key`` may go
            deeper: ``model.memory.caching.segment_size=8``).
        presets: folder of named presets a ``base:`` may refer to.
        model: a model spec (``gated_delta+grm``, ``transformer``; growmem.models.model_spec),
            or None for the config's own model. The run folder ``train.out_dir`` gets the
            spec as a suffix (runs/mqar -> runs/mqar_gated_delta_grm; ``overrides`` may set
            another).

    Raises:
        FileNotFoundError: path or a base does not exist.
        ValueError: malformed YAML, unknown keys (listing the valid ones), bad values, a
            malformed model spec (listing the valid rules and aggregations).
    """
    raw = read_yaml_config(Path(path), presets)
    per_model = _per_model(raw, f"config {path}")
    raw["model"] = nested_model(raw.get("model") or {})
    if model is not None:
        spec = ModelSpec.parse(model)
        raw["model"] = spec.apply(raw["model"])
        # one run folder per model of a base: runs/mqar_gated_delta_grm
        train = dict(raw.get("train") or {})
        out_dir = train.get("out_dir", TrainSettings.out_dir)
        raw["train"] = {**train, "out_dir": f"{out_dir}_{spec.slug}"}
    memory = raw["model"].get("memory", {})
    rule = memory.get("rule", MatrixMemory.rule) if isinstance(memory, dict) else None
    family = TRANSFORMER if memory is None else rule  # a wrong memory: build_config says so
    raw = merge(raw, per_model.get(family, {}))
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {text}: '{k}' is not a section")
        node[keys[-1]] = value
    return build_config(raw)
