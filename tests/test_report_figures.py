"""The report's figures (:mod:`gradguard.report.figures`): matplotlib is imported only
when a report is rendered."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_matplotlib() -> None:
    code = ("import sys, gradguard.report, gradguard.cli.report; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
