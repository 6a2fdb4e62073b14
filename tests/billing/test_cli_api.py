"""Billing as finance and staff use it: the ``metering`` command (prices, close with its
progress, preview, CSV and JSON exports) and the HTTP API, with bad input answered by one
clear line or a 4xx in the envelope, never a stack trace, and nothing written."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient

from billing import jobs
from metering.api.app import create_app
from metering.core.database import get_engine
from tests import processes
from tests.billing.conftest import END, MONTH, World, october
from tests.conftest import Env
from tests.factories import tenant

METERING = str(processes.BIN / "metering")


def run(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERING, *args], env=env.child_env(), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def fails(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def closed(world: World) -> World:
    october(world)
    world.aggregate()
    return world


def test_prices_are_set_and_shown_and_bad_ones_refused(world: World, env: Env) -> None:
    ok = run(env, "packages", "set-prices", "small", "--currency", "eur", "--base-fee", "19.90",
             "--price", "messages=1000000:0.40:1000", "--price", "data=0:0.25:1000000000",
             "--by", "finance", "--json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {
        "packageId": 1, "package": "small", "currency": "EUR", "baseFee": "19.90",
        "prices": {
            "messages": {"included": 1000000, "unitPrice": "0.4", "unitSize": 1000},
            "data": {"included": 0, "unitPrice": "0.25", "unitSize": 1000000000},
        },
    }  # fmt: skip
    text = run(env, "packages", "set-prices", "small", "--currency", "USD", "--base-fee", "5",
               "--price", "connections=100:0.10", "--by", "finance")  # fmt: skip
    assert text.stdout.splitlines() == [
        "package small: 5.00 USD a month",
        "  connections  100 included, then 0.1 per 1",
    ]
    base = ["packages", "set-prices", "small", "--by", "finance"]
    for args, message in [
        (["--currency", "XXX", "--base-fee", "1"], "unknown currency 'XXX'"),
        (["--currency", "USD", "--base-fee", "1.001"], "more than 2 decimal places"),
        (["--currency", "JPY", "--base-fee", "1.5"], "more than 0 decimal places"),
        (["--currency", "USD", "--base-fee", "-1"], "must be a finite number >= 0"),
        (["--currency", "USD", "--base-fee", "1e400"], "too large"),
        (["--currency", "USD", "--base-fee", "nan"], "must be a finite number"),
        (["--currency", "USD", "--base-fee", "1", "--price", "peers=1:1"], "unknown metric"),
        (["--currency", "USD", "--base-fee", "1", "--price", "messages=1"], "is not METRIC="),
        (["--currency", "USD", "--base-fee", "1", "--price", "messages=1:x"], "decimal number"),
        (["--currency", "USD", "--base-fee", "1", "--price", "data=1:1:0"], "unit size of data"),
        (["--currency", "USD", "--base-fee", "1", "--price", "data=1:1", "--price", "data=2:1"],
         "priced once"),
    ]:  # fmt: skip
        fails(run(env, *base, *args), message)
    fails(run(env, "packages", "set-prices", "nope", "--currency", "USD", "--base-fee", "1",
              "--by", "x"), "package 'nope' does not exist")  # fmt: skip
    shown = json.loads(run(env, "packages", "set-prices", "small", "--currency", "USD",
                           "--base-fee", "5", "--price", "connections=100:0.10", "--by", "f",
                           "--json").stdout)  # fmt: skip
    assert shown["baseFee"] == "5.00"  # the refused ones left the prices as they were


def test_close_shows_progress_then_export_opens_as_a_spreadsheet(closed: World, env: Env) -> None:
    w = closed
    done = run(env, "billing", "close", "--month", MONTH, "--by", "finance")
    assert done.returncode == 0, done.stderr
    assert "==> closing 2026-10" in done.stderr
    # Not a terminal: a line per tenth of the accounts priced, not a bar.
    assert "pricing 2026-10: 2/2 accounts (100%)" in done.stderr
    assert "writing 2 invoices" in done.stderr
    assert done.stdout.strip() == (
        "2026-10 closed: 2 invoice(s), 105.03 USD; 1 account(s) on no package, not billed"
    )
    again = run(env, "billing", "close", "--month", MONTH, "--by", "finance")
    assert "was closed already (nothing changed): 2 invoice(s), 105.03 USD" in again.stdout

    exported = run(env, "billing", "export", "--month", MONTH, "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.startswith("\ufeffinvoice_id,account_id,month,package,currency,metric")
    rows = list(csv.DictReader(io.StringIO(exported.stdout.removeprefix("\ufeff"))))
    assert len(rows) == 10  # one per invoice line: 2 invoices x 5 lines
    a = {r["metric"]: r for r in rows if r["account_id"] == str(w.a)}
    assert {k: a["connections"][k] for k in ("month", "package", "currency", "usage", "included",
            "overage", "unit_price", "amount", "peak_at_utc", "top_app_id")} == {
        "month": "2026-10", "package": "large", "currency": "USD", "usage": "9", "included": "5",
        "overage": "4", "unit_price": "1.5", "amount": "6.00",
        "peak_at_utc": "2026-10-31 23:59:51", "top_app_id": str(w.a1.app_id),
    }  # fmt: skip
    assert (a["base_fee"]["usage"], a["base_fee"]["amount"]) == ("", "49.00")
    assert sum(Decimal(r["amount"]) for r in rows) == Decimal("105.03")

    as_json = json.loads(run(env, "billing", "export", "--month", MONTH, "--format", "json").stdout)
    assert as_json == jobs.invoices(get_engine(), MONTH)
    to_file = env.child_env()
    out = subprocess.run(
        [METERING, "billing", "export", "--month", MONTH, "-o", "/tmp/billing-test.csv"],
        env=to_file, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "2 invoice(s), 10 line(s) written to /tmp/billing-test.csv" in out.stderr
    with open("/tmp/billing-test.csv", encoding="utf-8-sig", newline="") as f:
        assert len(list(csv.reader(f))) == 11

    fails(run(env, "billing", "export", "--month", MONTH, "--format", "xml"), "csv or json")
    fails(run(env, "billing", "export", "--month", "2026-09"), "month 2026-09 is not closed")
    fails(run(env, "billing", "close", "--month", "2026/10"), "is not a month intervalId")
    fails(run(env, "billing", "close", "--month", "2999-01"), "month 2999-01 is not over")


def test_preview_is_a_draft_of_the_month_so_far(closed: World, env: Env) -> None:
    w = closed
    w.until(END + 6)
    w.aggregate()  # November's first seconds: A at 8 connections, 7 messages published
    draft = jobs.preview(get_engine(), w.a, now=datetime(2026, 11, 15, tzinfo=UTC))
    assert (draft["status"], draft["month"], draft["package"], draft["total"]) == (
        "draft", "2026-11", "small", "9.00",
    )  # fmt: skip
    usage = {ln["metric"]: ln["usage"] for ln in draft["lines"][1:]}
    assert usage == {"connections": 8, "channels": 4, "messages": 7, "data": 70}
    assert draft["packageChanges"][0]["to"] == "small"

    # The CLI previews the month we are in (A's package, small, prices no metric: 9.00).
    shown = run(env, "billing", "preview", "--account", str(w.a), "--json")
    assert shown.returncode == 0, shown.stderr
    got = json.loads(shown.stdout)
    assert (got["status"], got["month"], got["total"]) == (
        "draft", datetime.now(UTC).strftime("%Y-%m"), "9.00",
    )  # fmt: skip
    text = run(env, "billing", "preview", "--account", str(w.a))
    assert text.stdout.startswith(f"DRAFT invoice - account {w.a}, ")
    fails(run(env, "billing", "preview", "--account", "999"), "account 999 does not exist")
    fails(run(env, "billing", "preview", "--account", str(w.n.account_id)), "on no package")


@pytest.fixture
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


def test_invoices_over_the_api(closed: World, client: TestClient) -> None:
    w = closed
    jobs.close_month(get_engine(), MONTH, by="test",
                     now=datetime.fromtimestamp(END, UTC) + timedelta(hours=2))  # fmt: skip
    h = {"IM-API-KEY": w.a1.key}  # a key with the billing permission
    listed = client.get("/v1/invoices", params={"month": MONTH}, headers=h)
    assert listed.status_code == 200, listed.text
    invoices = listed.json()["result"]
    totals = [(i["accountId"], i["total"]) for i in invoices]
    assert totals == [(w.a, "56.03"), (w.b.account_id, "49.00")]
    first = client.get("/v1/invoices", params={"month": MONTH, "limit": 1}, headers=h)
    assert first.json()["result"] == invoices[:1]
    rest = client.get("/v1/invoices", params={"month": MONTH, "limit": 1, "after": w.a}, headers=h)
    assert rest.json()["result"] == invoices[1:]
    one = client.get(f"/v1/invoices/{invoices[0]['id']}", headers=h)
    assert one.json()["result"] == invoices[0]
    preview = client.get("/v1/invoices/preview", params={"account": w.a}, headers=h)
    assert preview.status_code == 200, preview.text
    assert preview.json()["result"]["status"] == "draft"

    stats_only = tenant("stats", name="s").key
    for path, params, headers, status, code in [
        ("/v1/invoices", {"month": MONTH}, {}, 401, "INVALID_API_KEY"),
        ("/v1/invoices", {"month": MONTH}, {"IM-API-KEY": stats_only}, 403, "PERMISSION_DENIED"),
        ("/v1/invoices", {"month": "2026-1"}, h, 400, "INVALID_REQUEST"),
        ("/v1/invoices", {"month": "2026-09"}, h, 404, "MONTH_NOT_CLOSED"),
        ("/v1/invoices", {}, h, 400, "INVALID_REQUEST"),
        ("/v1/invoices", {"month": MONTH, "page": "2"}, h, 400, "INVALID_REQUEST"),
        ("/v1/invoices", {"month": MONTH, "limit": "0"}, h, 400, "INVALID_REQUEST"),
        ("/v1/invoices", {"month": MONTH, "limit": "10001"}, h, 400, "INVALID_REQUEST"),
        ("/v1/invoices/999", {}, h, 404, "INVOICE_NOT_FOUND"),
        ("/v1/invoices/99999999999", {}, h, 404, "INVOICE_NOT_FOUND"),
        ("/v1/invoices/x", {}, h, 400, "INVALID_REQUEST"),
        ("/v1/invoices/preview", {"account": "999"}, h, 404, "ACCOUNT_NOT_FOUND"),
        ("/v1/invoices/preview", {"account": str(w.n.account_id)}, h, 400,
         "ACCOUNT_WITHOUT_PACKAGE"),
    ]:  # fmt: skip
        r = client.get(path, params=params, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, r.text)


def test_prices_over_the_api(world: World, client: TestClient) -> None:
    staff = {"IM-API-KEY": tenant("staff", name="ops").key}
    body = {"currency": "GBP", "baseFee": "12.50",
            "prices": {"connections": {"included": 100, "unitPrice": "0.02"}}}  # fmt: skip
    put = client.put("/v1/packages/small/prices", json=body, headers=staff)
    assert put.status_code == 200, put.text
    assert put.json()["result"]["prices"] == {
        "connections": {"included": 100, "unitPrice": "0.02", "unitSize": 1}
    }
    assert (
        client.get("/v1/packages/small/prices", headers=staff).json()["result"]
        == (put.json()["result"])
    )
    for bad, code in [
        ({**body, "baseFee": 12.5}, "INVALID_REQUEST"),  # a JSON number: no floats for money
        ({**body, "currency": "ABC"}, "BAD_CURRENCY"),
        ({**body, "prices": {"peers": {"included": 1, "unitPrice": "1"}}}, "INVALID_REQUEST"),
        ({**body, "prices": {"data": {"included": -1, "unitPrice": "1"}}}, "INVALID_REQUEST"),
        ({**body, "extra": 1}, "INVALID_REQUEST"),
    ]:
        r = client.put("/v1/packages/small/prices", json=bad, headers=staff)
        assert (r.status_code, r.json()["error"]["code"]) == (400, code), r.text
    missing = client.put("/v1/packages/nope/prices", json=body, headers=staff)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "PACKAGE_NOT_FOUND")
    assert client.get("/v1/packages/small/prices", headers=staff).json()["result"]["currency"] == (
        "GBP"
    )
