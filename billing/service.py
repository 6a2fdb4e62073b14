"""Monthly invoices: prices of packages, the month close, previews.

The rules (README "Billing"):

- An account is billed for a calendar month (UTC) on the package in force at the month's end:
  the latest package change before the end (with no change recorded, the package it is on).
  Changes within the month are listed on the invoice; they do not split it.
- Usage is the account's month rollup, the same figures ``GET /v1/stats?scope=account&unit=
  month`` gives: peak connections (all realtime transports; the largest per-second sum over
  the account's apps), peak channels, messages (published + delivered) and data (their bytes).
- A month is closed once, by ``close``: one invoice per account on a package, final. A second
  close (or a concurrent one) finds the month closed and changes nothing: the month's row in
  ``billing_months`` is written first, under a lock, and every invoice is unique per (account,
  month). Nothing is written unless every account can be billed.

Services never commit: the caller's transaction does (``billing.jobs``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, select

from billing import money, pricing
from billing.models import PRICED_METRICS
from billing.pricing import Peak, Price, Pricing
from billing.repository import BillingRepository, NewInvoice
from metering.accounts.models import Account, Package
from metering.core.errors import NotFoundError, ValidationError
from metering.core.ids import is_id
from metering.core.logging import get_logger
from metering.limits.service import month_of
from metering.rollups import query
from metering.rollups.fold import ACCOUNT, APP
from metering.rollups.periods import Unit, next_start, parse_interval_id

log = get_logger(__name__)

Progress = Callable[[int, int], None]  # (accounts done, accounts in all)
# Money(24, 4): an invoice's total must stay below 10^20.
_MAX_TOTAL = Decimal(10) ** 20


# -- prices ------------------------------------------------------------------------------------


def parse_price(text: str) -> tuple[str, Price]:
    """``METRIC=INCLUDED:UNIT_PRICE[:UNIT_SIZE]``, e.g. ``messages=1000000:0.40:1000``."""
    metric, sep, rest = text.partition("=")
    metric = metric.strip()
    parts = rest.split(":")
    if not sep or len(parts) not in {2, 3}:
        raise ValidationError(
            f"price {text!r} is not METRIC=INCLUDED:UNIT_PRICE[:UNIT_SIZE] "
            "(e.g. messages=1000000:0.40:1000)"
        )
    if metric not in PRICED_METRICS:
        raise ValidationError(
            f"unknown metric {metric!r} in price {text!r} (one of {', '.join(PRICED_METRICS)})"
        )
    return metric, price(metric, parts[0], parts[1], parts[2] if len(parts) == 3 else 1)


def price(metric: str, included: str | int, unit_price: str, unit_size: str | int) -> Price:
    """A metric's price from its parts as typed: counts whole, the price exact."""
    return Price(
        _count(included, f"included {metric}", minimum=0),
        money.parse(unit_price, f"unit price of {metric}", places=money.PRICE_PLACES),
        _count(unit_size, f"unit size of {metric}", minimum=1),
    )


def _count(value: str | int, what: str, *, minimum: int) -> int:
    try:
        n = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value))
    except ValueError:
        raise ValidationError(f"{what} must be a whole number, got {value!r}") from None
    if not minimum <= n < 2**63:
        raise ValidationError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return n


def set_prices(
    conn: Connection,
    package_ref: str,
    *,
    currency: str,
    base_fee: str | Decimal,
    prices: dict[str, Price],
    by: str,
    now: datetime | None = None,
) -> Pricing:
    """Give a package its prices, replacing any it had. Invoices already issued keep theirs."""
    now = now or datetime.now(UTC)
    code = money.currency(currency)
    fee = money.parse(base_fee, "base fee", places=money.MINOR_UNITS[code])
    by = by.strip()
    if not by or len(by) > 200:
        raise ValidationError("who made the change (by) must be 1 to 200 characters")
    package_id, _name = _package(conn, package_ref)
    repo = BillingRepository(conn)
    repo.set_pricing(package_id, code, fee, prices, by=by, now=now)
    return repo.pricing([package_id])[package_id]


