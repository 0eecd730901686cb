"""Where a run computes: device settings resolved and checked, and the GPU's random state kept in
checkpoints (checked without a GPU by standing in for torch.cuda)."""

from __future__ import annotations

import pytest
import torch

from growmem.models import GrowMemConfig, GrowMemForCausalLM
from growmem.training.checkpoint import load_trainer_state, save_checkpoint
from growmem.training.device import resolve_device, restore_rng_states, rng_states

from .common import TINY_MODEL, tiny_config


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_is_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu", world_size=4) == torch.device("cpu")


def test_auto_and_cuda_take_this_processes_gpu(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize(
    "name, world_size, message",
    [
        ("cuda:1", 2, "names one GPU for all 2 processes"),
        ("cuda:2", 1, "this machine has 2 GPU"),
        ("tpu", 1, "must be 'auto', 'cpu', 'cuda'"),
        ("cuda:x", 1, "must be 'auto', 'cpu', 'cuda'"),
        ("", 1, "must be 'auto'"),
    ],
)
def test_bad_device_names_the_setting(two_gpus, name, world_size, message):
    with pytest.raises(ValueError, match="--device") as info:
        resolve_device(name, "--device", world_size=world_size)
    assert message in str(info.value)


def test_cuda_without_a_gpu_is_refused(no_gpu, tmp_path):
    with pytest.raises(ValueError, match=r"train\.device='cuda': CUDA is not available"):
        resolve_device("cuda")
    from growmem.train import train

    with pytest.raises(ValueError, match="CUDA is not available"):
        train(tiny_config(tmp_path / "run", train={"device": "cuda"}))
    assert not (tmp_path / "run").exists()


def test_a_device_torch_cannot_use_here_is_refused():
    # a real torch device type that this build has no backend for
    with pytest.raises(ValueError, match="'xpu' is not usable here"):
        resolve_device("xpu")


def test_checkpoints_keep_and_restore_the_gpu_random_state(tmp_path, monkeypatch):
    """On a GPU, rng_states takes the GPU generator's state too; a checkpoint carries it and
    restore_rng_states puts it back on the GPU (here torch.cuda is a stand-in)."""
    gpu_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu_state + device.index)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device))
    )
    gpu = torch.device("cuda", 1)
    states = rng_states(gpu)
    assert torch.equal(states["cuda_rng"], gpu_state + 1)
    assert torch.equal(states["torch_rng"], torch.get_rng_state())
    assert "cuda_rng" not in rng_states(torch.device("cpu"))

    model = GrowMemForCausalLM(GrowMemConfig(vocab_size=32, **TINY_MODEL))
    config = tiny_config(tmp_path / "run").to_dict()
    folder = save_checkpoint(tmp_path / "run", 3, model, config, states)
    loaded = load_trainer_state(folder)
    torch.manual_seed(123)  # move the CPU generator away from the saved state
    restore_rng_states(loaded, gpu)
    assert torch.equal(torch.get_rng_state(), states["torch_rng"])
    assert len(restored) == 1 and restored[0][1] == gpu
    assert torch.equal(restored[0][0], gpu_state + 1)
    # a run resumed on the CPU has no GPU generator to restore
    restore_rng_states(loaded, torch.device("cpu"))
    assert len(restored) == 1
