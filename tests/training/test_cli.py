"""The growmem command: configs, train, eval, and its errors: whatever it is given, a bad input
is one line naming it, with exit status 2."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import warnings

import pytest
import torch

from growmem.cli import CONFIGS, main
from growmem.models import GrowMemForCausalLM
from growmem.tasks import BPETokenizer, ByteTokenizer

from .common import raw_config, text_corpus, write_yaml


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    """A tiny MQAR run trained through the CLI (shared by the eval tests, which only add
    eval-* files next to the model)."""
    root = tmp_path_factory.mktemp("cli")
    cfg = write_yaml(root / "mqar.yaml", raw_config(root / "placeholder"))
    out = root / "run"
    code = main(
        [
            "train",
            str(cfg),
            "--set",
            f"train.out_dir={out}",
            "--set",
            "train.steps=3",
            "--set",
            "task.test_num_kv_pairs=[1, 2]",
        ]
    )
    assert code == 0
    return out


def test_configs_lists_task_bases_and_the_model_spec_grammar(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bases = ["lm", "lm_1.3b", "lm_760m", "lm_tiny", "mqar", "mqar_capacity", "niah"]
    bases += ["niah_multikey", "niah_uuid"]
    assert lines[:-1] == sorted(p.stem for p in CONFIGS.glob("*.yaml")) == bases
    assert lines[-1].startswith("model specs (growmem train BASE --model SPEC): 'transformer'")


def test_train_help_names_the_model_spec(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--model SPEC" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "model spec" in capsys.readouterr().out


def test_train_a_model_spec_on_a_config(tmp_path, capsys):
    """The spec reaches the model, through training and evaluation: explicit segments here,
    which only a config that passes them to the op gets right for 32-token sequences."""
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run", train={"steps": 1}))
    assert main(["train", str(cfg), "--model", "swla+grm@8,8,16"]) == 0
    model = tmp_path / "run_swla_grm_8_8_16" / "model"
    config = GrowMemForCausalLM.from_pretrained(model).config
    assert config.memory.rule == "swla" and config.memory.caching.segments == (8, 8, 16)
    capsys.readouterr()
    assert main(["eval", str(model), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.endswith("(model swla+grm@8,8,16)\n")


def test_bad_model_spec_is_one_line(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    line = fails(capsys, ["train", str(cfg), "--model", "gated_delta+grn"], "unknown aggregation")
    assert "'gated_delta+grn'" in line and "'loglinear'" in line and "'titans'" in line
    fails(capsys, ["train", str(cfg), "--model", "transformer@4"], "transformer has no memory")
    assert not (tmp_path / "run").exists()


def test_train_applies_overrides(mqar_run, capsys):
    from growmem.training.checkpoint import read_run_config

    recorded = read_run_config(mqar_run / "model")
    assert recorded["train"]["steps"] == 3
    assert recorded["train"]["out_dir"] == str(mqar_run)
    assert recorded["task"]["test_num_kv_pairs"] == [1, 2]
    assert not (mqar_run.parent / "placeholder").exists()


def test_eval_writes_json_and_plot(mqar_run, capsys):
    model = mqar_run / "model"
    assert main(["eval", str(model)]) == 0
    out = capsys.readouterr().out
    results = json.loads((model / "eval-mqar.json").read_text())
    assert (model / "eval-mqar.png").stat().st_size > 0
    assert [(s["seq_len"], s["num_kv_pairs"]) for s in results["slices"]] == [(32, 1), (32, 2)]
    # the same model on the same test set as the end-of-training evaluation
    assert results == json.loads((model / "eval.json").read_text())
    assert json.loads(out.splitlines()[0]) == {"accuracy": results["accuracy"]}


def test_eval_post_training_mc(mqar_run, tmp_path, capsys):
    model = mqar_run / "model"
    assert main(["eval", str(model), "--post-training-mc", "16", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.endswith("(model gated_delta+mean@16)\n")
    results = json.loads((tmp_path / "eval-mqar-mc16.json").read_text())
    assert (tmp_path / "eval-mqar-mc16.png").is_file()
    assert len(results["slices"]) == 2
    assert not (tmp_path / "eval-mqar.json").exists()


def test_eval_lengths(mqar_run, tmp_path):
    model = mqar_run / "model"
    assert main(["eval", str(model), "--lengths", "16", "64", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "eval-mqar.json").read_text())
    assert [(s["seq_len"], s["num_kv_pairs"]) for s in results["slices"]] == [
        (16, 1),
        (16, 2),
        (64, 1),
        (64, 2),
    ]


def test_eval_kv_pairs_keeps_the_slices_that_fit(mqar_run, tmp_path, capsys):
    model = mqar_run / "model"
    args = ["eval", str(model), "--lengths", "16", "32", "--kv-pairs", "2", "8"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "eval-mqar.json").read_text())
    # 8 pairs need 32 tokens, so (16, 8) is left out
    assert [(s["seq_len"], s["num_kv_pairs"]) for s in results["slices"]] == [
        (16, 2),
        (32, 2),
        (32, 8),
    ]
    assert main(["eval", str(model), "--lengths", "16", "--kv-pairs", "8"]) == 2
    assert "no test slice fits" in capsys.readouterr().err
    assert main(["eval", str(model), "--task", "lm", "--kv-pairs", "2"]) == 2
    assert "--kv-pairs applies to the mqar task" in capsys.readouterr().err


def test_eval_data_seed_draws_other_examples(mqar_run, tmp_path, capsys, monkeypatch):
    import growmem.evaluate

    seen = []
    real = growmem.evaluate.evaluate_mqar

    def spy(model, slices, **kwargs):
        seen.append(torch.cat([s.input_ids for s in slices]))
        return real(model, slices, **kwargs)

    monkeypatch.setattr(growmem.evaluate, "evaluate_mqar", spy)
    model = mqar_run / "model"
    for seed in ([], ["--data-seed", "1000"], ["--data-seed", "1000"]):
        assert main(["eval", str(model), *seed, "--out", str(tmp_path)]) == 0
    default, held_out, again = seen
    assert not torch.equal(default, held_out) and torch.equal(held_out, again)
    assert main(["eval", str(model), "--task", "lm", "--data-seed", "3"]) == 2
    assert "--data-seed applies to the mqar and niah tasks" in capsys.readouterr().err


def test_eval_niah_uses_the_runs_needles_and_training_length(tmp_path, monkeypatch):
    """growmem eval of a multi-key S-NIAH model evaluates with the run's needles, marks its
    lengths against the run's training length, and defaults to the run's lengths."""
    import growmem.evaluate

    task = {"name": "niah", "variant": 1, "seq_len": 520, "num_train_examples": 2}
    task |= {"num_needles": 2, "eval_lengths": [500, 700], "num_eval_examples": 1}
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run", task=task))
    assert main(["train", str(cfg), "--set", "train.steps=1", "--set", "train.batch_size=2"]) == 0
    calls = []
    real = growmem.evaluate.evaluate_niah

    def spy(model, tokenizer, **kwargs):
        calls.append(kwargs)
        return real(model, tokenizer, **kwargs)

    monkeypatch.setattr(growmem.evaluate, "evaluate_niah", spy)
    model = str(tmp_path / "run" / "model")
    assert main(["eval", model, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", model, "--lengths", "600", "--out", str(tmp_path / "b")]) == 0
    assert [(c["num_needles"], c["train_length"], c["lengths"]) for c in calls] == [
        (2, 520, [500, 700]),
        (2, 520, [600]),
    ]
    results = json.loads((tmp_path / "a" / "eval-niah.json").read_text())
    assert [r["regime"] for r in results["lengths"]] == ["within", "beyond"]
    assert results["num_needles"] == 2


def test_eval_of_a_checkpoint_folder(mqar_run, tmp_path):
    folder = mqar_run / "checkpoints" / (mqar_run / "checkpoints" / "latest").read_text().strip()
    assert main(["eval", str(folder), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "eval-mqar.json").is_file()


def test_eval_missing_model_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("growmem eval: error:") and "nowhere" in err


def test_eval_folder_that_is_no_model(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "run.yaml" in capsys.readouterr().err


def test_eval_lengths_beyond_max_positions(tmp_path, capsys):
    cfg = write_yaml(
        tmp_path / "c.yaml",
        raw_config(tmp_path / "run", model={"max_position_embeddings": 64}, train={"steps": 1}),
    )
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "model"), "--lengths", "128"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_train_unknown_key(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    assert main(["train", str(cfg), "--set", "train.learning_rate=0.1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("growmem train: error:")
    assert "learning_rate" in err and "valid keys" in err and "'lr'" in err
    assert not (tmp_path / "run").exists()


def test_train_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    assert main(["train", str(cfg), "--set", "train.steps"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_eval_tokenizer_mismatch(tmp_path, capsys):
    corpus = text_corpus(tmp_path / "corpus")
    raw = raw_config(
        tmp_path / "run",
        task={"name": "lm", "corpus": str(corpus), "seq_len": 32, "eval_blocks": 2},
        train={"steps": 1},
    )
    assert main(["train", str(write_yaml(tmp_path / "lm.yaml", raw))]) == 0
    model = tmp_path / "run" / "model"
    assert main(["eval", str(model), "--max-blocks", "2", "--out", str(tmp_path / "ok")]) == 0
    assert "bits_per_byte" in json.loads((tmp_path / "ok" / "eval-lm.json").read_text())
    capsys.readouterr()

    # the layout before Hugging Face tokenizers: growmem's tokenizer in model/tokenizer/
    for name in ("tokenizer.json", "tokenizer_config.json", "growmem_tokenizer.json"):
        (model / name).unlink()
    ByteTokenizer().save(model / "tokenizer")
    assert main(["eval", str(model), "--max-blocks", "2", "--out", str(tmp_path / "old")]) == 0
    assert (tmp_path / "old" / "eval-lm.json").is_file()

    shutil.rmtree(model / "tokenizer")
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    BPETokenizer.train(texts, 300).save(model)
    assert main(["eval", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("growmem eval: error:") and "does not match" in err
    assert not (model / "eval-lm.json").exists()

    (model / "growmem_tokenizer.json").unlink()
    assert main(["eval", str(model)]) == 2
    assert "tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input: one line, exit 2


def one_line_error(capsys, command: str) -> str:
    """The single line a failed command printed to stderr (no traceback, no ``^`` excerpt)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"growmem {command}: error: "), lines
    assert "^" not in lines[0] and "Traceback" not in lines[0]
    return lines[0]


def fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the command, which must fail with exit status 2 and one line naming ``expected``."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    assert code == 2
    line = one_line_error(capsys, argv[0])
    for text in expected:
        assert text in line, line
    return line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model: {hidden_size: 16\ntrain: [\n", ["line 2, column 6: not valid YAML: expected"]),
        (
            "train:\n  lr: !!python/object/apply:os.system ['true']\n",
            ["line 2, column 7", "!!python"],
        ),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", ["line 3, column 3: duplicate key 'lr'"]),
        ("model:\n  rule: \x00\n", ["line 2: character #x0000 is not allowed"]),
        ("base: 5\n", ["base must name a config or a list of them, got 5"]),
    ],
    ids=["syntax", "python-tag", "duplicate-key", "nul", "base-int"],
)
def test_bad_config_file(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    fails(capsys, ["train", str(path)], f"config {path}", *expected)


def test_binary_config_file(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"model:\n  rule: linear\n" + bytes(range(128, 256)))
    fails(capsys, ["train", str(path)], f"config {path}, line 3: not UTF-8 text (byte 0x80)")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.betas=[0.9]", "train.betas must be two numbers [beta1, beta2], got [0.9]"),
        ("train.betas=[a, b]", "train.betas must be of type list[float], got ['a', 'b']"),
        ("train.betas=[0.9, 1.0]", "train.betas must be in [0.0, 1.0)"),
        ("train.lr=!!python/object/apply:os.system [true]", "--set train.lr=!!python"),
        ("train.betas=[0.9", "--set train.betas=[0.9, line 1, column 5: not valid YAML"),
        ("train.eval_every=-1", "train.eval_every must be >= 0, got -1"),
        ("train.checkpoint_every=-2", "train.checkpoint_every must be >= 0, got -2"),
        ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
        ("train.threads=-1", "train.threads must be >= 0"),
        ("train.seed=-1", "train.seed must be >= 0"),
        ("train.steps=null", "train.steps must be of type int, got None"),
        ("train.lr=.nan", "train.lr must be > 0.0 and finite, got nan"),
        ("train.lr=.inf", "train.lr must be > 0.0 and finite, got inf"),
        ("train.eps=0", "train.eps must be > 0.0"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0.0"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0.0, 1.0]"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0.0"),
        ("train.out_dir=''", "train.out_dir must name a folder"),
        ("train.device=tpu", "train.device must be 'auto', 'cpu', 'cuda'"),
        ("task.test_seq_lens=abc", "task.test_seq_lens must be of type list[int] | None"),
        ("task.num_kv_pairs=[a]", "task.num_kv_pairs must be of type int | list[int]"),
        ("task.num_test_examples=0", "task.num_test_examples must be >= 1"),
        ("train..lr=1", "--set expects section.key=value"),
        ("model.memory.caching={segments: lin}", "segments must be one of ['log'], got 'lin'"),
        ("model.memory.expansion=2", "expansion is a setting of the deep memories"),
        ("model.memory.caching.top_k=0", "top_k must be a positive int, got 0"),
    ],
)
def test_bad_setting(tmp_path, capsys, override, expected):
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    fails(capsys, ["train", str(cfg), "--set", override], expected)
    assert not (tmp_path / "run").exists()


