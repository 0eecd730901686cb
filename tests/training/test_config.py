"""Run configs: YAML loading, --set overrides, key and value checks, model specs, the flat
model keys of earlier releases, task bases."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from growmem.training.config import (
    LMTask,
    MQARTask,
    NIAHTask,
    TrainSettings,
    build_config,
    load_config,
)
from growmem.training.config_files import parse_override

from .common import raw_config, write_yaml

PRESETS = sorted((Path(__file__).resolve().parents[2] / "growmem" / "configs").glob("*.yaml"))


@pytest.fixture
def config_file(tmp_path):
    return write_yaml(tmp_path / "run.yaml", raw_config(tmp_path / "run"))


def test_load_yaml_with_typed_overrides(config_file, tmp_path):
    config = load_config(
        config_file,
        [
            "train.steps=17",
            "train.lr=3e-4",
            "train.betas=[0.8, 0.99]",
            "train.bf16=true",
            "train.progress=false",
            "task.test_seq_lens=[32, 64]",
            "task.num_kv_pairs=[2, 4]",
            "model.hidden_size=24",
            "model.attn_window=8",
        ],
    )
    assert isinstance(config.task, MQARTask)
    assert config.train.steps == 17 and isinstance(config.train.steps, int)
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.train.betas == [0.8, 0.99]
    assert config.train.bf16 is True and config.train.progress is False
    assert config.task.test_seq_lens == [32, 64]
    assert config.task.num_kv_pairs == [2, 4]
    assert config.model["hidden_size"] == 24 and config.model["attn_window"] == 8
    # values the overrides did not touch come from the file, the rest from the defaults
    assert config.train.out_dir == str(tmp_path / "run")
    assert config.task.vocab_size == 32
    assert config.train.weight_decay == TrainSettings().weight_decay


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 3e-4 as a string; run configs read it as the number everyone means
    raw = raw_config(tmp_path / "run")
    raw["train"]["lr"] = "LR"
    path = tmp_path / "c.yaml"
    write_yaml(path, raw)
    path.write_text(path.read_text().replace("LR", "3e-4"))
    assert load_config(path).train.lr == 3e-4
    assert load_config(path, ["train.eps=1e-6"]).train.eps == 1e-6
    assert load_config(path, ["model.rope_theta=5E+5"]).model["rope_theta"] == 5e5
    assert load_config(path, ["train.out_dir=1e3x"]).train.out_dir == "1e3x"


def test_integer_given_for_float_becomes_float(config_file):
    config = load_config(config_file, ["train.lr=1", "train.grad_clip=0"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert isinstance(config.train.grad_clip, float)


def test_override_creates_missing_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"hidden_size": 16, "num_heads": 2}})
    config = load_config(path, ["train.steps=3"])
    assert config.train.steps == 3
    assert isinstance(config.task, MQARTask)  # the default task


def test_a_file_overrides_its_bases_and_later_bases_earlier_ones(tmp_path):
    write_yaml(tmp_path / "first.yaml", {"train": {"lr": 0.1, "seed": 3, "steps": 7}})
    write_yaml(tmp_path / "second.yaml", {"train": {"lr": 0.2, "seed": 4}})
    raw = raw_config(tmp_path / "run")
    raw["train"] = {"lr": 0.3, "out_dir": raw["train"]["out_dir"]}
    config = load_config(write_yaml(tmp_path / "run.yaml", {"base": ["first", "second"], **raw}))
    # key by key within a section: lr from the file, seed from the later base, steps from
    # the only base that sets it
    assert (config.train.lr, config.train.seed, config.train.steps) == (0.3, 4, 7)


@pytest.mark.parametrize(
    "section, key, valid",
    [
        ("train", "stepz", "steps"),
        ("task", "kv_pairs", "num_kv_pairs"),
        ("model", "hiden_size", "hidden_size"),
    ],
)
def test_unknown_key_lists_valid_keys(config_file, section, key, valid):
    with pytest.raises(ValueError, match="valid keys") as info:
        load_config(config_file, [f"{section}.{key}=1"])
    message = str(info.value)
    assert repr(key) in message and f"'{section}'" in message
    assert repr(valid) in message


def test_unknown_task_key_depends_on_task(tmp_path):
    # corpus is an LM key, not an MQAR one
    raw = raw_config(tmp_path / "run", task={"corpus": "stdlib"})
    with pytest.raises(ValueError, match="corpus") as info:
        build_config(raw)
    assert "'num_kv_pairs'" in str(info.value)
    raw = raw_config(tmp_path / "run")
    raw["task"] = {"name": "lm", "corpus": "stdlib", "seq_len": 64}
    assert isinstance(build_config(raw).task, LMTask)
    raw["task"] = {"name": "niah", "variant": 2}
    assert isinstance(build_config(raw).task, NIAHTask)


def test_unknown_section(tmp_path):
    raw = raw_config(tmp_path / "run")
    raw["optimizer"] = {"lr": 1e-3}
    with pytest.raises(ValueError, match="optimizer") as info:
        build_config(raw)
    for name in ("model", "task", "train"):
        assert name in str(info.value)


def test_unknown_task_name(tmp_path):
    with pytest.raises(ValueError, match=r"task\.name"):
        build_config(raw_config(tmp_path / "run", task={"name": "copy"}))


@pytest.mark.parametrize(
    "override, name",
    [
        ("train.steps=ten", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("train.bf16=1", "train.bf16"),
        ("train.steps=true", "train.steps"),
        ("train.lr=fast", "train.lr"),
        ("task.seq_len=[32]", "task.seq_len"),
    ],
)
def test_wrong_value_type(config_file, override, name):
    with pytest.raises(ValueError, match=name):
        load_config(config_file, [override])


def test_compile_is_a_bool_or_a_backend(config_file):
    assert load_config(config_file, ["train.compile=true"]).train.compile is True
    assert load_config(config_file, ["train.compile=aot_eager"]).train.compile == "aot_eager"
    assert load_config(config_file, []).train.compile is False
    with pytest.raises(ValueError, match=r"train\.compile must be true, false or a torch\.compile"):
        load_config(config_file, ["train.compile=no_such_backend"])
    with pytest.raises(ValueError, match=r"train\.compile"):
        load_config(config_file, ["train.compile=1"])


@pytest.mark.parametrize("key", ["steps", "batch_size", "grad_accum", "log_every"])
def test_train_counts_must_be_positive(config_file, key):
    with pytest.raises(ValueError, match=f"train.{key}"):
        load_config(config_file, [f"train.{key}=0"])


def test_bad_model_value_names_argument(config_file):
    with pytest.raises(ValueError, match="rule") as info:
        load_config(config_file, ["model.memory.rule=lstm"])
    assert "lstm" in str(info.value)
    with pytest.raises(ValueError, match=r"^segment_size must be a positive int, got 0"):
        load_config(config_file, ["model.memory.caching.segment_size=0"])
    with pytest.raises(ValueError, match=r"memory has no setting \['mini_batch'\]: rule 'gated"):
        load_config(config_file, ["model.memory.mini_batch=4"])


def test_section_must_be_mapping(tmp_path):
    raw = raw_config(tmp_path / "run")
    raw["train"] = [1, 2]
    with pytest.raises(ValueError, match="train"):
        build_config(raw)
    with pytest.raises(ValueError, match="mapping"):
        build_config([raw])


@pytest.mark.parametrize("text", ["train.steps", "steps=3", "=3", "train.steps:3", ""])
def test_malformed_override(config_file, text):
    with pytest.raises(ValueError, match=r"section\.key=value"):
        parse_override(text)
    with pytest.raises(ValueError, match=r"section\.key=value"):
        load_config(config_file, [text])


def test_parse_override_parses_yaml_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("task.test_seq_lens=[64, 128]") == (
        ["task", "test_seq_lens"],
        [64, 128],
    )
    assert parse_override("train.out_dir=runs/a=b") == (["train", "out_dir"], "runs/a=b")


def test_override_through_a_non_section(config_file):
    with pytest.raises(ValueError, match="not a section"):
        load_config(config_file, ["train.steps.value=3"])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {hidden_size: 16\ntrain: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- train\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)


def test_to_dict_round_trips(config_file):
    config = load_config(config_file, ["train.steps=9", "task.num_kv_pairs=[2, 3]"])
    again = build_config(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert dataclasses.asdict(again.train) == dataclasses.asdict(config.train)


def test_task_bases_are_few_and_each_is_used():
    """A task base per task and setting (``TASK_SETTING``, e.g. mqar_capacity); the sweep and
    the demo name the model with a spec. Besides them, the paper's model sizes for GPUs
    (tests/models/test_size_presets.py), which no CPU experiment runs, and lm_tiny, the
    README's language model that trains in a minute (tests/training/test_generate.py)."""
    from experiments.sweep import EXPERIMENTS
    from growmem.demo import TASK

    used = {cell.task for cells in EXPERIMENTS.values() for cell in cells()} | {TASK}
    bases = {"mqar", "mqar_capacity", "niah", "niah_multikey", "niah_uuid", "lm"}
    sizes = {"lm_760m", "lm_1.3b", "lm_tiny"}
    assert used == bases
    assert {p.stem for p in PRESETS} == bases | sizes


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
@pytest.mark.parametrize("spec", [None, "transformer", "titans+ssc", "gated_delta+grm@log"])
def test_every_task_base_loads_with_every_kind_of_model(path, spec):
    config = load_config(path, model=spec)
    assert build_config(config.to_dict()).to_dict() == config.to_dict()
    assert config.train.out_dir and config.task.name == path.stem.partition("_")[0]
    overridden = load_config(path, ["train.steps=5"], model=spec)
    assert overridden.train.steps == 5


