"""Subnormal floats flushed to zero while growmem trains (growmem.utils.denormals)."""

from __future__ import annotations

import pytest
import torch

from growmem.train import train
from growmem.utils.denormals import denormals_flushed, flushed_denormals
from tests.training.common import tiny_config

pytestmark = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="this CPU cannot flush subnormal floats"
)


def subnormal_product() -> float:
    return (torch.tensor([torch.finfo(torch.float32).tiny]) * 0.25).item()


@pytest.mark.parametrize("before", [False, True])
def test_flushes_inside_and_restores_the_mode_found(before):
    torch.set_flush_denormal(before)
    try:
        with flushed_denormals() as supported:
            assert supported and denormals_flushed() and subnormal_product() == 0.0
        assert denormals_flushed() == before
        with pytest.raises(RuntimeError), flushed_denormals():
            raise RuntimeError("a failing block")
        assert denormals_flushed() == before
    finally:
        torch.set_flush_denormal(False)
    assert subnormal_product() > 0.0  # off: the float32 subnormal tiny / 4 survives


def test_training_flushes_and_leaves_the_mode_as_it_was(tmp_path):
    seen = []
    train(
        tiny_config(tmp_path, train={"steps": 2}),
        loggers=[lambda _: seen.append(denormals_flushed())],
    )
    assert seen and all(seen)
    assert not denormals_flushed()
