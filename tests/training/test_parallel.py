"""train.parallel: FSDP2 on 2 gloo processes equals one process, resumes exactly and exports
a full model; activation checkpointing changes nothing; launches that cannot work are
refused with a clear error."""

from __future__ import annotations

import subprocess

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from growmem.train import train
from growmem.training.checkpoint import (
    SHARDS,
    ChecksumError,
    latest_checkpoint,
    load_trainer_state,
    load_weights,
    verify_checksums,
)
from growmem.training.config import build_config

from .common import PYTHON, eval_lines, loss_lines, raw_config, subprocess_env, tiny_config
from .fsdp_runs import MODELS, RESUMED, STEPS, STOP_AFTER, run_config, run_name
from .test_train import deterministic, free_port


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sharded_runs(root) -> None:
    """Every run of tests/training/fsdp_runs.py, by one torchrun launch of 2 processes."""
    try:
        port = free_port()
    except OSError as error:
        pytest.fail(f"the sandbox forbids local sockets, FSDP cannot be tested: {error}")
    command = [
        *(PYTHON, "-m", "torch.distributed.run", "--nproc_per_node=2"),
        *("--master_addr=127.0.0.1", f"--master_port={port}"),
        *("-m", "tests.training.fsdp_runs", str(root)),
    ]
    done = subprocess.run(
        command, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_fsdp_two_processes_equal_one_and_resume_exactly(tmp_path):
    sharded_runs(tmp_path)
    references = {}
    for spec in MODELS:
        for checkpointing in (False, True):
            name = run_name(spec, checkpointing)
            fsdp, single = tmp_path / "fsdp" / name, tmp_path / "single" / name
            # one process on the micro-batches the two sharded processes take
            train(run_config(single, spec, checkpointing, "none"))
            references[spec, checkpointing] = single
            a, b = loss_lines(fsdp), loss_lines(single)
            assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
            for x, y in zip(a, b, strict=True):
                assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=0), (name, x, y)
                # the clipping norm over both processes' shards is the whole gradient's
                assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5), (name, x, y)
                assert x["lr"] == y["lr"]
            # every process evaluates the sharded model, rank 0 alone writes: one final line,
            # that of the unsharded model
            (fsdp_eval,), (single_eval,) = eval_lines(fsdp), eval_lines(single)
            assert fsdp_eval["step"] == STEPS
            assert fsdp_eval["eval"]["slices"] == single_eval["eval"]["slices"]
            for x, y in zip(
                fsdp_eval["eval"]["gates"]["layers"],
                single_eval["eval"]["gates"]["layers"],
                strict=True,
            ):
                assert x == pytest.approx(y, rel=1e-4), name
            # the model folder holds the full weights, gathered from the shards
            assert max_difference(weights(fsdp / "model"), weights(single / "model")) < 1e-5
            model = AutoModelForCausalLM.from_pretrained(fsdp / "model")
            ids = torch.randint(0, 32, (1, 16))
            reference = AutoModelForCausalLM.from_pretrained(single / "model")
            assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4), name
    # activation checkpointing recomputes the same values: the same run, bit for bit
    for spec in MODELS:
        plain, recomputed = references[spec, False], references[spec, True]
        assert deterministic(loss_lines(plain)) == deterministic(loss_lines(recomputed)), spec
        assert max_difference(weights(plain / "model"), weights(recomputed / "model")) == 0

    # a sharded run stopped after STOP_AFTER steps and resumed equals the uninterrupted one
    uninterrupted, resumed = tmp_path / "fsdp" / run_name(*RESUMED), tmp_path / "resumed"
    assert deterministic(loss_lines(resumed)) == deterministic(loss_lines(uninterrupted))
    assert eval_lines(resumed) == eval_lines(uninterrupted)
    assert max_difference(weights(resumed / "model"), weights(uninterrupted / "model")) == 0
    # the checkpoint: shards of both processes, checked like every other file
    checkpoint = latest_checkpoint(resumed)
    assert checkpoint.name == f"step_{STEPS:08d}"
    stopped = resumed / "checkpoints" / f"step_{STOP_AFTER:08d}"
    assert load_trainer_state(stopped)["step"] == STOP_AFTER
    assert "optimizer" not in load_trainer_state(stopped)  # it is in the shards
    shards = sorted(p.name for p in (stopped / SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    listed = (stopped / "SHA256SUMS").read_text()
    assert all(f"{SHARDS}/{name}" in listed for name in shards)
    assert not (stopped / "model.safetensors").exists()
    verify_checksums(stopped)
    damaged = stopped / SHARDS / "__1_0.distcp"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 1
    damaged.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"__1_0\.distcp differs"):
        verify_checksums(stopped)
    # a sharded checkpoint is resumed sharded, not by one process
    spec, checkpointing = RESUMED
    config = run_config(uninterrupted, spec, checkpointing, "ddp")
    with pytest.raises(ValueError, match=r"train\.parallel 'fsdp' -> 'ddp'"):
        train(config, resume=True)
    with pytest.raises(ValueError, match="sharded checkpoint"):
        load_weights(stopped, AutoModelForCausalLM.from_pretrained(uninterrupted / "model"))


def test_activation_checkpointing_resumes_a_run_without_it(tmp_path):
    # it recomputes the same values, so a resume may switch it on (to fit a longer sequence)
    settings = {"steps": 4, "checkpoint_every": 2}
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny_config(a, train=settings))
    assert train(tiny_config(b, train=settings), stop_after=2) is None
    train(tiny_config(b, train={**settings, "activation_checkpointing": True}), resume=True)
    assert deterministic(loss_lines(b)) == deterministic(loss_lines(a))
    assert max_difference(weights(a / "model"), weights(b / "model")) == 0


def test_parallel_setting_is_checked(tmp_path, monkeypatch):
    expected = r"train\.parallel must be one of \['none', 'ddp', 'fsdp'\]"
    with pytest.raises(ValueError, match=expected):
        build_config(raw_config(tmp_path / "run", train={"parallel": "zero3"}))
    with pytest.raises(ValueError, match=r"train\.activation_checkpointing must be of type"):
        build_config(raw_config(tmp_path / "run", train={"activation_checkpointing": "yes"}))
    # FSDP shards over the processes of a torchrun launch: a plain launch is refused before
    # the run folder is touched
    with pytest.raises(ValueError, match=r"train\.parallel='fsdp'.*torchrun --nproc_per_node=N"):
        train(tiny_config(tmp_path / "fsdp", train={"parallel": "fsdp"}))
    assert not (tmp_path / "fsdp").exists()
    # one process asked for, several launched: they would train apart
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"train\.parallel='none' trains one process.* has 2"):
        train(tiny_config(tmp_path / "none", train={"parallel": "none"}))
    assert not (tmp_path / "none").exists()
