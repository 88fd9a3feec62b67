"""``gradguard demo`` end to end on a short run, and the CLI dispatcher."""

from __future__ import annotations

import html.parser

import pytest

from gradguard.cli import main


class _Text(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_demo_prints_the_table_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["demo", "--steps", "12", "--seeds", "1", "--workers", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for label in ("no protection", "torch clip_grad_norm_(1.0)", 'Guard(clip="auto")',
                  "probe at initialisation", "report:"):
        assert label in printed
    rows = [line for line in printed.splitlines()
            if line.startswith(("no prot", "torch", "gradguard Guard"))]
    assert len(rows) == 3 and all("/1" in r for r in rows)
    assert out.exists() and out.with_suffix(".jsonl").exists()
    parser = _Text()
    parser.feed(out.read_text())
    page = " ".join(parser.text)
    assert "gradguard demo" in page and "probe at initialisation" in page


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit, match="steps"):
        main(["demo", "--steps", "0"])


def test_cli_help_and_unknown_command(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nonsense"])
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0


def test_demo_rejects_an_unknown_task():
    with pytest.raises(SystemExit, match="--task"):
        main(["demo", "--task", "nope", "--seeds", "1", "--workers", "1", "--steps", "2"])