def test_model_spec_sets_the_mixer_of_a_base(config_file, tmp_path):
    base = load_config(config_file)
    assert base.model["memory"]["caching"] == {"aggregation": "none", "segment_size": 16}
    config = load_config(config_file, model="titans+ssc")
    assert config.model["memory"] == {
        "rule": "titans",
        "caching": {"aggregation": "ssc", "segment_size": 16},  # the base's segments
    }
    assert config.train.out_dir == f"{tmp_path / 'run'}_titans_ssc"  # a folder per model
    log = load_config(config_file, ["model.memory.caching.top_k=3"], model="swla+loglinear@log")
    caching = log.model["memory"]["caching"]
    assert (caching["segments"], caching["segment_size"], caching["top_k"]) == ("log", None, 3)
    explicit = load_config(config_file, model="delta+grm@8,8,16")
    assert explicit.model["memory"]["caching"]["segments"] == [8, 8, 16]
    assert load_config(config_file, model="gated_delta+grm@8").model["memory"]["caching"] == {
        "aggregation": "grm",
        "segment_size": 8,
        "segments": None,
    }
    assert load_config(config_file, model="transformer").model["memory"] is None
    with pytest.raises(ValueError, match=r"model spec 'titans\+sum': unknown aggregation 'sum'"):
        load_config(config_file, model="titans+sum")


