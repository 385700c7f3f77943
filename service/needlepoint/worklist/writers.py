"""The worklist report as a file: HTML (self-contained), CSV or XLSX, chosen by the extension.

* **HTML**: one file with everything inline (styles, the sort/filter/search script, no fonts,
  images or network). Below the table, the full explanation of every decision a row links to,
  rendered by the CDS Hooks explanation page's own renderer
  (:func:`needlepoint.cdshooks.page.render_decision`), so the report explains exactly what the
  page a CDS Hooks card links to explains; rows link to ``#explain-<decisionId>``.
* **CSV**: UTF-8 with a byte-order mark (spreadsheets then read accents right), one header row,
  one referral a row, the same columns as the XLSX.
* **XLSX** (openpyxl): one sheet, bold frozen header, filters on every column, wrapped text,
  the explanation as a hyperlink.

Columns: referral, patient name, patient id, source (file and row), planned date, planned week,
status, what to do, reasons (rule titles and ids), explanation (a link: the HTML report's anchor
when one is written in the same run, else ``LINK_BASE/decisions/<id>`` when a base URL is given),
decision id, as of, error. Cells that a spreadsheet would run as a formula (text starting with
``=``, ``+``, ``-``, ``@``) are written as text.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from needlepoint.cdshooks.page import render_decision
from needlepoint.worklist import html
from needlepoint.worklist.rows import WorklistRow, day_words

FORMATS = (".html", ".csv", ".xlsx")
HEADER = ("Referral", "Patient name", "Patient id", "Source", "Planned date", "Planned week", "Status", "What to do",
          "Reasons (rules)", "Explanation", "Decision id", "As of", "Error")  # fmt: skip
Link = Callable[[WorklistRow], "str | None"]


def values(row: WorklistRow, link: Link) -> list[str]:
    """A row's cells in :data:`HEADER` order."""
    return [row.referral_id, row.patient_name or "", row.patient_id or "", row.source,
            day_words(row.planned_date) if row.planned_date else "", row.planned_week, row.status, row.what_to_do_text,
            row.reasons_text, link(row) or "", row.decision_id or "", row.as_of or "", row.error or ""]  # fmt: skip


def _as_text(cell: str) -> str:
    """Text a spreadsheet must not read as a formula, made inert with a leading apostrophe."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def csv_bytes(rows: Sequence[WorklistRow], link: Link) -> bytes:
    """The CSV report's bytes."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(HEADER)
    for row in rows:
        writer.writerow([_as_text(v) for v in values(row, link)])
    return ("\ufeff" + buffer.getvalue()).encode("utf-8")


def xlsx_bytes(rows: Sequence[WorklistRow], link: Link) -> bytes:
    """The XLSX report's bytes."""
    from openpyxl import Workbook
    from openpyxl.styles import Alignment, Font
    from openpyxl.utils import get_column_letter
    from openpyxl.worksheet.worksheet import Worksheet

    book = Workbook()
    sheet = book.active
    assert isinstance(sheet, Worksheet)  # a new workbook's one sheet is a worksheet
    sheet.title = "Worklist"
    sheet.append(list(HEADER))
    for cell in sheet[1]:
        cell.font = Font(bold=True)
    link_col = HEADER.index("Explanation") + 1
    wrap = Alignment(wrap_text=True, vertical="top")
    for r, row in enumerate(rows, start=2):
        for c, value in enumerate(values(row, link), start=1):
            cell = sheet.cell(row=r, column=c)
            cell.value = value
            cell.data_type = "s"  # never a formula, whatever the text starts with
            cell.alignment = wrap
            if c == link_col and value:
                cell.hyperlink = value
                cell.font = Font(color="0645AD", underline="single")
    widths = (18, 22, 20, 28, 16, 12, 22, 70, 60, 30, 24, 22, 40)
    for i, width in enumerate(widths, start=1):
        sheet.column_dimensions[get_column_letter(i)].width = width
    sheet.freeze_panes = "A2"
    sheet.auto_filter.ref = f"A1:{get_column_letter(len(HEADER))}{max(1, len(rows) + 1)}"
    out = io.BytesIO()
    book.save(out)
    return out.getvalue()


def explanation_section(decision: dict) -> str:
    """One decision's explanation, for the report's body: the CDS Hooks page's body, its headings
    one level down and its rule anchors made unique to this decision."""
    page = render_decision(decision)
    start, end = page.find("<body>"), page.rfind("</body>")
    body = page[start + len("<body>") : end] if start >= 0 and end > start else page
    for level in (3, 2, 1):
        body = body.replace(f"<h{level}>", f"<h{level + 1}>").replace(f"</h{level}>", f"</h{level + 1}>")
    did = decision.get("decisionId", "")
    body = re.sub(r'(id="|href="#)rule-', lambda m: f"{m.group(1)}{html.e(did)}-rule-", body)
    return (f'<section class="explanation" id="explain-{html.e(did)}" aria-label="Explanation of decision {html.e(did)}">'
            f'{body}<p><a href="#top">Back to the worklist</a></p></section>')


def html_report(rows: Sequence[WorklistRow], *, title: str = "Needlepoint worklist", note: str = "") -> str:
    """The self-contained HTML report."""
    explained: dict[str, dict] = {}
    for row in rows:
        if row.decision_id and row.decision_id in row.decisions:
            explained.setdefault(row.decision_id, row.decisions[row.decision_id])
    body = (
        f'<h1 id="top">{html.e(title)}</h1><p>{html.e(html.summary(rows))}{(" " + html.e(note)) if note else ""}</p>'
        "<p><strong>Suggestions with reasons, never orders. The rule set is not clinically validated.</strong></p>"
        + html.legend()
        + html.filters(rows)
        + '<p><button type="button" id="download-visible">Download the rows shown as CSV</button></p>'
        + html.table(rows, lambda i, r: f"#explain-{r.decision_id}" if r.decision_id in explained else None)
        + "<h2>Explanations</h2>"
        + "".join(explanation_section(d) for d in explained.values())
    )
    return html.document(title, body)


def write(rows: Sequence[WorklistRow], path: Path, link: Link, *, note: str = "") -> None:
    """Write the report to ``path`` in the format its extension names (see :data:`FORMATS`)."""
    suffix = path.suffix.lower()
    if suffix == ".html":
        path.write_text(html_report(rows, note=note), encoding="utf-8")
    elif suffix == ".csv":
        path.write_bytes(csv_bytes(rows, link))
    elif suffix == ".xlsx":
        path.write_bytes(xlsx_bytes(rows, link))
    else:
        raise ValueError(f"{path}: the report's extension must be one of {', '.join(FORMATS)}")
