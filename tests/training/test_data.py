"""What a task config turns into (growmem.training.data): the splits a language-modelling run
trains and evaluates on, and the staged example sets of a curriculum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from growmem.tasks import ByteTokenizer, split_of
from growmem.training.config import LMTask
from growmem.training.data import ExampleSet, StagedExamples, lm_data


def one_file_per_split(folder) -> dict[str, str]:
    """A corpus folder of one text file in each split (by the hashed-path rule): split -> text."""
    folder.mkdir()
    texts = {}
    for i in range(1000):
        split = split_of(f"doc{i}.txt")
        if split not in texts:
            texts[split] = f"the {split} split's text, file {i}. " * 3
            (folder / f"doc{i}.txt").write_text(texts[split])
        if len(texts) == 3:
            return texts
    raise AssertionError("no file name of every split among 1000")


@pytest.mark.parametrize("eval_split", ["val", "test"])
def test_lm_runs_train_on_train_and_evaluate_on_the_eval_split(tmp_path, eval_split):
    texts = one_file_per_split(tmp_path / "corpus")
    task = LMTask(corpus=str(tmp_path / "corpus"), seq_len=8, eval_split=eval_split)
    data = lm_data(task, tmp_path / "run")
    eos = ByteTokenizer.eos_id
    for blocks, split in ((data.train, "train"), (data.lm_eval, eval_split)):
        # the byte stream of the split's one document, then eos
        assert np.asarray(blocks.tokens).tolist() == [*texts[split].encode(), eos]


def test_staged_examples_serve_each_stage_from_its_start():
    first = ExampleSet({"x": torch.arange(6)})
    second = ExampleSet({"x": torch.arange(100, 104)})
    staged = StagedExamples([0, 3], [first, second])
    for step in range(7):
        stage, start = (first, 0) if step < 3 else (second, 3)
        expected = stage.batch_at(step - start, 2, seed=5, rank=1, world_size=2)
        assert torch.equal(
            staged.batch_at(step, 2, seed=5, rank=1, world_size=2)["x"], expected["x"]
        )
    for starts, stages in (
        ([0], [first, second]),
        ([1, 3], [first, second]),
        ([0, 3, 3], [first, second, first]),
        ([0, 2, 1], [first, second, first]),
    ):
        with pytest.raises(ValueError, match="starts: expected"):
            StagedExamples(starts, stages)