COUNTS = "int | list[int]"  # how the config names a count or a mixture of counts


@pytest.mark.parametrize(
    "task, expected",
    [
        ({"name": "niah", "variant": 7}, "task.variant must be 1, 2 or 3, got 7"),
        ({"name": "niah", "haystack": "hay"}, "task.haystack must be 'noise' or 'essay'"),
        ({"name": "lm", "eval_split": "train"}, "task.eval_split must be 'val' or 'test'"),
        ({"name": "niah", "eval_lengths": [0]}, "task.eval_lengths must be >= 1, got [0]"),
        ({"name": "niah", "num_needles": 0}, "task.num_needles must be >= 1, got 0"),
        (
            {"name": "niah", "num_needles": 1.5},
            f"task.num_needles must be of type {COUNTS}, got 1.5",
        ),
        (
            {"name": "niah", "num_needles": True},
            f"task.num_needles must be of type {COUNTS}, got True",
        ),
        (
            {"name": "niah", "num_needles": []},
            "task.num_needles must be a count or a non-empty list",
        ),
        ({"name": "niah", "eval_num_needles": 0}, "task.eval_num_needles must be >= 1, got 0"),
        (
            {"name": "niah", "num_needles": [1, 4], "curriculum_steps": [0]},
            "task.curriculum_steps must give a step per count of task.num_needles [1, 4]",
        ),
        (
            {"name": "niah", "num_needles": [1, 4], "curriculum_steps": [0, 0]},
            "task.curriculum_steps must increase from 0, got [0, 0]",
        ),
        (
            {"name": "niah", "num_needles": [1, 4], "curriculum_steps": [5, 9]},
            "task.curriculum_steps must increase from 0, got [5, 9]",
        ),
    ],
)
def test_bad_task_setting(tmp_path, capsys, task, expected):
    raw = raw_config(tmp_path / "run")
    raw["task"] = task
    fails(capsys, ["train", str(write_yaml(tmp_path / "c.yaml", raw))], expected)


