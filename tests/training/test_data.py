"""What a task config turns into (growmem.training.data): the splits a language-modelling run
trains and evaluates on."""

from __future__ import annotations

import numpy as np
import pytest

from growmem.tasks import ByteTokenizer, split_of
from growmem.training.config import LMTask
from growmem.training.data import lm_data


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
