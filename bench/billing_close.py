"""Closing a month for finance: 100 000 accounts (target <= 30 s), with peak memory.

A scratch database built by the migrations holds --accounts accounts, each with --apps apps,
on three priced packages (a tenth of the accounts changed package within the month), and
October 2026's rollups as the aggregator leaves them: per account and per app a month row and a
state (its fields in ``usage_state``, no minute row, no starts, no held row; 64 entities of a
scope to a block, each block in two rows, one per part of their values: ``state.NOW`` and
``state.ROWS``, ``metering.rollups.state``), per account an hour row holding its channel peak;
the aggregation watermark is past the month's end. They are written by COPY (the state rows
encoded by ``state.encode``, both parts of every block), not by running the aggregator (which
bench/aggregate.py measures).

Measured: ``metering billing close --month 2026-10`` run as an operator runs it, a process of
its own (its start-up included), timed from outside; peak memory is that process's maximum
resident set (``getrusage(RUSAGE_CHILDREN)``). Then the same command again, which finds the
month closed.

Baseline, in the same run and database: raw psycopg reading the same rollup and state rows
(``fetchall``; ``usage_state``'s rows, both parts of every block, in binary, as
``state.select`` reads them, their words as one array, not decoded) and COPYing as many
invoice rows and invoice-line rows (same columns, text format built by f-strings) into
temporary tables, committed: the least a close must move.

    python bench/billing_close.py [--accounts 100000 --apps 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import exit_on_sigterm, row, scratch_engine
from metering.rollups import state
from metering.rollups.models import COUNTERS
from tests import processes

TARGET_SECONDS = 30.0
MONTH = "2026-10"
START = int(datetime(2026, 10, 1, tzinfo=UTC).timestamp())
END = int(datetime(2026, 11, 1, tzinfo=UTC).timestamp())
PACKAGES = (  # name, base fee, (metric, included, unit price, unit size)
    ("starter", "29.00", [("connections", 200, "0.10", 1), ("messages", 6_000_000, "2.50",
                                                              1_000_000)]),
    ("growth", "249.00", [("connections", 5_000, "0.08", 1), ("channels", 5_000, "0.01", 1),
                          ("messages", 50_000_000, "2.00", 1_000_000)]),
    ("scale", "999.00", [("connections", 50_000, "0.05", 1), ("channels", 50_000, "0.005", 1),
                         ("messages", 500_000_000, "1.50", 1_000_000),
                         ("data", 10**12, "0.10", 10**9)]),
)  # fmt: skip
ROLLUP_COLUMNS = (
    "scope", "entity_id", "unit", "period_start", "conns0", "ws0", "channels0", "area0",
    "ch_area0", *(f"{c}0" for c in COUNTERS), "peak", "peak_at", "min", "ws_peak", "ch_peak",
    "ch_min",
)  # fmt: skip
# usage_state: 64 entities of a scope to a block, two rows a block (one per part of their
# values), each part's fields packed in one value (metering.rollups.state).
STATE_COLUMNS = ("scope", "part", "block", "packed")
STATE_TYPES = ("int2", "int2", "int8", "bytea")


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def copy(
    conn: psycopg.Connection[Any],
    table: str,
    columns: tuple[str, ...],
    rows: Any,
    types: tuple[str, ...] | None = None,
) -> int:
    """COPY ``rows`` into ``table``: in text, or with ``types`` (one per column) in binary."""
    n = 0
    binary = " (FORMAT BINARY)" if types else ""
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN{binary}") as cp:
        if types:
            cp.set_types(list(types))
        for r in rows:
            cp.write_row(r)
            n += 1
    return n


def populate(dsn: str, accounts: int, apps: int, rng: random.Random) -> None:
    """The accounts, apps, priced packages, package history and October's rollups."""
    sept = datetime(2026, 9, 1, tzinfo=UTC)
    with psycopg.connect(dsn) as conn:
        ids = []
        for name, fee, prices in PACKAGES:
            pid = conn.execute(
                "INSERT INTO packages (name, enforce_hard, created_at) VALUES (%s, true, %s) "
                "RETURNING id",
                (name, sept),
            ).fetchone()[0]  # type: ignore[index]
            ids.append(pid)
            conn.execute(
                "INSERT INTO package_pricing VALUES (%s, 'USD', %s, %s, 'bench')",
                (pid, Decimal(fee), sept),
            )
            for metric, included, price, size in prices:
                conn.execute(
                    "INSERT INTO package_prices VALUES (%s, %s, %s, %s, %s)",
                    (pid, metric, included, Decimal(price), size),
                )
        first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM accounts").fetchone()[0]  # type: ignore[index]
        account_ids = range(first, first + accounts)
        package_of = {a: ids[rng.randrange(3)] for a in account_ids}
        copy(conn, "accounts", ("id", "name", "package_id", "created_at"),
             ((a, f"account {a}", package_of[a], sept) for a in account_ids))  # fmt: skip
        app_first = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM apps").fetchone()[0]  # type: ignore[index]
        owner = {app_first + i: first + i // apps for i in range(accounts * apps)}
        copy(conn, "apps", ("id", "account_id", "name", "created_at"),
             ((a, acc, f"app {a}", sept) for a, acc in owner.items()))  # fmt: skip
        changes = [(a, package_of[a], sept, "bench") for a in account_ids]
        mid = datetime(2026, 10, 15, tzinfo=UTC)
        changes += [(a, package_of[a], mid, "bench") for a in account_ids if a % 10 == 0]
        copy(conn, "package_changes", ("account_id", "package_id", "changed_at", "changed_by"),
             changes)  # fmt: skip
        progress(f"{accounts} accounts, {len(owner)} apps, {len(changes)} package changes")

        rollups: list[tuple[int, ...]] = []
        states: list[tuple[int, int, bytes]] = []  # (scope, entity_id, its FIELDS)
        zeros = (0,) * len(COUNTERS)

        def entity(scope: int, entity_id: int, scale: int) -> None:
            peak = rng.randrange(1, 100 * scale)
            ch = rng.randrange(1, 50 * scale)
            at = rng.randrange(START, END)
            pub, deliv = rng.randrange(10**5 * scale), rng.randrange(10**6 * scale)
            totals = (pub // 10, 0, ch, pub, pub * 200, deliv, deliv * 200, 0, 0)
            rollups.append((scope, entity_id, 4, START, 0, 0, 0, 0, 0, *zeros,
                            peak, at, 0, peak, ch, 0))  # fmt: skip
            if scope == 2:  # the hour the channel peak was first reached in
                hour = START + rng.randrange(744) * 3600
                rollups.append((scope, entity_id, 2, hour, 1, 1, 1, 0, 0, *zeros,
                                peak // 2, hour, 0, peak // 2, ch, 1))  # fmt: skip
            now = peak // 2
            fields: dict[str, int | None] = {
                "conns": now, "ws": now, "channels": ch // 2, "since": END - 600,
                "area": peak * 1000, "ch_area": ch * 1000,
                **dict(zip(COUNTERS, totals, strict=True)),
            }  # fmt: skip
            states.append((scope, entity_id, state.pack(fields)))  # no minute row, no starts

        for a in account_ids:
            entity(2, a, apps)
        for app in owner:
            entity(1, app, 1)
        copy(conn, "usage_rollups", ROLLUP_COLUMNS, rollups)
        blocks = copy(conn, "usage_state", STATE_COLUMNS, state_blocks(states), STATE_TYPES)
        conn.execute(
            "UPDATE usage_cursor SET second = %s, first_second = %s WHERE id = 1",
            (END + 30, START - 86400),
        )
        conn.execute("ANALYZE")
        progress(
            f"{len(rollups)} rollup rows, {len(states)} states in {blocks} usage_state rows "
            f"(both parts of {blocks // len(state.PARTS)} blocks)"
        )


def state_blocks(states: list[tuple[int, int, bytes]]) -> list[tuple[int, int, int, bytes]]:
    """The ``usage_state`` rows (scope, part, block, packed) of entities' (scope, id,
    ``FIELDS``): both parts of every block, as ``state.write`` would write them, none holding
    a closed minute row (held start -1)."""
    scopes = np.array([s for s, _, _ in states], dtype=np.int64)
    ids = np.array([e for _, e, _ in states], dtype=np.int64)
    fields = np.frombuffer(b"".join(p for _, _, p in states), dtype=state.DTYPE)
    values = np.full((len(states), state.ALL), -1, dtype=state.DTYPE)
    values[:, : len(state.FIELDS)] = fields.reshape(len(states), len(state.FIELDS))
    return [row for part in state.PARTS for row in state.encode(part, scopes, ids, values)]


def baseline(dsn: str, accounts: int) -> float:
    """Read the rollups and states a close reads; COPY as many invoices and lines."""
    lines = accounts * 5
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn:
        for scope in (1, 2):
            conn.execute(
                "SELECT * FROM usage_rollups WHERE scope = %s AND unit = 4 AND period_start = %s",
                (scope, START),
            ).fetchall()
            with conn.cursor(binary=True) as cur:  # the blocks as stored, not in hex
                found = cur.execute(
                    "SELECT scope, part, block, packed FROM usage_state WHERE scope = %s "
                    "ORDER BY part, block",
                    (scope,),
                ).fetchall()
            np.frombuffer(b"".join(packed for *_key, packed in found), state.DTYPE)
        conn.execute("CREATE TEMP TABLE i (LIKE invoices)")
        conn.execute("CREATE TEMP TABLE l (LIKE invoice_lines)")
        issued = datetime.now(UTC).isoformat()
        source = '{"rollups":["2:1:4:1790812800","state"],"watermark":1793491230}'
        heads = (f"{n}\t{n}\t{MONTH}\t1\tgrowth\tUSD\t249.00\t{issued}\t[]\t{source}\n"
                 for n in range(accounts))  # fmt: skip
        rows = (f"{n // 5}\t{n % 5}\tconnections\t9\t5\t4\t1\t1.5\t6.00\t{issued}\tsecond\t1\t6\n"
                for n in range(lines))  # fmt: skip
        for table, text in (("i", heads), ("l", rows)):
            with conn.cursor().copy(f"COPY {table} FROM STDIN") as cp:
                while block := "".join(itertools.islice(text, 10_000)):
                    cp.write(block)
        conn.commit()
    return time.perf_counter() - started


def close(env: dict[str, str]) -> tuple[float, int, dict[str, Any]]:
    """``metering billing close`` as its own process: seconds, peak RSS (KiB), its summary."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    done = subprocess.run(
        [str(processes.BIN / "metering"), "billing", "close", "--month", MONTH, "--by", "bench",
         "--json"],
        env=env, stdout=subprocess.PIPE, text=True, check=True, timeout=600,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return elapsed, max(peak, before), json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--apps", type=int, default=2, help="apps per account")
    args = parser.parse_args()
    exit_on_sigterm()
    rng = random.Random(7)
    with scratch_engine() as scratch:
        dsn = libpq(scratch.vars["METERING_DATABASE_URL"])
        progress("populating")
        populate(dsn, args.accounts, args.apps, rng)
        progress("baseline: read the rollups, COPY the invoices and lines")
        base = baseline(dsn, args.accounts)
        progress("metering billing close (its progress bar below)")
        seconds, rss, summary = close(scratch.child_env())
        again, _rss, second = close(scratch.child_env())
        with psycopg.connect(dsn) as conn:
            invoices, lines = conn.execute(
                "SELECT (SELECT count(*) FROM invoices), (SELECT count(*) FROM invoice_lines)"
            ).fetchone()  # type: ignore[misc]
    if not summary["closedNow"] or second["closedNow"]:
        sys.exit(f"the first close must close the month, the second find it closed: {summary}")
    if not invoices == summary["invoices"] == args.accounts:
        sys.exit(f"expected {args.accounts} invoices, found {invoices} ({summary})")
    widths = (44, 12, 14, 10)
    print(f"\nClosing {MONTH}: {args.accounts} accounts, {args.accounts * args.apps} apps")
    print(row("", "seconds", "vs baseline", "", widths=widths))
    print(row("baseline (read rollups, COPY rows)", f"{base:.2f}", "1.00", "", widths=widths))
    print(row("metering billing close", f"{seconds:.2f}", f"{seconds / base:.2f}",
              "met" if seconds <= TARGET_SECONDS else "NOT MET", widths=widths))  # fmt: skip
    print(row("the same close again (closed already)", f"{again:.2f}", "", "", widths=widths))
    print(f"\ninvoices {invoices}, lines {lines}, totals {summary['totals']}")
    print(f"peak memory of the close process: {rss / 1024:.0f} MiB (max RSS)")
    print(f"target: <= {TARGET_SECONDS:.0f} s at 100 000 accounts")


if __name__ == "__main__":
    main()
