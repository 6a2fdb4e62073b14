"""All SQL of billing: prices, the package in force, invoices, months closed.

Works on a ``Connection`` and runs the same on Postgres and on SQLite; the close's many rows
go by COPY on Postgres.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, delete, func, insert, select, text

from billing.models import (
    BillingMonth,
    Invoice,
    InvoiceLine,
    PackagePrice,
    PackagePricing,
)
from billing.pricing import Line, Price, Pricing
from metering.accounts.models import Account, Package, PackageChange
from metering.rollups import bulk
from metering.rollups.fold import ACCOUNT, UNIT_CODES
from metering.rollups.models import UsageCursor, UsageRollup
from metering.rollups.periods import Unit

_LINE_COLUMNS = (
    "invoice_id", "position", "metric", "usage", "included", "overage", "unit_size",
    "unit_price", "amount", "peak_at", "peak_resolution", "top_app_id", "top_app_peak",
)  # fmt: skip
_INVOICE_COLUMNS = (
    "id", "account_id", "month", "package_id", "package_name", "currency", "total",
    "issued_at", "package_changes", "source",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class NewInvoice:
    account_id: int
    pricing: Pricing
    total: Decimal
    lines: list[Line]
    package_changes: list[dict[str, Any]]
    source: dict[str, Any]


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _n(value: int | None) -> str:
    return "\\N" if value is None else str(value)


def _invoice_text(iid: int, month: str, inv: NewInvoice, issued: str) -> str:
    """An invoice as a COPY text row (``_INVOICE_COLUMNS``)."""
    p = inv.pricing
    changes = json.dumps(inv.package_changes) if inv.package_changes else "[]"
    source = json.dumps(inv.source, separators=(",", ":"))
    return (
        f"{iid}\t{inv.account_id}\t{month}\t{p.package_id}\t"
        f"{p.package_name.translate(_COPY_ESCAPES)}\t{p.currency}\t{inv.total:f}\t{issued}\t"
        f"{changes.translate(_COPY_ESCAPES)}\t{source.translate(_COPY_ESCAPES)}\n"
    )


def _line_text(iid: int, inv: NewInvoice) -> Iterator[str]:
    """Its lines as COPY text rows (``_LINE_COLUMNS``)."""
    for pos, ln in enumerate(inv.lines):
        pk = ln.peak
        peak = "\\N\t\\N\t\\N\t\\N"
        if pk is not None:
            top = f"{_n(pk.top_app_id)}\t{_n(pk.top_app_peak)}"
            peak = f"{pk.at.isoformat()}\t{pk.resolution}\t{top}"
        yield (
            f"{iid}\t{pos}\t{ln.metric}\t{_n(ln.usage)}\t{_n(ln.included)}\t"
            f"{_n(ln.overage)}\t{_n(ln.unit_size)}\t{ln.unit_price:f}\t{ln.amount:f}\t{peak}\n"
        )


class BillingRepository:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- prices -----------------------------------------------------------------------

    def pricing(self, package_ids: Iterable[int]) -> dict[int, Pricing]:
        """The prices of those packages that have them."""
        ids = sorted(set(package_ids))
        if not ids:
            return {}
        p, pr = PackagePricing.__table__, PackagePrice.__table__
        heads = self.conn.execute(
            select(p.c.package_id, p.c.currency, p.c.base_fee, Package.name)
            .join(Package.__table__, Package.id == p.c.package_id)
            .where(p.c.package_id.in_(ids))
        ).all()
        per: dict[int, dict[str, Price]] = defaultdict(dict)
        for row in self.conn.execute(select(pr).where(pr.c.package_id.in_(ids))).mappings():
            per[row["package_id"]][row["metric"]] = Price(
                row["included"], row["unit_price"], row["unit_size"]
            )
        return {
            pid: Pricing(pid, name, currency, base_fee, dict(per[pid]))
            for pid, currency, base_fee, name in heads
        }

    def set_pricing(
        self, package_id: int, currency: str, base_fee: Decimal, prices: dict[str, Price],
        *, by: str, now: datetime,
    ) -> None:  # fmt: skip
        """Replace the package's prices (its currency, base fee and every metric's price)."""
        self.conn.execute(delete(PackagePricing).where(PackagePricing.package_id == package_id))
        self.conn.execute(
            insert(PackagePricing).values(
                package_id=package_id, currency=currency, base_fee=base_fee,
                updated_at=now, updated_by=by,
            )
        )  # fmt: skip
        if prices:
            self.conn.execute(
                insert(PackagePrice),
                [
                    {
                        "package_id": package_id, "metric": m, "included": p.included,
                        "unit_price": p.unit_price, "unit_size": p.unit_size,
                    }
                    for m, p in prices.items()
                ],
            )  # fmt: skip

    # -- accounts and packages --------------------------------------------------------

    def packages_in_force(
        self, at: datetime, account_ids: Sequence[int] | None = None
    ) -> dict[int, int | None]:
        """Per account that existed before ``at``: the package it was on just before it (the
        latest package change before ``at``; none if every change recorded is later; with no
        change recorded, the package it is on)."""
        pc = PackageChange.__table__
        ranked = (
            select(
                pc.c.account_id, pc.c.package_id,
                func.row_number().over(
                    partition_by=pc.c.account_id, order_by=(pc.c.changed_at.desc(), pc.c.id.desc())
                ).label("rank"),
            )
            .where(pc.c.changed_at < at)
            .subquery()
        )  # fmt: skip
        latest = select(ranked.c.account_id, ranked.c.package_id).where(ranked.c.rank == 1)
        changed: dict[int, int | None] = dict(self.conn.execute(latest).all())
        # An account whose recorded changes all come later was on no package then; one with
        # no change recorded at all is on the package it is on.
        ever = set(self.conn.execute(select(pc.c.account_id).distinct()).scalars().all())
        accounts = select(Account.id, Account.package_id).where(Account.created_at < at)
        if account_ids is not None:
            accounts = accounts.where(Account.id.in_(list(account_ids)))
        out: dict[int, int | None] = {}
        for account_id, current in self.conn.execute(accounts.order_by(Account.id)).all():
            out[account_id] = changed.get(account_id, None if account_id in ever else current)
        return out

    def changes_within(
        self, start: datetime, end: datetime, account_ids: Sequence[int] | None = None
    ) -> dict[int, list[dict[str, Any]]]:
        """The package changes made in [start, end), per account, oldest first: when, the
        package before and after (names), and who made it."""
        pc = PackageChange.__table__
        within = select(pc.c.account_id).where((pc.c.changed_at >= start) & (pc.c.changed_at < end))
        if account_ids is not None:
            within = within.where(pc.c.account_id.in_(list(account_ids)))
        # The history of those accounts up to the end: the change before ``start`` says what
        # the first change within changed from.
        q = (
            select(pc.c.account_id, pc.c.package_id, pc.c.changed_at, pc.c.changed_by)
            .where(pc.c.account_id.in_(within.distinct()) & (pc.c.changed_at < end))
            .order_by(pc.c.account_id, pc.c.changed_at, pc.c.id)
        )
        rows = self.conn.execute(q).all()
        if not rows:
            return {}
        names = dict(self.conn.execute(select(Package.id, Package.name)).all())
        out: dict[int, list[dict[str, Any]]] = defaultdict(list)
        held: dict[int, int | None] = {}
        for account_id, package_id, at, by in rows:
            prev = held.get(account_id)
            held[account_id] = package_id
            if at < start:
                continue
            out[account_id].append(
                {
                    "at": at.isoformat().replace("+00:00", "Z"),
                    "from": names.get(prev) if prev is not None else None,
                    "to": names.get(package_id) if package_id is not None else None,
                    "by": by,
                }
            )
        return dict(out)

    def apps_of(
        self, account_ids: Sequence[int] | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Every app (of those accounts) and its account: two arrays, by app id."""
        where = ""
        if account_ids is not None:
            where = (
                f" WHERE account_id IN ({', '.join(str(int(a)) for a in account_ids) or 'NULL'})"
            )
        pairs = bulk.select_array(
            self.conn, f"SELECT id, account_id FROM apps{where} ORDER BY id",  # noqa: S608
            "apps", ("id", "account_id"),
        )  # fmt: skip
        return pairs[:, 0].copy(), pairs[:, 1].copy()

    def channel_peak_hours(self, month_start: int, month_end: int) -> dict[int, int]:
        """Per account with a month row: the start of the first hour of the month whose
        channel peak is the month's (an hour row always exists where the peak was reached by
        a change; a peak held since the month began has none, and is not here)."""
        h, m = UsageRollup.__table__.alias("h"), UsageRollup.__table__.alias("m")
        q = (
            select(h.c.entity_id, func.min(h.c.period_start))
            .join(
                m,
                (m.c.scope == h.c.scope) & (m.c.entity_id == h.c.entity_id)
                & (m.c.unit == UNIT_CODES[Unit.MONTH]) & (m.c.period_start == month_start)
                & (m.c.ch_peak == h.c.ch_peak),
            )
            .where(
                (h.c.scope == ACCOUNT) & (h.c.unit == UNIT_CODES[Unit.HOUR])
                & (h.c.period_start >= month_start) & (h.c.period_start < month_end)
            )
            .group_by(h.c.entity_id)
        )  # fmt: skip
        return dict(self.conn.execute(q).all())

    def currencies_billed(self, before_month: str) -> dict[int, str]:
        """Per account already invoiced before ``before_month``: the currency of its latest
        invoice (an account is billed in one currency)."""
        i = Invoice.__table__
        latest = (
            select(i.c.account_id, func.max(i.c.month).label("month"))
            .where(i.c.month < before_month)
            .group_by(i.c.account_id)
            .subquery()
        )
        q = select(i.c.account_id, i.c.currency).join(
            latest, (i.c.account_id == latest.c.account_id) & (i.c.month == latest.c.month)
        )
        return dict(self.conn.execute(q).all())

    def coverage(self) -> tuple[int | None, int | None]:
        """The first second the aggregation counted, and the last it folded (None: none)."""
        row = self.conn.execute(
            select(UsageCursor.first_second, UsageCursor.second).where(UsageCursor.id == 1)
        ).first()
        return (None, None) if row is None else (row[0], row[1])

    # -- months closed and invoices ---------------------------------------------------

    def lock_month(self, month: str) -> None:
        """Serialize closers of one month until the transaction ends (Postgres; SQLite's
        single writer does the same once the first write is made)."""
        if self.conn.dialect.name == "postgresql":
            key = 0x42494C4C_00000000 + int(month.replace("-", ""))  # 'BILL' + yyyymm
            self.conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    def closed(self, month: str) -> BillingMonth | None:
        row = self.conn.execute(
            select(BillingMonth.__table__).where(BillingMonth.month == month)
        ).first()
        return None if row is None else BillingMonth(**row._asdict())

    def mark_closed(
        self, month: str, *, by: str, invoices: int, watermark: int, now: datetime
    ) -> None:
        self.conn.execute(
            insert(BillingMonth).values(
                month=month, closed_at=now, closed_by=by, invoices=invoices, watermark=watermark
            )
        )

    def insert_invoices(
        self, month: str, invoices: Iterable[NewInvoice], count: int, now: datetime
    ) -> None:
        """The month's ``count`` invoices and their lines, in bulk. On Postgres each invoice's
        lines go into a COPY as soon as it is computed: the server stores them while the next
        ones are computed (two cores at work, not one after the other)."""
        ids = self._new_ids(count)
        if self.conn.dialect.name != "postgresql":
            self._insert_rows(month, list(zip(ids, invoices, strict=True)), now)
            return
        raw: Any = self.conn.connection.driver_connection
        heads: list[str] = []
        buffered: list[str] = []
        issued = now.isoformat()
        columns = ", ".join(_LINE_COLUMNS)
        with raw.cursor().copy(f"COPY invoice_lines ({columns}) FROM STDIN") as copy:
            for iid, inv in zip(ids, invoices, strict=True):
                heads.append(_invoice_text(iid, month, inv, issued))
                buffered.extend(_line_text(iid, inv))
                if len(buffered) >= 10_000:
                    copy.write("".join(buffered))
                    buffered.clear()
            copy.write("".join(buffered))
        with raw.cursor().copy(f"COPY invoices ({', '.join(_INVOICE_COLUMNS)}) FROM STDIN") as copy:
            for start in range(0, len(heads), 10_000):
                copy.write("".join(heads[start : start + 10_000]))

    def _insert_rows(
        self, month: str, invoices: list[tuple[int, NewInvoice]], now: datetime
    ) -> None:
        """SQLite: rows by executemany."""
        heads = [
            (
                iid, inv.account_id, month, inv.pricing.package_id, inv.pricing.package_name,
                inv.pricing.currency, inv.total, now, json.dumps(inv.package_changes),
                json.dumps(inv.source, separators=(",", ":")),
            )
            for iid, inv in invoices
        ]  # fmt: skip
        lines = [
            (
                iid, pos, ln.metric, ln.usage, ln.included, ln.overage, ln.unit_size,
                ln.unit_price, ln.amount,
                None if ln.peak is None else ln.peak.at,
                None if ln.peak is None else ln.peak.resolution,
                None if ln.peak is None else ln.peak.top_app_id,
                None if ln.peak is None else ln.peak.top_app_peak,
            )
            for iid, inv in invoices
            for pos, ln in enumerate(inv.lines)
        ]  # fmt: skip
        for model, columns, rows in ((Invoice, _INVOICE_COLUMNS, heads),
                                     (InvoiceLine, _LINE_COLUMNS, lines)):  # fmt: skip
            if rows:
                self.conn.execute(insert(model), [dict(zip(columns, r, strict=True)) for r in rows])

    def _new_ids(self, n: int) -> list[int]:
        if self.conn.dialect.name == "postgresql":
            seq = (
                "SELECT nextval(pg_get_serial_sequence('invoices', 'id')) "
                "FROM generate_series(1, :n)"
            )
            return list(self.conn.execute(text(seq), {"n": n}).scalars())
        # SQLite: this transaction holds the only write lock (the month's row is written).
        first = (self.conn.execute(select(func.max(Invoice.id))).scalar() or 0) + 1
        return list(range(first, first + n))

    def totals(self, month: str) -> list[tuple[str, Decimal]]:
        """(currency, total) of every invoice of the month."""
        q = select(Invoice.currency, Invoice.total).where(Invoice.month == month)
        return [(c, t) for c, t in self.conn.execute(q).all()]

    def invoices(
        self, *, month: str | None = None, invoice_id: int | None = None,
        after: int | None = None, limit: int | None = None,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Invoices with their lines (``lines``: dicts in position order), by month and account;
        ``after``: only accounts after this one; ``limit``: at most this many."""
        i = Invoice.__table__
        q = select(i).order_by(i.c.month, i.c.account_id)
        if month is not None:
            q = q.where(i.c.month == month)
        if invoice_id is not None:
            q = q.where(i.c.id == invoice_id)
        if after is not None:
            q = q.where(i.c.account_id > after)
        if limit is not None:
            q = q.limit(limit)
        heads = [dict(r) for r in self.conn.execute(q).mappings().all()]
        if not heads:
            return []
        ln = InvoiceLine.__table__
        lq = select(ln).order_by(ln.c.invoice_id, ln.c.position)
        if invoice_id is not None or limit is not None:
            lq = lq.where(ln.c.invoice_id.in_([h["id"] for h in heads]))
        else:
            lq = lq.join(i, i.c.id == ln.c.invoice_id).where(i.c.month == month)
        per: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in self.conn.execute(lq).mappings().all():
            per[r["invoice_id"]].append(dict(r))
        for h in heads:
            h["lines"] = per[h["id"]]
        return heads
