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


def test_write_json_records_provenance_and_leaves_no_temporary(tmp_path):
    import json

    path = provenance.write_json(tmp_path / "sub" / "result.json", {"accuracy": 0.5})
    record = json.loads(path.read_text())
    assert record["accuracy"] == 0.5
    assert record["provenance"] == provenance.provenance()
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_benchmark_json_records_machine_and_provenance(tmp_path, monkeypatch):
    import json

    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    record = json.loads(common.write_json("bench", {"rows": [1]}).read_text())
    assert record["rows"] == [1]
    assert record["machine"]["threads"] >= 1
    assert record["provenance"]["versions"]["torch"] is not None


def test_versions_are_plain_strings_for_yaml():
    """torch.__version__ is a str subclass that yaml.safe_dump cannot represent."""
    import torch  # noqa: F401  (imported: its own __version__ is used)
    import yaml

    versions = provenance.package_versions()
    assert all(v is None or type(v) is str for v in versions.values())
    assert yaml.safe_load(yaml.safe_dump(versions)) == versions