def test_per_model_settings_follow_the_model_family(tmp_path):
    raw = raw_config(tmp_path / "run")
    raw["per_model"] = {
        "transformer": {"model": {"num_heads": 1}, "train": {"lr": 1e-3}},
        "titans": {"model": {"memory": {"mini_batch": 2}}},
    }
    path = write_yaml(tmp_path / "base.yaml", raw)
    assert load_config(path).train.lr == raw["train"]["lr"]  # its own model: gated_delta
    transformer = load_config(path, model="transformer")
    assert (transformer.model["num_heads"], transformer.train.lr) == (1, 1e-3)
    titans = load_config(path, ["train.lr=0.5"], model="titans+grm")
    assert titans.model["memory"]["mini_batch"] == 2 and titans.train.lr == 0.5  # --set last
    assert load_config(path, model="dla").model["memory"] == {
        "rule": "dla",
        "caching": {"aggregation": "none", "segment_size": 16},
    }
    raw["per_model"] = {"lstm": {"train": {"lr": 1.0}}}
    with pytest.raises(ValueError, match=r"per_model must map model families \['transformer'"):
        load_config(write_yaml(tmp_path / "bad.yaml", raw))
    raw["per_model"] = {"titans": {"optimizer": {"lr": 1.0}}}
    with pytest.raises(ValueError, match=r"per_model.titans must map sections"):
        load_config(write_yaml(tmp_path / "bad.yaml", raw))


def test_bases_merge_the_memory_mapping_by_mapping(tmp_path):
    base = raw_config(tmp_path / "run")
    base["model"]["memory"]["caching"]["top_k"] = 3
    write_yaml(tmp_path / "base.yaml", base)
    child = {"base": "base", "model": {"memory": {"caching": {"aggregation": "ssc"}}}}
    config = load_config(write_yaml(tmp_path / "child.yaml", child))
    assert config.model["memory"] == {
        "rule": "gated_delta",
        "caching": {"aggregation": "ssc", "segment_size": 16, "top_k": 3},
    }


def test_flat_model_keys_convert_with_a_future_warning(tmp_path):
    """A YAML of earlier releases, or a run.yaml recorded by them (which kept the base's
    mini_batch for a gated_delta model: it never applied)."""
    raw = raw_config(tmp_path / "run")
    raw["model"] = {"hidden_size": 16, "num_heads": 2, "rule": "gated_delta", "aggregation": "grm"}
    raw["model"].update(segment_size=16, mini_batch=16, ssc_top_k=3)
    message = r"^config section 'model': the flat memory settings .*; write memory: \{'rule'"
    with pytest.warns(FutureWarning, match=message):
        config = build_config(raw)
    assert config.model == {
        "hidden_size": 16,
        "num_heads": 2,
        "memory": {  # the flat settings predate the gate settings: the gates of then
            "rule": "gated_delta",
            "caching": {"aggregation": "grm", "segment_size": 16, "top_k": 3, "gate_norm": "none"},
            "gate_temperature": None,
            "summary_source": "keys",
        },
    }
    # over a base in the new form, and as an old-style override
    base = write_yaml(tmp_path / "base.yaml", raw_config(tmp_path / "run"))
    child = write_yaml(tmp_path / "child.yaml", {"base": "base", "model": {"rule": "titans"}})
    with pytest.warns(FutureWarning):
        assert load_config(child).model["memory"]["rule"] == "titans"
    with pytest.warns(FutureWarning):
        config = load_config(base, ["model.aggregation=ssc"])
    assert config.model["memory"]["caching"]["aggregation"] == "ssc"
    with pytest.warns(FutureWarning):
        assert load_config(base, ["model.rule=attention"]).model["memory"] is None
