"""HTML building blocks of the reports: escaping, number formatting, tables, the page.

Everything here is plain string building with :func:`html.escape` applied to every piece
of text that comes from outside gradguard's own code (layer names, event messages, the
policy's ``repr``, titles, task and method names). The page carries a
``Content-Security-Policy`` that forbids scripts and every network fetch, so even a
string that slipped through could neither run nor load anything.
"""

from __future__ import annotations

import html as _html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "CSP",
    "NA",
    "as_float",
    "esc",
    "fmt_count",
    "fmt_num",
    "fmt_pct",
    "page",
    "table",
]

#: Shown for a missing or NaN value (an en dash).
NA = "\u2013"

#: No scripts, no fonts, no fetches: images only from ``data:`` URIs, styles inline.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

# C0/C1 control characters other than tab; shown as escapes so they can neither hide
# text nor break a line of a table cell.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _show_control(m: re.Match[str]) -> str:
    c = m.group(0)
    return {"\n": "\\n", "\r": "\\r"}.get(c, f"\\x{ord(c):02x}")


def esc(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute (quotes included).

    Control characters (newlines included) are shown as ``\\n``, ``\\x00`` ... so that a
    name is always one visible line.
    """
    return _html.escape(_CONTROL.sub(_show_control, str(value)), quote=True)


def as_float(x: Any) -> float:
    """A float from a log or results value: None, text and bad values become NaN."""
    if isinstance(x, (bool, int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)  # "NaN", "Infinity" from an undecoded log
        except ValueError:
            return math.nan
    return math.nan


def fmt_num(x: Any, digits: int = 3) -> str:
    """A number in ``digits`` significant digits; ``–`` for ``None``/NaN, ``∞`` for inf."""
    if x is None or isinstance(x, bool):
        return NA if x is None else str(x)
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return NA
    if math.isinf(v):
        return "∞" if v > 0 else "\u2212∞"
    if v != 0 and (abs(v) >= 10 ** max(digits, 4) or abs(v) < 1e-3):
        return f"{v:.{max(digits - 1, 0)}e}"
    return f"{v:.{digits}g}"


def fmt_count(x: Any) -> str:
    """An integer count with thousands separators (``–`` when unknown)."""
    try:
        return f"{int(x):,}"
    except (TypeError, ValueError, OverflowError):
        return NA


def fmt_pct(x: Any, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage (``–`` when unknown)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return NA
    if not math.isfinite(v):
        return NA
    return f"{100 * v:.{digits}f}%"


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    cls: str = "",
    row_classes: Sequence[str] | None = None,
    numeric: Sequence[int] = (),
    col_classes: dict[int, str] | None = None,
) -> str:
    """An HTML table. **Cells are HTML already** (escape text with :func:`esc` first);
    header labels are escaped here.

    Args:
        header: column labels (plain text).
        rows: rows of HTML cell contents.
        cls: CSS class of the table.
        row_classes: one CSS class per row (or empty strings).
        numeric: indices of right-aligned numeric columns.
        col_classes: extra CSS classes of the cells of some columns, by index.
    """
    num = set(numeric)
    extra = dict(col_classes or {})

    def cell_cls(i: int) -> str:
        names = (["num"] if i in num else []) + ([extra[i]] if i in extra else [])
        return f' class="{esc(" ".join(names))}"' if names else ""

    out = [f'<table class="{esc(cls)}"><thead><tr>']
    for i, h in enumerate(header):
        out.append(f"<th{cell_cls(i)}>{esc(h)}</th>")
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        rc = row_classes[k] if row_classes is not None and k < len(row_classes) else ""
        out.append(f'<tr class="{esc(rc)}">' if rc else "<tr>")
        for i, cell in enumerate(row):
            out.append(f"<td{cell_cls(i)}>{cell}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


_STYLE = """
:root {
  --fg: #1d2330; --muted: #5b6474; --line: #dde1e8; --bg: #f6f7f9; --card: #ffffff;
  --accent: #2f5d9e; --error: #c62828; --warning: #b26a00; --info: #1f6fb2; --ok: #2e7d32;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 28px 40px; }
header.top { background: #1f2a3c; color: #fff; }
header.top .inner { max-width: 1240px; margin: 0 auto; padding: 18px 28px 16px; }
header.top h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; overflow-wrap: anywhere; }
header.top .sub { color: #c4cddb; font-size: 13px; overflow-wrap: anywhere; }
header.top .sub code { background: #2d3b52; color: #e8edf5; }
h2 { font-size: 18px; margin: 30px 0 8px; padding-bottom: 4px;
  border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.note, .caption { color: var(--muted); font-size: 12.5px; margin: 4px 0 10px; }
code { font: 12.5px/1.3 "DejaVu Sans Mono", Menlo, Consolas, monospace; background: #eef1f5;
  padding: 0 3px; border-radius: 3px; overflow-wrap: anywhere; }
.diagnosis { background: #fff8e1; border: 1px solid #f0c36d; border-left: 6px solid #e0a100;
  border-radius: 6px; padding: 10px 16px; margin: 18px 0 6px; }
.diagnosis h2 { border: 0; margin: 0 0 4px; padding: 0; font-size: 16px; }
.diagnosis ul { margin: 0; padding-left: 20px; }
.diagnosis li { margin: 2px 0; font-size: 14.5px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
  grid-auto-flow: row dense; gap: 10px; margin: 16px 0 4px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 12px; min-width: 0; }
.card .k { color: var(--muted); font-size: 11.5px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; overflow-wrap: anywhere; }
.card .d { color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.card.bad { border-left: 5px solid var(--error); }
.card.warn { border-left: 5px solid var(--warning); }
.card.good { border-left: 5px solid var(--ok); }
.card.wide { grid-column: span 2; }
figure { margin: 8px 0 4px; background: var(--card); border: 1px solid var(--line);
  border-radius: 6px; padding: 6px; }
figure svg { display: block; width: 100%; height: auto; }
figure svg image { image-rendering: pixelated; }
figcaption { color: var(--muted); font-size: 12.5px; padding: 2px 6px 2px; }
.empty { background: var(--card); border: 1px dashed #c3c9d3; border-radius: 6px;
  padding: 14px 16px; color: var(--muted); }
table { border-collapse: collapse; width: 100%; background: var(--card); font-size: 13px;
  border: 1px solid var(--line); }
th, td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { background: #eef1f5; font-weight: 600; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.best { background: #e3f2e5; font-weight: 600; }
.sev { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 11.5px;
  font-weight: 600; color: #fff; }
.sev.error { background: var(--error); } .sev.warning { background: var(--warning); }
.sev.info { background: var(--info); }
tr.error td:first-child { box-shadow: inset 4px 0 0 var(--error); }
tr.warning td:first-child { box-shadow: inset 4px 0 0 var(--warning); }
tr.info td:first-child { box-shadow: inset 4px 0 0 var(--info); }
td.msg { overflow-wrap: anywhere; min-width: 320px; }
td.layers code { display: inline-block; margin: 1px 0; }
.chips { margin: 6px 0 10px; }
.chip { display: inline-block; border: 1px solid var(--line); background: var(--card);
  border-radius: 12px; padding: 1px 10px; margin: 2px 4px 2px 0; font-size: 12.5px; }
.chip.error { border-color: var(--error); } .chip.warning { border-color: var(--warning); }
.chip.info { border-color: var(--info); }
details { margin: 10px 0; } summary { cursor: pointer; color: var(--accent); }
.tablewrap { max-height: 640px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.tablewrap table { border: 0; }
.taskdesc { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 14px; margin: 6px 0 10px; }
.taskdesc p { margin: 4px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; border-top: 1px solid var(--line);
  padding-top: 8px; }
"""


def page(title: str, subtitle_html: str, body_html: str, footer_html: str = "") -> str:
    """The whole document: ``title`` is plain text (escaped here); the rest is HTML."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="generator" content="gradguard.report">\n'
        f"<title>{esc(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<header class="top"><div class="inner"><h1>{esc(title)}</h1>'
        f'<div class="sub">{subtitle_html}</div></div></header>\n'
        f"<main>\n{body_html}\n<footer>{footer_html}</footer>\n</main>\n</body>\n</html>\n"
    )
