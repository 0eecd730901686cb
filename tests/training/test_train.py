"""The training loop: end to end on every task, learning, exact resume, gradient accumulation
and DDP equivalence, run-folder safety, checkpoint integrity, Ctrl-C."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import growmem.models  # noqa: F401  (registers the Auto classes)
from growmem.cli import main
from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.tasks import BPETokenizer, load_tokenizer
from growmem.train import train
from growmem.training.checkpoint import (
    ChecksumError,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    read_run_config,
    save_checkpoint,
)
from growmem.utils.provenance import provenance

from .common import (
    PYTHON,
    eval_lines,
    loss_lines,
    raw_config,
    read_metrics,
    subprocess_env,
    text_corpus,
    tiny_config,
    write_yaml,
)

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def deterministic(lines: list[dict]) -> list[dict]:
    """Metric lines without the wall-clock throughput."""
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- end to end, MQAR


def test_mqar_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    config = tiny_config(
        out,
        task={"test_num_kv_pairs": [1, 2], "test_seq_lens": [32, 48]},
        train={"steps": 8, "eval_every": 4, "warmup_steps": 4},
    )
    final = train(config)
    assert final == out / "model"
    for name in ("config.json", "model.safetensors", "run.yaml", "eval.json"):
        assert (final / name).is_file(), name
    assert not (final / "tokenizer").exists()  # MQAR works on ids

    model = AutoModelForCausalLM.from_pretrained(final)
    assert isinstance(model, GrowMemForCausalLM)
    assert model.config.vocab_size == 32 and model.config.hidden_size == 16
    # the saved model is the one of the last step (also the last checkpoint)
    assert_same_weights(final, latest_checkpoint(out))
    reference = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **config.model))
    load_weights(final, reference)
    for name, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name

    results = json.loads((final / "eval.json").read_text())
    assert results.pop("provenance") == provenance()
    slices = {(s["seq_len"], s["num_kv_pairs"]): s["accuracy"] for s in results["slices"]}
    assert set(slices) == {(32, 1), (32, 2), (48, 1), (48, 2)}
    assert all(0.0 <= a <= 1.0 for a in slices.values())
    assert 0.0 <= results["accuracy"] <= 1.0
    assert min(slices.values()) <= results["accuracy"] <= max(slices.values())

    recorded = read_run_config(final)
    # the memory with every setting written out: a later default cannot change its meaning
    memory = GrowMemConfig(vocab_size=32, **config.model).memory.to_dict()
    assert recorded["model"] == {**config.model, "memory": memory}
    assert "gate_norm" in memory["caching"] and "gate_temperature" in memory
    assert recorded["train"]["steps"] == 8

    lines = loss_lines(out)
    assert [m["step"] for m in lines] == list(range(1, 9))
    for m in lines:
        assert set(m) == METRIC_KEYS
        assert all(math.isfinite(m[k]) for k in METRIC_KEYS)
        assert m["grad_norm"] > 0 and m["tokens_per_s"] > 0
    # warmup: the rate of step s (1-based) is lr * s / warmup_steps for s <= warmup_steps
    for m in lines[:4]:
        assert m["lr"] == pytest.approx(1e-2 * m["step"] / 4)
    assert lines[4]["lr"] > lines[-1]["lr"] >= 1e-2 * 0.1  # cosine decay to min_lr_ratio
    evals = eval_lines(out)
    assert [m["step"] for m in evals] == [0, 4, 8]  # step 0: the initial model
    assert evals[-1]["eval"] == results
    assert set(evals[0]["eval"]) == {"accuracy", "slices"}
    # the metrics file holds nothing else
    assert len(read_metrics(out)) == len(lines) + len(evals)


def test_loss_decreases_on_easy_mqar(tmp_path):
    # two key-value pairs over a 32-token vocabulary: values come from the upper half, so
    # even learning only where values go brings the loss from ln(32) to about ln(16)
    out = tmp_path / "run"
    config = tiny_config(
        out,
        model={"hidden_size": 32},
        task={"num_train_examples": 1024},
        train={"steps": 40, "batch_size": 16, "warmup_steps": 4, "log_every": 1},
    )
    train(config)
    losses = [m["loss"] for m in loss_lines(out)]
    assert len(losses) == 40
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first > math.log(32) - 0.3  # starts near chance
    assert last < first - 0.4, losses


# ---------------------------------------------------------------- exact resume


def test_resume_reproduces_uninterrupted_run(tmp_path):
    settings = {"steps": 9, "checkpoint_every": 3, "eval_every": 4, "keep_checkpoints": 5}
    task = {"num_kv_pairs": [1, 3], "test_num_kv_pairs": [1, 3]}
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, task=task, train=settings))

    config_b = tiny_config(b, task=task, train=settings)
    assert train(config_b, stop_after=5) is None  # 5 is no checkpoint step: one is added
    assert latest_checkpoint(b).name == "step_00000005"
    assert load_trainer_state(latest_checkpoint(b))["step"] == 5
    assert max(m["step"] for m in read_metrics(b)) == 5
    assert not (b / "model").exists()
    # a line written after the checkpoint (the session died during step 6) is dropped
    with open(b / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 123.0, "lr": 0.0, "grad_norm": 0.0}) + "\n")
    assert train(config_b, resume=True) == b / "model"

    assert deterministic(loss_lines(b)) == deterministic(loss_lines(a))
    assert [m["step"] for m in loss_lines(b)] == list(range(1, 10))
    assert eval_lines(b) == eval_lines(a)
    assert [m["step"] for m in eval_lines(b)] == [0, 4, 8, 9]
    assert_same_weights(a / "model", b / "model")
    assert (a / "model" / "eval.json").read_text() == (b / "model" / "eval.json").read_text()
    steps_a = sorted(p.name for p in (a / "checkpoints").glob("step_*"))
    assert steps_a == ["step_00000003", "step_00000006", "step_00000009"]
    assert_same_weights(a / "checkpoints" / "step_00000006", b / "checkpoints" / "step_00000006")


def test_auto_resume_starts_continues_or_starts_over(tmp_path):
    settings = {"steps": 6, "checkpoint_every": 3}
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, train=settings))
    config_b = tiny_config(b, train=settings)
    # a session that logged a step but died before its first checkpoint is begun afresh
    b.mkdir()
    (b / "config.yaml").write_text("stale\n")
    (b / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    assert train(config_b, resume="auto", stop_after=4) is None  # fresh start
    assert train(config_b, resume="auto") == b / "model"  # continues from step 4
    assert deterministic(loss_lines(b)) == deterministic(loss_lines(a))
    assert_same_weights(a / "model", b / "model")
    with pytest.raises(ValueError, match="resume"):
        train(config_b, resume="sometimes")


def test_resume_twice_at_checkpoint_steps(tmp_path):
    settings = {"steps": 6, "checkpoint_every": 2}
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, train=settings))
    config_b = tiny_config(b, train=settings)
    assert train(config_b, stop_after=2) is None
    assert train(config_b, resume=True, stop_after=4) is None
    train(config_b, resume=True)
    assert deterministic(loss_lines(b)) == deterministic(loss_lines(a))
    assert eval_lines(b) == eval_lines(a)
    assert_same_weights(a / "model", b / "model")


# ---------------------------------------------------------------- equivalences


def test_grad_accumulation_equals_larger_batch(tmp_path):
    # examples of 1 and 4 key-value pairs: micro-batches hold different numbers of labelled
    # tokens, so only the global token mean makes the two runs agree
    task = {"num_kv_pairs": [1, 4]}
    accumulated = tiny_config(
        tmp_path / "a", task=task, train={"steps": 4, "batch_size": 2, "grad_accum": 2}
    )
    whole = tiny_config(tmp_path / "b", task=task, train={"steps": 4, "batch_size": 4})
    train(accumulated)
    train(whole)
    a, b = loss_lines(tmp_path / "a"), loss_lines(tmp_path / "b")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert rel(x["loss"], y["loss"]) < 1e-5, (x, y)
        assert rel(x["grad_norm"], y["grad_norm"]) < 1e-4, (x, y)
    # and the runs are not trivially equal to a run on other data
    other = tiny_config(tmp_path / "c", task=task, train={"steps": 1, "batch_size": 4, "seed": 1})
    train(other)
    assert rel(loss_lines(tmp_path / "c")[0]["loss"], b[0]["loss"]) > 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_with_double_batch(tmp_path):
    task = {"num_kv_pairs": [1, 4]}
    steps = {"steps": 3, "checkpoint_every": 2}
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    cfg = write_yaml(
        tmp_path / "ddp.yaml", raw_config(ddp_dir, task=task, train={**steps, "batch_size": 2})
    )
    try:
        port = free_port()
    except OSError as error:
        pytest.fail(f"the sandbox forbids local sockets, DDP cannot be tested: {error}")
    command = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "growmem.cli",
        "train",
        str(cfg),
    ]
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # rank 0 alone prints: the final message once
    assert done.stdout.count("model saved to") == 1, done.stdout
    train(tiny_config(single_dir, task=task, train={**steps, "batch_size": 4}))

    ddp, single = loss_lines(ddp_dir), loss_lines(single_dir)
    # rank 0 alone writes: every step is logged once
    assert [m["step"] for m in ddp] == [m["step"] for m in single] == [1, 2, 3]
    for x, y in zip(ddp, single, strict=True):
        assert rel(x["loss"], y["loss"]) < 1e-5, (x, y)
        # AdamW barely sees a gradient scale, the norm does: the ranks average to the mean
        assert rel(x["grad_norm"], y["grad_norm"]) < 1e-4, (x, y)
        assert x["lr"] == y["lr"]
    assert len(eval_lines(ddp_dir)) == 1
    assert sorted(p.name for p in (ddp_dir / "checkpoints").iterdir()) == [
        "latest",
        "step_00000002",
        "step_00000003",
    ]
    assert (ddp_dir / "model" / "model.safetensors").is_file()
    # the DDP checkpoint is a plain model (no "module." prefixes) that loads strictly
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **tiny_config(ddp_dir).model))
    load_weights(ddp_dir / "model", model)


# ---------------------------------------------------------------- LM and NIAH


def test_lm_byte_tokenizer(tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    config = tiny_config(
        out,
        task={"name": "lm", "corpus": str(corpus), "seq_len": 64, "eval_blocks": 4},
        train={"steps": 3},
    )
    train(config)
    results = json.loads((out / "model" / "eval.json").read_text())
    assert results["blocks"] == 4 and results["tokens"] == 4 * 63
    assert results["perplexity"] == pytest.approx(math.exp(results["loss"]))
    # near a uniform guess over 259 tokens after 3 steps: 8 bits a byte
    assert 4.0 < results["bits_per_byte"] < 10.0
    assert results["bits_per_byte"] == pytest.approx(results["loss"] / math.log(2), rel=1e-6)
    rows = results["by_position"]
    assert rows[0]["start"] == 1 and rows[-1]["end"] == 63
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in rows)
    assert load_tokenizer(out / "model").fingerprint() == "byte-259"
    assert read_run_config(out / "model")["tokenizer_fingerprint"] == "byte-259"
    assert GrowMemConfig.from_pretrained(out / "model").vocab_size == 259
    # the run folder gives text (growmem generate reads its model/)
    assert main(["generate", str(out), "--prompt", "def", "--max-new-tokens", "4"]) == 0


def test_lm_bpe_tokenizer_saved_and_reused_on_resume(tmp_path, monkeypatch):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    config = tiny_config(
        out,
        task={
            "name": "lm",
            "corpus": str(corpus),
            "seq_len": 32,
            "tokenizer": "bpe",
            "bpe_vocab_size": 300,
            "eval_blocks": 2,
        },
        train={"steps": 4},
    )
    assert train(config, stop_after=2) is None
    saved = load_tokenizer(out / "tokenizer")
    assert isinstance(saved, BPETokenizer)
    assert 259 < saved.vocab_size <= 300
    fingerprint = saved.fingerprint()

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed run trained a new BPE instead of reusing its own")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    train(config, resume=True)
    assert load_tokenizer(out / "tokenizer").fingerprint() == fingerprint
    assert load_tokenizer(out / "model").fingerprint() == fingerprint
    assert read_run_config(out / "model")["tokenizer_fingerprint"] == fingerprint
    assert GrowMemConfig.from_pretrained(out / "model").vocab_size == saved.vocab_size
    assert "loss" in json.loads((out / "model" / "eval.json").read_text())
    # the model folder and the checkpoints load with transformers' Auto classes alone
    for folder in (out / "model", latest_checkpoint(out)):
        hf = AutoTokenizer.from_pretrained(folder)
        assert hf("the café <eos>")["input_ids"] == saved.encode("the café <eos>")
        model = AutoModelForCausalLM.from_pretrained(folder)
        ids = (saved.pad_id, saved.bos_id, saved.eos_id)
        config = model.config
        assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == ids
        assert model.generation_config.eos_token_id == saved.eos_id
        assert model.generation_config.pad_token_id == saved.pad_id
    card = (out / "model" / "README.md").read_text()
    assert "| training | 4 steps × 4 sequences × 32 tokens = 512 token slots" in card
    assert f"| loss | {json.loads((out / 'model' / 'eval.json').read_text())['loss']:.4g} |" in card


def test_niah_tiny(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(
        out,
        task={
            "name": "niah",
            "variant": 1,
            "seq_len": 384,  # the shortest S-NIAH-1 prompt is about 360 bytes
            "num_train_examples": 4,
            "eval_lengths": [384, 768],
            "num_eval_examples": 2,
        },
        train={"steps": 2, "batch_size": 2},
    )
    train(config)
    results = json.loads((out / "model" / "eval.json").read_text())
    assert [r["length"] for r in results["lengths"]] == [384, 768]
    for row in results["lengths"]:
        assert 0.0 <= row["accuracy"] <= 1.0
        # an exact match means every answer token was the greedy (= teacher-forced) choice
        assert row["accuracy"] <= row["token_accuracy"] <= 1.0
        assert len(row["depths"]) == 2
    assert results["accuracy"] == pytest.approx(sum(r["accuracy"] for r in results["lengths"]) / 2)
    assert results["token_accuracy"] == pytest.approx(
        sum(r["token_accuracy"] for r in results["lengths"]) / 2
    )
    assert (out / "model" / "tokenizer.json").is_file()
    assert [m["step"] for m in loss_lines(out)] == [1, 2]


# ---------------------------------------------------------------- run folder safety


def test_out_dir_reuse_and_resume_errors(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(out, train={"steps": 2})
    train(config)
    before = snapshot(out)
    with pytest.raises(ValueError, match="--resume"):
        train(config)
    with pytest.raises(ValueError, match="another model or task"):
        train(tiny_config(out, model={"hidden_size": 32}, train={"steps": 2}), resume=True)
    with pytest.raises(ValueError, match="another model or task"):
        train(tiny_config(out, task={"num_kv_pairs": 3}, train={"steps": 2}), resume=True)
    assert snapshot(out) == before


def test_resume_without_checkpoint(tmp_path):
    out = tmp_path / "fresh"
    config = tiny_config(out, train={"steps": 2})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config, resume=True)
    # the failed resume left nothing that blocks a fresh start in the folder
    assert train(config) == out / "model"


def test_seq_len_beyond_max_position_embeddings(tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        train(tiny_config(tmp_path / "a", model={"max_position_embeddings": 16}))
    # the test slices count too
    config = tiny_config(
        tmp_path / "b", model={"max_position_embeddings": 32}, task={"test_seq_lens": [64]}
    )
    with pytest.raises(ValueError, match="64"):
        train(config)


def test_stop_after_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="stop_after"):
        train(tiny_config(tmp_path / "run"), stop_after=0)


# ---------------------------------------------------------------- checkpoint integrity


def complete(folder: Path) -> bool:
    names = {"config.json", "model.safetensors", "run.yaml", "trainer_state.pt"}
    return names <= {p.name for p in folder.iterdir()}


def test_checkpoints_kept_complete_and_checked(tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = tiny_config(out, train={"steps": 5, "checkpoint_every": 1, "keep_checkpoints": 2})
    train(config)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    latest = latest_checkpoint(out)
    assert latest == root / "step_00000005" and complete(latest)
    assert load_trainer_state(latest)["step"] == 5
    model_config = GrowMemConfig(vocab_size=32, **config.model)
    model = GrowMemForCausalLM(model_config)
    load_weights(latest, model)

    # a write that fails half-way leaves latest on the previous, complete checkpoint
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(out, 6, model, config.to_dict(), {}, keep=2)
    monkeypatch.undo()
    assert latest_checkpoint(out) == latest and complete(latest)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]

    # a later successful save moves latest and drops the oldest
    save_checkpoint(out, 6, model, config.to_dict(), {"note": 1}, keep=2)
    assert latest_checkpoint(out).name == "step_00000006"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000005", "step_00000006"]
    assert load_trainer_state(root / "step_00000006") == {"step": 6, "note": 1}


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(out, train={"steps": 2})
    train(config)
    folder = latest_checkpoint(out)
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **config.model))

    other = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **{**config.model, "hidden_size": 32}))
    with pytest.raises(ValueError, match="another model"):
        load_weights(folder, other)
    deeper = GrowMemForCausalLM(
        GrowMemConfig(vocab_size=32, **{**config.model, "num_hidden_layers": 2})
    )
    with pytest.raises(ValueError, match="another model"):
        load_weights(folder, deeper)

    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match=r"model\.safetensors differs from the sha256"):
        load_weights(folder, model)
    state = folder / "trainer_state.pt"
    raw = state.read_bytes()
    state.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ChecksumError, match=r"trainer_state\.pt differs from the sha256"):
        load_trainer_state(folder)

    # without checksums (a folder of an older growmem) the formats' own checks remain
    (folder / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights(folder, model)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_weights(folder, model)
    path.unlink()
    with pytest.raises(FileNotFoundError):
        load_weights(folder, model)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_trainer_state(folder)

    (out / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(FileNotFoundError, match="step_00000099"):
        latest_checkpoint(out)


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_keeps_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    raw = raw_config(out, train={"steps": 60, "checkpoint_every": 1, "keep_checkpoints": 2})
    cfg = write_yaml(tmp_path / "run.yaml", raw)
    command = [PYTHON, "-m", "growmem.cli", "train", str(cfg)]
    # the child gets the default SIGINT disposition even if this worker ignores SIGINT
    process = subprocess.Popen(
        command,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        pointer = out / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not pointer.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, (stdout, stderr)
    assert "interrupted" in stdout
    assert not (out / "model").exists()

    folder = latest_checkpoint(out)
    assert complete(folder)
    step = load_trainer_state(folder)["step"]
    assert 1 <= step < 60
    assert folder.name == f"step_{step:08d}"
    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **raw["model"]))
    load_weights(folder, model)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    # the same command with --resume (in this process, to save an interpreter start)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert [m["step"] for m in loss_lines(out)] == list(range(1, 61))
    assert (out / "model" / "eval.json").is_file()
    assert latest_checkpoint(out).name == "step_00000060"


def test_a_non_finite_loss_stops_the_run_before_the_update(tmp_path, monkeypatch, capsys):
    """Step 3's loss is NaN (as after an overflow): the run stops with an error naming the
    step, its last checkpoint intact, and the CLI prints it on one line."""
    import growmem.train as train_module

    cross_entropy, calls = train_module.F.cross_entropy, []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = cross_entropy(*args, **kwargs)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(train_module.F, "cross_entropy", nan_at_step_3)
    out = tmp_path / "run"
    config = tiny_config(out, train={"checkpoint_every": 2})
    with pytest.raises(train_module.TrainingDiverged, match=r"^step 3: the loss is nan"):
        train(config)
    assert [m["step"] for m in loss_lines(out)] == [1, 2]
    assert (out / "checkpoints" / "step_00000002").is_dir()
    calls.clear()
    raw = raw_config(tmp_path / "cli", train={"checkpoint_every": 2})
    code = main(["train", str(write_yaml(tmp_path / "cli.yaml", raw))])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "step 3: the loss is nan" in err, err


def test_compiled_training_equals_eager(tmp_path):
    # aot_eager: torch.compile's tracing and autograd without code generation (fast on CPU)
    caching = {"aggregation": "grm", "segment_size": 8}
    model = {"memory": {"rule": "gated_delta", "caching": caching}}
    eager = tiny_config(tmp_path / "eager", model=model, train={"steps": 3})
    compiled = tiny_config(
        tmp_path / "compiled", model=model, train={"steps": 3, "compile": "aot_eager"}
    )
    train(eager)
    train(compiled)
    a, b = loss_lines(tmp_path / "eager"), loss_lines(tmp_path / "compiled")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert rel(y["loss"], x["loss"]) < 1e-5, (x, y)
        assert rel(y["grad_norm"], x["grad_norm"]) < 1e-4, (x, y)
    # the checkpoint holds the model's own parameter names (no torch.compile prefix)
    wa = weights(latest_checkpoint(tmp_path / "eager"))
    wb = weights(latest_checkpoint(tmp_path / "compiled"))
    assert wa.keys() == wb.keys() and not any("_orig_mod" in k for k in wb)
    assert read_run_config(latest_checkpoint(tmp_path / "compiled"))["train"]["compile"] == (
        "aot_eager"
    )
