"""Closing a month: exact invoices from the rollups, final once made, one set however many
closers, and nothing at all when one account cannot be billed."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text

from billing import jobs, money, pricing, service
from billing.models import BillingMonth, Invoice, InvoiceLine
from metering.core.database import get_engine, unit_of_work
from metering.core.errors import MeteringError
from metering.limits import staff
from metering.rollups import query
from metering.rollups.fold import ACCOUNT
from metering.rollups.periods import Unit
from tests import processes
from tests.billing.conftest import END, MONTH, World, at, october
from tests.conftest import Env

AFTER = datetime.fromtimestamp(END, UTC) + timedelta(hours=2)
METERING = str(processes.BIN / "metering")


def close(month: str = MONTH, now: datetime = AFTER) -> service.CloseResult:
    return jobs.close_month(get_engine(), month, by="test", now=now)


def stored(month: str = MONTH) -> dict[int, dict]:  # type: ignore[type-arg]
    return {i["accountId"]: i for i in jobs.invoices(get_engine(), month)}


def counts() -> tuple[int, int, int]:
    with get_engine().connect() as conn:
        return tuple(  # type: ignore[return-value]
            int(conn.scalar(select(func.count()).select_from(t)) or 0)
            for t in (BillingMonth, Invoice, InvoiceLine)
        )


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
def test_invoices_are_exact_for_hand_computed_usage(world: World) -> None:
    w = world
    october(w)
    w.aggregate()

    result = close()
    assert (result.closed_now, result.invoices, result.unbilled) == (True, 2, 1)
    assert result.totals == {"USD": "105.03"}  # 56.03 + 49.00
    invoices = stored()
    assert set(invoices) == {w.a, w.b.account_id}  # N is on no package: not billed

    a = invoices[w.a]
    assert (a["package"], a["currency"], a["status"], a["total"]) == ("large", "USD", "final",
                                                                      "56.03")  # fmt: skip
    lines = {ln["metric"]: ln for ln in a["lines"]}
    assert [ln["metric"] for ln in a["lines"]] == ["base_fee", "connections", "channels",
                                                   "messages", "data"]  # fmt: skip
    assert lines["base_fee"]["amount"] == "49.00"
    # The account's peak, 9, not the sum of its apps' peaks (6 + 6): 4 over 5, at 1.50.
    conns = lines["connections"]
    assert (conns["usage"], conns["included"], conns["overage"], conns["unitPrice"],
            conns["amount"]) == (9, 5, 4, "1.5", "6.00")  # fmt: skip
    assert (conns["peakAt"], conns["peakResolution"]) == ("2026-10-31T23:59:51Z", "second")
    assert (conns["topAppId"], conns["topAppPeak"]) == (w.a1.app_id, 6)  # a tie: the lower id
    ch = lines["channels"]
    assert (ch["usage"], ch["overage"], ch["amount"]) == (4, 2, "0.50")
    assert (ch["peakAt"], ch["peakResolution"]) == ("2026-10-31T23:00:00Z", "hour")
    assert (ch["topAppId"], ch["topAppPeak"]) == (w.a1.app_id, 2)
    # 101 over at 0.005: 0.505, rounded once for the line, half-up: 0.51 (per message it
    # would be 1.01; half-even would give 0.50).
    msg = lines["messages"]
    assert (msg["usage"], msg["overage"], msg["amount"]) == (200, 101, "0.51")
    data = lines["data"]
    assert (data["usage"], data["unitSize"], data["unitPrice"], data["amount"]) == (
        2000, 1000, "0.01", "0.02",
    )  # fmt: skip
    assert a["packageChanges"] == [
        {"at": "2026-10-01T00:00:00Z", "from": None, "to": "small", "by": "ops"},
        {"at": "2026-10-20T12:00:00Z", "from": "small", "to": "large", "by": "sales"},
    ]
    # What it was computed from: the account's month rollup and the next row (November's).
    assert a["source"]["rollups"][0] == f"2:{w.a}:4:{END - 31 * 86400}"
    assert a["source"]["watermark"] >= END - 1

    # Zero usage: the base fee, and every metric at zero.
    b = invoices[w.b.account_id]
    assert b["total"] == "49.00"
    assert [(ln["metric"], ln["usage"], ln["amount"]) for ln in b["lines"][1:]] == [
        ("connections", 0, "0.00"), ("channels", 0, "0.00"), ("messages", 0, "0.00"),
        ("data", 0, "0.00"),
    ]  # fmt: skip

    # The figures the stats API gives the customer for the month.
    with get_engine().connect() as conn:
        month = query.Query(ACCOUNT, w.a, Unit.MONTH, start=END - 31 * 86400, end=END)
        [stats] = query.periods(conn, month)
    assert (stats["connections.all.peak"], stats["connections.all.peakAt"], stats["channels.peak"],
            stats["messages.all.count"], stats["messages.all.data"]) == (
        conns["usage"], (END - 9) * 1000, ch["usage"],
        msg["usage"], data["usage"],
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
def test_closing_twice_changes_nothing(world: World) -> None:
    october(world)
    world.aggregate()
    first = close()
    before = stored()
    with get_engine().begin() as conn:  # a late correction of October's rollups
        conn.execute(text("UPDATE usage_rollups SET peak = 500 WHERE unit = 4"))
    again = close(now=AFTER + timedelta(days=3))
    assert (again.closed_now, again.invoices, again.totals) == (False, 2, first.totals)
    assert again.closed_at == first.closed_at
    assert stored() == before  # a finalized invoice never changes
    assert counts() == (1, 2, 10)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
def test_two_processes_closing_at_once_make_one_set(world: World, env: Env) -> None:
    october(world)
    world.aggregate()
    child = env.child_env()
    procs = [
        subprocess.Popen(
            [METERING, "billing", "close", "--month", MONTH, "--by", f"p{i}", "--json"],
            env=child,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [json.loads(o[0]) for o in outs]
    assert sorted(r["closedNow"] for r in results) == [False, True]
    assert {r["invoices"] for r in results} == {2}
    assert {r["totals"]["USD"] for r in results} == {"105.03"}
    assert counts() == (1, 2, 10)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"], indirect=True)
def test_nothing_is_written_when_one_account_cannot_be_billed(world: World) -> None:
    w = world
    october(w)
    w.aggregate()
    with unit_of_work() as session:
        staff.create_package(session, "unpriced", {"connections": (10, 20)})
        staff.set_package(session, w.b.account_id, "unpriced", by="ops", now=at("2026-10-30 00:00"))
    with pytest.raises(MeteringError, match="'unpriced' has no prices") as err:
        close()
    assert err.value.code == "PACKAGE_NOT_PRICED"
    assert counts() == (0, 0, 0)

    # Priced in another currency than the account was billed in before: B was on large
    # (USD) in September; in October its package is priced in EUR.
    with get_engine().begin() as conn:
        conn.execute(text("UPDATE accounts SET created_at = '2026-09-01T00:00:00Z'"))
        # The engine counted since September (nothing happened before October's end).
        conn.execute(text(f"UPDATE usage_cursor SET first_second = {END - 61 * 86400}"))
        service.set_prices(conn, "unpriced", currency="EUR", base_fee="10.00", prices={},
                           by="finance")  # fmt: skip
    with unit_of_work() as session:
        staff.set_package(session, w.b.account_id, "large", by="ops", now=at("2026-09-01 00:00"))
        staff.set_package(session, w.b.account_id, "unpriced", by="ops", now=at("2026-10-30 00:02"))
    september = close("2026-09")
    assert (september.invoices, september.unbilled, september.totals) == (1, 2, {"USD": "49.00"})
    mismatch = r"currency mismatch: account \d+ was billed in USD"
    with pytest.raises(MeteringError, match=mismatch) as err:
        close()
    assert err.value.code == "CURRENCY_MISMATCH"
    assert counts() == (1, 1, 5)  # September's only


@pytest.mark.parametrize(
    ("month", "now", "code"),
    [
        ("2026-13", AFTER, "INVALID_REQUEST"),
        ("26-10", AFTER, "INVALID_REQUEST"),
        ("2026-10", datetime.fromtimestamp(END - 1, UTC), "MONTH_NOT_OVER"),
        ("2027-01", AFTER, "MONTH_NOT_OVER"),
        ("2026-09", AFTER, "MONTH_NOT_COUNTED"),  # counting began on October 31st
    ],
)
def test_a_month_that_is_not_a_past_month_is_refused(
    world: World, month: str, now: datetime, code: str
) -> None:
    october(world)
    world.aggregate()
    with pytest.raises(MeteringError) as err:
        close(month, now)
    assert err.value.code == code
    assert counts() == (0, 0, 0)


def test_a_month_whose_rollups_do_not_reach_its_end_waits(world: World) -> None:
    world.until(END - 5)
    world.aggregate()  # the rollups end at 23:59:55
    with pytest.raises(MeteringError, match="do not reach the end of 2026-10") as err:
        close()
    assert err.value.code == "MONTH_NOT_AGGREGATED"
    assert counts() == (0, 0, 0)


def test_late_aggregates_land_before_the_periodic_close(world: World) -> None:
    """The periodic close waits for the grace window, then for the rollups to pass the month's
    end: a cycle that folds October's last seconds late, inside the window or after it, is on
    the invoice; once closed, nothing changes it."""
    w = world
    grace = timedelta(hours=1)
    month_end = datetime.fromtimestamp(END, UTC)
    w.connect(w.a1, 2)
    for _ in range(30):
        w.meter.message_published(str(w.a1.app_id), "x", 10)
    w.until(END - 5)
    w.aggregate()  # on time: up to 23:59:55, with the 30 messages
    w.until(END - 3)
    w.connect(w.a1, 10)  # 12 at 23:59:58: October's peak, folded only after the month ended
    w.until(END - 1)
    w.connect(w.a1, -10)
    w.until(END + 3)

    inside = jobs.close_due(get_engine(), grace=grace, now=month_end + timedelta(minutes=30))
    assert inside == {"month": None, "status": "in grace window"}
    after = jobs.close_due(get_engine(), grace=grace, now=month_end + timedelta(minutes=61))
    assert after == {"month": MONTH, "status": "waiting for the rollups"}
    assert counts() == (0, 0, 0)

    w.aggregate()  # the late cycle lands
    done = jobs.close_due(get_engine(), grace=grace, now=month_end + timedelta(minutes=66))
    assert done == {"month": MONTH, "status": "closed", "invoices": 2}
    lines = {ln["metric"]: ln for ln in stored()[w.a]["lines"]}
    assert (lines["connections"]["usage"], lines["connections"]["peakAt"]) == (
        12, "2026-10-31T23:59:58Z",
    )  # fmt: skip
    assert lines["messages"]["usage"] == 30

    w.connect(w.a1, 20)  # November's: on no October invoice
    w.until(END + 6)
    w.aggregate()
    again = jobs.close_due(get_engine(), grace=grace, now=month_end + timedelta(minutes=71))
    assert again == {"month": MONTH, "status": "closed already"}
    assert {ln["metric"]: ln["usage"] for ln in stored()[w.a]["lines"]}["connections"] == 12


def test_the_periodic_close_leaves_a_month_the_engine_never_counted(world: World) -> None:
    # A fresh install: accounts (created before) but nothing counted yet; then counting begins
    # in November. October is never billed base fees for usage the engine never saw.
    now = datetime.fromtimestamp(END, UTC) + timedelta(hours=2)
    world.t = END + 60
    for _ in range(2):
        got = jobs.close_due(get_engine(), grace=timedelta(hours=1), now=now)
        assert got == {"month": MONTH, "status": "nothing counted in it"}
        world.until(world.t + 5)
        world.aggregate()
    assert counts() == (0, 0, 0)


def test_due_month_and_grace() -> None:
    grace = timedelta(hours=1)
    assert service.due(at("2026-11-01 00:59:59"), grace) is None
    assert service.due(at("2026-11-01 01:00:00"), grace) == "2026-10"
    assert service.due(at("2027-01-20 08:00"), grace) == "2026-12"


def test_amounts_are_rounded_once_per_line_half_up_in_the_currency() -> None:
    p = pricing.Pricing(
        1, "p", "JPY", Decimal(1000),
        {"messages": pricing.Price(0, Decimal("0.5"), 1),
         "data": pricing.Price(0, Decimal("3"), 7)},
    )  # fmt: skip
    lines = pricing.lines(p, {"messages": 3, "data": 10}, {})
    amounts = {ln.metric: ln.amount for ln in lines}
    assert amounts["messages"] == Decimal(2)  # 1.5 yen: half-up to 2
    assert amounts["data"] == Decimal(4)  # 30 / 7 = 4.2857...: 4
    assert pricing.total(lines) == Decimal(1006)
    assert money.text(Decimal("0.005"), "USD") == "0.01"
    assert money.text(Decimal("0.0049999"), "USD") == "0.00"
    assert money.text(Decimal("1.0005"), "KWD") == "1.001"
    # A price too fine for the context's 28 digits is still exact before the one rounding.
    huge = pricing.Pricing(1, "p", "USD", Decimal(0),
                           {"data": pricing.Price(0, Decimal("0.000000000001"), 1)})  # fmt: skip
    big = pricing.lines(huge, {"data": 9_223_372_036_854_775_807}, {})
    assert big[-1].amount == Decimal("9223372.04")
