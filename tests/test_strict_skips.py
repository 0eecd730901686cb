"""GROWMEM_STRICT_SKIPS=1 (tests/conftest.py): skipped integration tests and tests skipped for a
missing optional dependency fail; other skips and expected failures stay as they are. Checked
on a small suite of its own, run by pytest in a subprocess with the suite's conftest as plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MISSING = "growmem_no_such_module"

FILES = {
    "pytest.ini": "[pytest]\n",
    # records every report's final outcome, after the strict-skip hooks changed it
    "conftest.py": """
import json

outcomes = {}


def _record(report):
    outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
    if outcome != "passed" or report.when == "call":
        outcomes.setdefault(report.nodeid, [outcome, str(report.longrepr or "")])


def pytest_runtest_logreport(report):
    _record(report)


def pytest_collectreport(report):
    if report.outcome != "passed":
        outcomes.setdefault(report.nodeid, [report.outcome, str(report.longrepr or "")])


def pytest_sessionfinish(session):
    with open("outcomes.json", "w") as f:
        json.dump(outcomes, f)
""",
    "tests/integrations/test_integration.py": """
import pytest


def test_skipped():
    pytest.skip("no server here")


@pytest.mark.xfail(reason="a known bug")
def test_expected_failure():
    assert False


def test_passes():
    pass
""",
    "tests/other/test_module_needs_missing.py": f"""
import pytest

pytest.importorskip("{MISSING}")


def test_never_runs():
    pass
""",
    "tests/other/test_other.py": f"""
import pytest


@pytest.fixture
def needs_missing():
    pytest.importorskip("{MISSING}")


def test_missing_inside_a_test():
    pytest.importorskip("{MISSING}")


def test_missing_in_a_fixture(needs_missing):
    pass


def test_too_old():
    pytest.importorskip("pytest", minversion="999")


def test_plain_skip():
    pytest.skip("not on this platform")


@pytest.mark.skip(reason="marked")
def test_marked_skip():
    pass
""",
}

INTEGRATION = "tests/integrations/test_integration.py"
OTHER = "tests/other/test_other.py"
MODULE = "tests/other/test_module_needs_missing.py"


def run_suite(tmp_path: Path, strict: bool) -> dict[str, list[str]]:
    """Outcome and message of every test of FILES run under ``tests/conftest.py``."""
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "GROWMEM_STRICT_SKIPS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if strict:
        env["GROWMEM_STRICT_SKIPS"] = "1"
    # the collection error of a strict skip at module level must not hide the other tests
    args = ["-p", "tests.conftest", "-p", "no:cacheprovider", "-p", "no:xdist"]
    args += ["--continue-on-collection-errors", "--rootdir", str(tmp_path), str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == (1 if strict else 0), done.stdout + done.stderr
    return json.loads((tmp_path / "outcomes.json").read_text())


def test_strict_skips_fail_integration_and_missing_dependency_skips(tmp_path):
    outcomes = run_suite(tmp_path, strict=True)
    status = {node: outcome for node, (outcome, _) in outcomes.items()}
    assert status == {
        f"{INTEGRATION}::test_skipped": "failed",
        f"{INTEGRATION}::test_expected_failure": "xfailed",
        f"{INTEGRATION}::test_passes": "passed",
        MODULE: "failed",  # a collection error
        f"{OTHER}::test_missing_inside_a_test": "failed",
        f"{OTHER}::test_missing_in_a_fixture": "failed",
        f"{OTHER}::test_too_old": "failed",
        f"{OTHER}::test_plain_skip": "skipped",
        f"{OTHER}::test_marked_skip": "skipped",
    }
    integration = outcomes[f"{INTEGRATION}::test_skipped"][1]
    assert "was skipped (Skipped: no server here), but GROWMEM_STRICT_SKIPS=1" in integration
    assert "because it is an integration test" in integration
    module = outcomes[MODULE][1]
    assert f"could not import '{MISSING}'" in module
    assert "because an optional dependency is missing" in module


def test_without_strict_skips_a_skip_is_a_skip(tmp_path):
    outcomes = run_suite(tmp_path, strict=False)
    status = {node: outcome for node, (outcome, _) in outcomes.items()}
    assert status == {
        f"{INTEGRATION}::test_skipped": "skipped",
        f"{INTEGRATION}::test_expected_failure": "xfailed",
        f"{INTEGRATION}::test_passes": "passed",
        MODULE: "skipped",
        f"{OTHER}::test_missing_inside_a_test": "skipped",
        f"{OTHER}::test_missing_in_a_fixture": "skipped",
        f"{OTHER}::test_too_old": "skipped",
        f"{OTHER}::test_plain_skip": "skipped",
        f"{OTHER}::test_marked_skip": "skipped",
    }
