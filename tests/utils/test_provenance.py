import re

from growmem.utils import provenance


def test_provenance_names_versions_and_commit():
    record = provenance.provenance()
    versions = record["versions"]
    assert set(versions) == set(provenance.PACKAGES)
    import torch
    import transformers

    assert versions["torch"] == torch.__version__
    assert versions["transformers"] == transformers.__version__
    git = record["git"]
    assert set(git) == {"commit", "dirty"}
    if git["commit"] is not None:  # a checkout (always, when the suite runs from one)
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"])
        assert isinstance(git["dirty"], bool)


def test_outside_a_checkout_the_commit_is_none(tmp_path, monkeypatch):
    provenance.git_commit.cache_clear()
    monkeypatch.setattr(provenance, "REPOSITORY", tmp_path)
    try:
        assert provenance.git_commit() == {"commit": None, "dirty": None}
    finally:
        provenance.git_commit.cache_clear()
