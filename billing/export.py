"""Invoices for finance: CSV (one row per invoice line) and JSON.

The CSV opens in a spreadsheet as is: a header row, UTF-8 with a byte-order mark (so that
Excel reads it as UTF-8), amounts and prices as plain decimals with a point, times as
``YYYY-MM-DD HH:MM:SS`` in UTC (a format spreadsheets recognise), empty cells for what does not
apply. Text that a spreadsheet would take for a formula (``=``, ``+``, ``-``, ``@`` first) is
prefixed with an apostrophe.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

CSV_COLUMNS = (
    "invoice_id", "account_id", "month", "package", "currency", "metric", "usage", "included",
    "overage", "unit_size", "unit_price", "amount", "peak_at_utc", "peak_resolution",
    "top_app_id", "top_app_peak",
)  # fmt: skip
FORMATS = ("csv", "json")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in {"=", "+", "-", "@"}:
        return "'" + value
    return value


def _when(iso: str | None) -> str:
    return "" if iso is None else iso.replace("T", " ").removesuffix("Z")


def to_csv(invoices: Sequence[dict[str, Any]]) -> str:
    out = io.StringIO()
    out.write("\ufeff")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for inv in invoices:
        for line in inv["lines"]:
            row = (
                inv["id"], inv["accountId"], inv["month"], inv["package"], inv["currency"],
                line["metric"], line["usage"], line["included"], line["overage"],
                line["unitSize"], line["unitPrice"], line["amount"],
                _when(line.get("peakAt")), line.get("peakResolution"), line.get("topAppId"),
                line.get("topAppPeak"),
            )  # fmt: skip
            writer.writerow([_cell(v) for v in row])
    return out.getvalue()


def to_json(invoices: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(invoices), indent=1)