def pricing_view(p: Pricing) -> dict[str, Any]:
    return {
        "packageId": p.package_id,
        "package": p.package_name,
        "currency": p.currency,
        "baseFee": money.text(p.base_fee, p.currency),
        "prices": {
            m: {
                "included": p.prices[m].included,
                "unitPrice": _price_text(p.prices[m].unit_price),
                "unitSize": p.prices[m].unit_size,
            }
            for m in PRICED_METRICS
            if m in p.prices
        },
    }


def prices_of(conn: Connection, package_ref: str) -> Pricing:
    package_id, name = _package(conn, package_ref)
    found = BillingRepository(conn).pricing([package_id])
    if package_id not in found:
        raise ValidationError(f"package {name!r} has no prices", code="PACKAGE_NOT_PRICED")
    return found[package_id]


def _package(conn: Connection, ref: str) -> tuple[int, str]:
    """(id, name) of the package named ``ref``, or whose id it is."""
    ref = ref.strip()
    by_id = ref.isdigit() and is_id(int(ref))
    q = select(Package.id, Package.name).where(
        Package.id == int(ref) if by_id else Package.name == ref
    )
    row = conn.execute(q).first()
    if row is None:
        raise NotFoundError(f"package {ref!r} does not exist", code="PACKAGE_NOT_FOUND")
    return row[0], row[1]


# -- months ------------------------------------------------------------------------------------


def parse_month(value: str) -> datetime:
    """The start of a 'YYYY-MM' month (UTC); a clear error for anything else."""
    return parse_interval_id(Unit.MONTH, value.strip())


def month_bounds(start: datetime) -> tuple[int, int]:
    return int(start.timestamp()), int(next_start(Unit.MONTH, start).timestamp())


# -- computing invoices --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Draft:
    """The invoices a month would get now (``count`` of them, computed as they are read, so
    that the close writes each while the next is computed), and the accounts it bills none
    (no package)."""

    month: str
    invoices: Iterator[NewInvoice]
    count: int
    unbilled: list[int] = field(default_factory=list)
    watermark: int | None = None


