"""Suite-wide settings: one intra-op thread per worker (the suite runs under pytest-xdist -n 2),
and strict skips: with the environment variable GROWMEM_STRICT_SKIPS=1 (as CI sets it) a
skipped integration test, or a test skipped because an optional dependency is missing
(``pytest.importorskip``), is a failure, so that a feature users rely on is never left
untested without anyone noticing."""

from __future__ import annotations

import os
import re

import pytest
import torch

torch.set_num_threads(1)

STRICT_SKIPS = "GROWMEM_STRICT_SKIPS"
# Folders (relative to the rootdir) none of whose tests may be skipped under strict skips.
STRICT_FOLDERS = ("tests/integrations",)
# The reasons pytest.importorskip gives: a module that does not import, or one too old.
_IMPORTORSKIP_REASON = re.compile(
    r"(Skipped: )?(could not import '|module '[^']*' has __version__ )"
)


def strict_skip_failure(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    """Why the skipped ``report`` must fail under strict skips, or None (not skipped, not
    strict, an expected failure, or a skip that hides nothing users rely on)."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    if os.environ.get(STRICT_SKIPS) != "1":
        return None
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    node = report.nodeid.replace("\\", "/")
    if _IMPORTORSKIP_REASON.match(reason):
        what = "an optional dependency is missing"
    elif any(node == f or node.startswith(f"{f}/") for f in STRICT_FOLDERS):
        what = "it is an integration test"
    else:
        return None
    return (
        f"{node} was skipped ({reason}), but {STRICT_SKIPS}=1 makes that a failure because "
        f"{what}: install what the tests need (make test installs the dev and lm-eval extras) "
        f"or unset {STRICT_SKIPS}"
    )


def _fail_strict_skip(report) -> None:
    message = strict_skip_failure(report)
    if message is not None:
        report.outcome = "failed"
        report.longrepr = message


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test (setup, call or teardown) skipped under strict skips fails."""
    outcome = yield
    _fail_strict_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module skipped at import (``importorskip`` at module level) under strict skips is a
    collection error."""
    outcome = yield
    _fail_strict_skip(outcome.get_result())


@pytest.fixture
def device() -> torch.device:
    """The device the device-aware tests run on: CUDA when one is present, else the CPU (CI)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
