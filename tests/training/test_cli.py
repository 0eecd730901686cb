"""The growmem command: configs, train, eval and its error reporting."""

from __future__ import annotations

import json
import shutil

import pytest

from growmem.cli import CONFIGS, main
from growmem.tasks import BPETokenizer

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


def test_configs_lists_presets(capsys):
    assert main(["configs"]) == 0
    listed = capsys.readouterr().out.split()
    presets = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert presets and listed == presets
    assert "mqar_gated_delta" in listed


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


def test_eval_post_training_mc(mqar_run, tmp_path):
    model = mqar_run / "model"
    assert main(["eval", str(model), "--post-training-mc", "16", "--out", str(tmp_path)]) == 0
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

    shutil.rmtree(model / "tokenizer")
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    BPETokenizer.train(texts, 300).save(model / "tokenizer")
    assert main(["eval", str(model)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("growmem eval: error:") and "does not match" in err
    assert not (model / "eval-lm.json").exists()

    shutil.rmtree(model / "tokenizer")
    assert main(["eval", str(model)]) == 2
    assert "tokenizer" in capsys.readouterr().err