def test_output_folder_that_cannot_be_used(tmp_path, capsys, monkeypatch):
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run"))
    (tmp_path / "a-file").write_text("")
    out = ["--set", f"train.out_dir={tmp_path / 'a-file'}"]
    fails(capsys, ["train", str(cfg), *out], "a-file is a file, not a folder")
    out = ["--set", f"train.out_dir={tmp_path / 'a-file' / 'run'}"]
    fails(capsys, ["train", str(cfg), *out], "train.out_dir: cannot create the folder")

    # a read-only folder (tests may run as root, whom permissions do not stop: the refusal
    # is made by the file system calls themselves)
    def refused(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setattr(os, "mkdir", refused)
    out = ["--set", f"train.out_dir={read_only / 'run'}"]
    fails(capsys, ["train", str(cfg), *out], "cannot create the folder", "Permission denied")
    monkeypatch.undo()
    open_file = os.open

    def open_refusing_the_lock(path, *args, **kwargs):
        return (refused if str(path).endswith(".lock") else open_file)(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_refusing_the_lock)
    out = ["--set", f"train.out_dir={read_only}"]
    fails(capsys, ["train", str(cfg), *out], f"cannot write in the run folder {read_only}")
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--lengths", "0"], "argument --lengths: expected an integer >= 1, got '0'"),
        (["--kv-pairs", "0"], "argument --kv-pairs: expected an integer >= 1"),
        (["--max-blocks", "-1"], "argument --max-blocks: expected an integer >= 0"),
        (["--threads", "-1"], "argument --threads: expected an integer >= 0"),
        (["--post-training-mc", "0"], "argument --post-training-mc: expected an integer >= 1"),
        (["--device", "tpu"], "--device must be 'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_eval_argument(mqar_run, capsys, args, expected):
    fails(capsys, ["eval", str(mqar_run / "model"), *args], expected)


def test_eval_on_a_machine_without_the_device(mqar_run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fails(capsys, ["eval", str(mqar_run / "model"), "--device", "cuda"], "CUDA is not available")


def test_eval_moves_the_model_to_the_device(mqar_run, tmp_path, monkeypatch):
    """--device reaches the model (``to`` is recorded; the CPU stands for the device)."""
    moved = []
    to = GrowMemForCausalLM.to

    def recording_to(self, *args, **kwargs):
        moved.append(args)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(GrowMemForCausalLM, "to", recording_to)
    assert main(["eval", str(mqar_run / "model"), "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert moved == [(torch.device("cpu"),)]


def test_train_and_eval_errors_in_what_they_are_given_are_one_line(mqar_run, tmp_path, capsys):
    fails(capsys, ["eval", str(mqar_run)], "no run.yaml", f"did you mean {mqar_run / 'model'}?")
    (tmp_path / "a-file").write_text("")
    fails(capsys, ["eval", str(mqar_run / "model"), "--out", str(tmp_path / "a-file")], "--out")
    fails(capsys, ["train", "mqar", "--resume", "--auto-resume"], "not allowed with argument")
    fails(capsys, ["train", "mqar", "--stop-after", "0"], "expected an integer >= 1")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (
            lambda m: (m / "run.yaml").write_text("model: {hidden_size: 16\n"),
            "line 2, column 1: not valid YAML",
        ),
        (
            lambda m: (m / "run.yaml").write_text("- 1\n"),
            "run.yaml is damaged: expected the mappings",
        ),
        (lambda m: (m / "run.yaml").write_text("model: {}\n"), "run.yaml is damaged"),
        (lambda m: (m / "config.json").write_text("{not json"), "config.json"),
        (lambda m: (m / "config.json").unlink(), "has no config.json: not a complete model folder"),
    ],
    ids=["run-yaml-syntax", "run-yaml-list", "run-yaml-sections", "config-json", "no-config-json"],
)
def test_damaged_model_folder(mqar_run, tmp_path, capsys, damage, expected):
    """Damaged files of an older folder (no SHA256SUMS) are named; with checksums, the
    checksum names them first."""
    model = tmp_path / "model"
    shutil.copytree(mqar_run / "model", model)
    damage(model)
    fails(
        capsys,
        ["eval", str(model)],
        "differs from the sha256" if (model / "config.json").is_file() else expected,
    )
    (model / "SHA256SUMS").unlink()
    fails(capsys, ["eval", str(model)], expected)


def test_no_warning_or_stray_output_from_train_and_eval(tmp_path, capfd):
    """Neither a Python warning (deprecations included) nor a transformers log record, nor a
    progress bar of transformers' saves, while training and evaluating."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # transformers warns once per process
    cfg = write_yaml(tmp_path / "c.yaml", raw_config(tmp_path / "run", train={"steps": 2}))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["train", str(cfg)]) == 0
            model = str(tmp_path / "run" / "model")
            assert main(["eval", model, "--out", str(tmp_path / "eval")]) == 0
    finally:
        hf_logger.removeHandler(handler)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []
    assert capfd.readouterr().err == ""