def draft(  # noqa: PLR0915 (the month's bulk reads, then the closure that bills one account)
    conn: Connection,
    month: str,
    *,
    now: datetime,
    account_ids: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> Draft:
    """The invoices of ``month`` (of ``account_ids``, or of every account that existed before
    the month's end or, for the current month, before ``now``), computed and not written.

    Raises, before anything is written, if one of them cannot be billed: a package without
    prices, or a currency other than the one the account was billed in before."""
    start = parse_month(month)
    ms, me = month_bounds(start)
    end = datetime.fromtimestamp(me, UTC)
    at = min(end, now)
    repo = BillingRepository(conn)
    in_force = repo.packages_in_force(at, account_ids)
    billed = {a: p for a, p in in_force.items() if p is not None}
    unbilled = sorted(a for a, p in in_force.items() if p is None)
    prices = repo.pricing(billed.values())
    _check_prices(conn, billed, prices)
    _check_currencies(repo.currencies_billed(month), billed, prices)

    ctx = query.Context(conn)
    ids = np.array(sorted(billed), np.int64)
    acc = query.month_usage(conn, ACCOUNT, ms, ctx)
    apps = query.month_usage(conn, APP, ms, ctx)
    app_ids, owners = repo.apps_of(account_ids)
    top = {m: _top_apps(apps, app_ids, owners, ids, v) for m, v in
           (("connections", apps.peak), ("channels", apps.ch_peak))}  # fmt: skip
    hours = repo.channel_peak_hours(ms, me)
    changes = repo.changes_within(start, at, account_ids)
    first = ctx.coverage.first_covered(ms, me)
    watermark = ctx.coverage.last

    # Column-wise to lists once: the loop below reads plain ints.
    k_of = acc.find(ids).tolist()
    peak, peak_at, ch_peak = acc.peak.tolist(), acc.peak_at.tolist(), acc.ch_peak.tolist()
    messages, data, row, after = (
        acc.messages.tolist(), acc.data.tolist(), acc.row.tolist(), acc.after.tolist()
    )  # fmt: skip
    tops = {m: (t[0].tolist(), t[1].tolist()) for m, t in top.items()}
    total = len(ids)
    zero = dict.fromkeys(PRICED_METRICS, 0)

    def make() -> Iterator[NewInvoice]:
        for i, account_id in enumerate(ids.tolist()):
            yield bill(i, account_id)
            if progress is not None and ((i + 1) % 1000 == 0 or i + 1 == total):
                progress(i + 1, total)

    def bill(i: int, account_id: int) -> NewInvoice:
        k = k_of[i]
        hour = hours.get(account_id)
        sources: list[str] = []
        if k < 0 or first is None:
            usage, peaks = zero, {}
        else:
            usage = {"connections": peak[k], "channels": ch_peak[k], "messages": messages[k],
                     "data": data[k]}  # fmt: skip
            peaks = {
                m: Peak(
                    _utc(when), resolution,
                    None if tops[m][0][i] < 0 else tops[m][0][i],
                    None if tops[m][0][i] < 0 else tops[m][1][i],
                )
                for m, when, resolution in (
                    ("connections", peak_at[k], "second"),
                    ("channels", *((hour, "hour") if hour is not None else (first, "second"))),
                )
            }  # fmt: skip
            if row[k]:
                sources.append(f"{ACCOUNT}:{account_id}:4:{ms}")
            sources.append("state" if after[k] < 0 else f"{ACCOUNT}:{account_id}:4:{after[k]}")
            if hour is not None:
                sources.append(f"{ACCOUNT}:{account_id}:2:{hour}")
        price = prices[billed[account_id]]
        lines = pricing.lines(price, usage, peaks)
        amount = pricing.total(lines)
        if amount >= _MAX_TOTAL:
            raise ValidationError(f"account {account_id}'s {month} total is too large: {amount}")
        return NewInvoice(
            account_id=account_id, pricing=price, total=amount, lines=lines,
            package_changes=changes.get(account_id, []),
            source={"rollups": sources, "watermark": watermark},
        )  # fmt: skip

    return Draft(month, make(), total, unbilled, watermark)


def _utc(second: int) -> datetime:
    return datetime.fromtimestamp(second, UTC)


def _top_apps(
    apps: query.MonthUsage,
    app_ids: npt.NDArray[np.int64],
    owners: npt.NDArray[np.int64],
    accounts: npt.NDArray[np.int64],
    value: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Per account of ``accounts``: the app with the highest ``value`` of its own in the month
    and that value (ties: the lower app id; -1 and 0 without a value above 0).
    ``app_ids`` (sorted) and ``owners``: every app and its account."""
    at = np.searchsorted(app_ids, apps.ids)
    at = np.minimum(at, max(len(app_ids) - 1, 0))
    mine = (app_ids[at] == apps.ids) & (value > 0) if len(app_ids) else value < 0
    app, owner, v = apps.ids[mine], owners[at[mine]], value[mine]
    order = np.lexsort((app, -v, owner))  # by account, highest value first, then lower id
    owner, app, v = owner[order], app[order], v[order]
    firsts = np.unique(owner, return_index=True)[1]
    best_owner, best_app, best_v = owner[firsts], app[firsts], v[firsts]
    top_app, top_v = np.full(len(accounts), -1, np.int64), np.zeros(len(accounts), np.int64)
    if len(best_owner):
        pos = np.minimum(np.searchsorted(best_owner, accounts), len(best_owner) - 1)
        hit = best_owner[pos] == accounts
        top_app[hit], top_v[hit] = best_app[pos[hit]], best_v[pos[hit]]
    return top_app, top_v


def _check_prices(conn: Connection, billed: dict[int, int], prices: dict[int, Pricing]) -> None:
    missing = sorted({p for p in billed.values() if p not in prices})
    if not missing:
        return
    q = select(Package.id, Package.name).where(Package.id.in_(missing))
    names = dict(conn.execute(q).all())
    accounts = sorted(a for a, p in billed.items() if p in missing)
    shown = ", ".join(str(a) for a in accounts[:10]) + (", ..." if len(accounts) > 10 else "")
    raise ValidationError(
        f"package {', '.join(repr(names[p]) for p in missing)} has no prices "
        f"({len(accounts)} account(s) on it: {shown}); set them with "
        "`metering packages set-prices`",
        code="PACKAGE_NOT_PRICED",
    )


def _check_currencies(
    before: dict[int, str], billed: dict[int, int], prices: dict[int, Pricing]
) -> None:
    wrong = [
        (a, before[a], prices[p].currency)
        for a, p in sorted(billed.items())
        if a in before and before[a] != prices[p].currency
    ]
    if not wrong:
        return
    a, was, now = wrong[0]
    more = f" (and {len(wrong) - 1} other account(s))" if len(wrong) > 1 else ""
    raise ValidationError(
        f"currency mismatch: account {a} was billed in {was} and its package is priced in "
        f"{now}{more}; an account is billed in one currency",
        code="CURRENCY_MISMATCH",
    )


# -- closing and reading -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CloseResult:
    month: str
    closed_now: bool  # False: it was closed already, nothing changed
    invoices: int
    unbilled: int = 0
    totals: dict[str, str] = field(default_factory=dict)  # currency -> sum of the invoices
    closed_at: datetime | None = None


def close(
    conn: Connection,
    month: str,
    *,
    by: str,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> CloseResult:
    """Close ``month``: one final invoice per account on a package. Closing a closed month
    returns what the first close made and writes nothing."""
    now = now or datetime.now(UTC)
    _ms, me = month_bounds(parse_month(month))
    if now < datetime.fromtimestamp(me, UTC):
        raise ValidationError(
            f"month {month} is not over (it ends {_utc(me).isoformat()}); "
            f"preview its invoices instead",
            code="MONTH_NOT_OVER",
        )
    repo = BillingRepository(conn)
    repo.lock_month(month)
    done = repo.closed(month)
    if done is not None:
        return _summary(repo, month, closed_now=False, closed_at=done.closed_at)
    first, watermark = repo.coverage()
    if first is not None and not counted_in(conn, month):
        raise ValidationError(
            f"nothing was counted in {month}: counting began {_utc(first).isoformat()}",
            code="MONTH_NOT_COUNTED",
        )
    if not aggregated_through(conn, month) or watermark is None:
        folded = "nothing yet" if watermark is None else _utc(watermark).isoformat()
        raise ValidationError(
            f"the rollups do not reach the end of {month} yet (aggregated up to {folded}); "
            "close it once the aggregation has passed the month's end",
            code="MONTH_NOT_AGGREGATED",
        )
    d = draft(conn, month, now=now, progress=progress)
    repo.mark_closed(month, by=by, invoices=d.count, watermark=watermark, now=now)
    repo.insert_invoices(month, d.invoices, d.count, now)
    log.info("billing.month_closed", month=month, invoices=d.count, by=by)
    return _summary(repo, month, closed_now=True, closed_at=now, unbilled=len(d.unbilled))


def _summary(
    repo: BillingRepository, month: str, *, closed_now: bool, closed_at: datetime,
    unbilled: int = 0,
) -> CloseResult:  # fmt: skip
    # Summed here, not in SQL: SQLite would sum the amounts' text as floats.
    sums: dict[str, Decimal] = {}
    n = 0
    for currency, amount in repo.totals(month):
        sums[currency] = sums.get(currency, Decimal(0)) + amount
        n += 1
    totals = {c: money.text(v, c) for c, v in sorted(sums.items())}
    return CloseResult(month, closed_now, n, unbilled, totals, closed_at)


def is_closed(conn: Connection, month: str) -> bool:
    return BillingRepository(conn).closed(month) is not None


def aggregated_through(conn: Connection, month: str) -> bool:
    """Whether the rollups reach the month's end (its last second is folded)."""
    _ms, me = month_bounds(parse_month(month))
    _first, last = BillingRepository(conn).coverage()
    return last is not None and last >= me - 1


def counted_in(conn: Connection, month: str) -> bool:
    """Whether the engine had begun counting by the month's end: a month before it has no
    usage to bill, and closing it would bill base fees for nothing it saw."""
    _ms, me = month_bounds(parse_month(month))
    first, _last = BillingRepository(conn).coverage()
    return first is not None and first < me


def due(now: datetime, grace: timedelta) -> str | None:
    """The month the periodic close should close now: the previous month, once its grace
    window (time for late aggregates to land) has passed."""
    this = parse_month(month_of(now))
    prev = (this - timedelta(days=1)).replace(day=1)
    return month_of(prev) if now >= this + grace else None


def preview(conn: Connection, account_id: int, *, now: datetime | None = None) -> NewInvoice:
    """A draft of the account's invoice for the current month, as it stands now."""
    now = now or datetime.now(UTC)
    exists = (
        is_id(account_id)
        and conn.execute(select(Account.id).where(Account.id == account_id)).first()
    )
    if not exists:
        raise NotFoundError(f"account {account_id} does not exist", code="ACCOUNT_NOT_FOUND")
    found = list(draft(conn, month_of(now), now=now, account_ids=[account_id]).invoices)
    if not found:
        raise ValidationError(
            f"account {account_id} is on no package: it has nothing to bill",
            code="ACCOUNT_WITHOUT_PACKAGE",
        )
    return found[0]


MAX_PAGE = 10_000


def invoices(
    conn: Connection, month: str, *, after: int | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """The final invoices of a closed month, by account (a page of them: those of accounts
    after ``after``, at most ``limit``)."""
    if limit is not None and not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    parse_month(month)
    repo = BillingRepository(conn)
    if repo.closed(month) is None:
        raise NotFoundError(
            f"month {month} is not closed: it has no final invoices yet "
            "(`metering billing close`, or a preview per account)",
            code="MONTH_NOT_CLOSED",
        )
    return [view(i) for i in repo.invoices(month=month, after=after, limit=limit)]


def invoice(conn: Connection, invoice_id: int) -> dict[str, Any]:
    found = BillingRepository(conn).invoices(invoice_id=invoice_id) if is_id(invoice_id) else []
    if not found:
        raise NotFoundError(f"invoice {invoice_id} does not exist", code="INVOICE_NOT_FOUND")
    return view(found[0])


# -- views ---------------------------------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _price_text(value: Decimal) -> str:
    """A unit price without trailing zeros or exponent ('0.0004', '49')."""
    return f"{value.normalize():f}"


def view(row: dict[str, Any]) -> dict[str, Any]:
    """A stored invoice as the API and the exports show it (camelCase; money as text)."""
    cur = row["currency"]
    return {
        "id": row["id"],
        "accountId": row["account_id"],
        "month": row["month"],
        "status": "final",
        "package": row["package_name"],
        "packageId": row["package_id"],
        "currency": cur,
        "total": money.text(row["total"], cur),
        "issuedAt": _iso(row["issued_at"]),
        "packageChanges": json.loads(row["package_changes"]),
        "lines": [
            _line_view(
                cur,
                ln["metric"],
                ln["usage"],
                ln["included"],
                ln["overage"],
                ln["unit_size"],
                ln["unit_price"],
                ln["amount"],
                ln["peak_at"],
                ln["peak_resolution"],
                ln["top_app_id"],
                ln["top_app_peak"],
            )
            for ln in row["lines"]
        ],
        "source": json.loads(row["source"]),
    }


def draft_view(inv: NewInvoice, month: str, now: datetime) -> dict[str, Any]:
    """A draft (preview) shaped like a stored invoice, with ``status: draft``."""
    cur = inv.pricing.currency
    return {
        "id": None,
        "accountId": inv.account_id,
        "month": month,
        "status": "draft",
        "package": inv.pricing.package_name,
        "packageId": inv.pricing.package_id,
        "currency": cur,
        "total": money.text(inv.total, cur),
        "asOf": _iso(now),
        "packageChanges": inv.package_changes,
        "lines": [
            _line_view(
                cur,
                ln.metric,
                ln.usage,
                ln.included,
                ln.overage,
                ln.unit_size,
                ln.unit_price,
                ln.amount,
                None if ln.peak is None else ln.peak.at,
                None if ln.peak is None else ln.peak.resolution,
                None if ln.peak is None else ln.peak.top_app_id,
                None if ln.peak is None else ln.peak.top_app_peak,
            )
            for ln in inv.lines
        ],
        "source": inv.source,
    }


def _line_view(  # noqa: PLR0917 (the line's columns, in order)
    cur: str, metric: str, usage: int | None, included: int | None, overage: int | None,
    unit_size: int | None, unit_price: Decimal, amount: Decimal, peak_at: datetime | None,
    resolution: str | None, top_app: int | None, top_peak: int | None,
) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {
        "metric": metric,
        "usage": usage,
        "included": included,
        "overage": overage,
        "unitSize": unit_size,
        "unitPrice": _price_text(unit_price),
        "amount": money.text(amount, cur),
    }
    if peak_at is not None:
        out.update(
            peakAt=_iso(peak_at), peakResolution=resolution, topAppId=top_app, topAppPeak=top_peak
        )
    return out
