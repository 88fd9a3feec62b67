"""What every sub-command uses to refuse input (:mod:`gradguard.cli.checks`)."""

from __future__ import annotations

import sys

import pytest

from cli_utils import PIP_BENCH
from gradguard.cli import CLIError, missing_extra, require_extra


def test_require_extra_and_missing_extra(monkeypatch):
    require_extra("math", purpose="x")  # present: nothing happens
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(CLIError, match=r'^the thing needs rich, which is not installed: '
                                       r'pip install "gradguard\[bench\]"$'):
        require_extra("rich", purpose="the thing")
    wrapped = ImportError("the digits tasks need scikit-learn")
    wrapped.__cause__ = ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    assert "needs scikit-learn" in str(missing_extra(wrapped, "the task"))
    other = missing_extra(ImportError("cannot import name 'x'"), "the task")
    assert "cannot import name 'x'" in str(other) and PIP_BENCH in str(other)
