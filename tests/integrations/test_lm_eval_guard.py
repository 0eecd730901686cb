"""The lm-eval adapter's import guard; runs whether or not lm-eval is installed."""

import importlib
import sys

import pytest

MODULE = "growmem.integrations.lm_eval"


def test_import_without_lm_eval_raises_with_install_hint(monkeypatch):
    # None in sys.modules makes every import of lm_eval (and of its submodules) fail
    for name in [n for n in sys.modules if n == "lm_eval" or n.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    with pytest.raises(ImportError, match=r"pip install 'growmem\[lm-eval\]'"):
        importlib.import_module(MODULE)
    assert MODULE not in sys.modules
