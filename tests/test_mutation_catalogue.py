"""The planted-bug catalogue (tools/mutation) still matches the code: every mutant's original
snippet occurs exactly once in its file, so that a refactor cannot silently turn a mutant into
a no-op (or make it mutate another line)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tools.mutation.mutants import AREAS, MUTANTS, Mutant
from tools.mutation.run import apply, catalogue_problems, select

# the user-facing modules the catalogue covers (the ops have their own mutation audit)
USER_FACING = ("growmem/models/", "growmem/layers/", "growmem/train.py", "growmem/training/",
               "growmem/evaluate.py", "growmem/generate.py", "growmem/tasks/",
               "growmem/integrations/")  # fmt: skip


def test_every_original_occurs_exactly_once_and_the_mutants_parse():
    assert catalogue_problems() == []


def test_the_catalogue_covers_every_area_and_only_user_facing_code():
    per_area = Counter(m.area for m in MUTANTS if m.equivalent is None)
    assert {a: per_area[a] for a in AREAS} == {a: max(per_area[a], 6) for a in AREAS}
    assert sum(per_area.values()) >= 45
    assert [m.id for m in MUTANTS if not m.file.startswith(USER_FACING)] == []


def test_problems_are_named(tmp_path):
    (tmp_path / "m.py").write_text("x = 1\nx = 1\ny = 2\n")
    (tmp_path / "tests").mkdir()
    mutants = [
        Mutant("tasks/twice", "tasks", "m.py", "x = 1", "x = 2", "twice", ("tests",)),
        Mutant("tasks/gone", "tasks", "m.py", "z = 3", "z = 4", "missing", ("tests",)),
        Mutant("tasks/broken", "tasks", "m.py", "y = 2", "y = (", "no parse", ("tests",)),
        Mutant("tasks/no-tests", "tasks", "m.py", "y = 2", "y = 3", "paths", ("nowhere",)),
        Mutant("nope/x", "nope", "m.py", "y = 2", "y = 3", "area", ("tests",)),
    ]
    problems = "\n".join(catalogue_problems(Path(tmp_path), mutants))
    assert "tasks/twice: original occurs 2 times" in problems
    assert "tasks/gone: original occurs 0 times" in problems
    assert "tasks/broken: the mutated m.py does not parse" in problems
    assert "tasks/no-tests: test path nowhere does not exist" in problems
    assert "nope/x: area 'nope'" in problems
    with pytest.raises(ValueError, match="exactly once"):
        apply("x = 1\nx = 1\n", mutants[0])
    assert apply("y = 2\n", mutants[3]) == "y = 3\n"


def test_select_by_id_glob_or_area():
    assert [m.area for m in select(["integrations"])] == ["integrations"] * sum(
        m.area == "integrations" for m in MUTANTS
    )
    first = MUTANTS[0].id
    assert [m.id for m in select([first])] == [first]
    assert {m.area for m in select(["layers/*"])} == {"layers"}
    with pytest.raises(SystemExit, match="no mutant matches"):
        select(["no-such-mutant"])
