"""A scripted scenario on a controllable clock, checked against figures computed independently.

Six minutes across an hour, a day and a month boundary (2026-03-31 23:57 to 2026-04-01 00:03
UTC): three apps in two accounts, three frontends (one crashes), WebSocket and streaming
connections, channels, messages, refused connections, channel attaches and messages, ten
seconds no tick counted, and an aggregation every seven seconds, out of step with the minutes
so that cycles straddle period ends. The test keeps its own books of what it did, second by
second, and computes every period's peak, min, mean, opened, refused and message totals from
them; the stats API must return exactly those.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import text

from metering.api.app import create_app
from metering.core.database import get_engine
from metering.gateway.sdk import Meter
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups import query
from metering.rollups import state as entity_state
from metering.rollups.fold import ACCOUNT, APP, R_PEAK, UNIT_CODES, period_start
from metering.rollups.periods import Unit, interval_id
from metering.rollups.service import HELD_WITHIN, SETTLE_WITHIN, Aggregator
from tests.conftest import Env
from tests.factories import Tenant, tenant
from tests.scratch import REDIS_URL

T0 = int(datetime(2026, 3, 31, 23, 57, tzinfo=UTC).timestamp())
DURATION = 360
MISSED = range(T0 + 130, T0 + 140)  # no tick counts these seconds (a paused beat)
CRASH_AT = T0 + 200  # fe3's last flush; it is reaped at the next tick
# Cycles after which the API is checked as well as at the end: just into April, when the
# hour, day and month rows that began with its first minute are in no table but the state
# rows (written lazily: fold.Book), and a minute later, when they began with a held row.
CHECKPOINTS = (185, 248)
TIMEOUT = 0.4  # liveness, real seconds


def targets(app: str, t: int, rng: random.Random) -> int:
    """How many connections each app should have open at scenario second ``t``."""
    x = t - T0
    if app == "a1":  # peaks early
        return min(x // 6, 10) if x < 60 else max(10 - (x - 60) // 6, 2)
    if app == "a2":  # peaks late
        return (
            1
            if x < 120
            else (min(1 + (x - 120) // 8, 8) if x < 240 else max(8 - (x - 240) // 10, 0))
        )
    return max(0, min(6, 3 + rng.randint(-3, 3)))  # b1 wanders


@dataclass
class Books:
    """The test's own record of what the scenario did."""

    values: dict[str, dict[int, tuple[int, int, int]]] = field(
        default_factory=lambda: defaultdict(dict)
    )  # entity -> covered second -> (conns, ws, channels)
    counters: dict[str, dict[int, dict[str, int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    )  # entity -> second the count lands at -> name -> n
    pending: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(int))
    )


@pytest.fixture
def world(env: Env) -> Iterator[tuple[dict[str, Tenant], GlobalStore, DatacenterStore]]:
    a1 = tenant("stats", name="a")
    a2 = tenant("stats", account_id=a1.account_id, name="a")
    b1 = tenant("stats", name="b")
    client = redis.Redis.from_url(REDIS_URL)
    yield (
        {"a1": a1, "a2": a2, "b1": b1},
        GlobalStore(client, env.prefix),
        DatacenterStore(client, env.prefix, "dc1"),
    )
    client.close()


# Closed minute rows move from the state rows to usage_rollups: within HELD_WITHIN counted
# seconds of their minute's end (the default); about one a cycle (due so late that each
# cycle's share rounds up to one row); or only when the entity's next minute closes. Closed
# hour, day and month rows with a copy that lag by their last minute are settled likewise:
# within SETTLE_WITHIN (the default), one entity's a cycle, or only when the entity's rows
# close again (here: never), so that readers widen them by that minute's row, from the state
# row or, once it has moved, from usage_rollups. The API reads the rows still held from the
# state rows, and fresh aggregators (restarted workers) load them.
@pytest.mark.parametrize(
    ("held_within", "settle_within"),
    [(HELD_WITHIN, SETTLE_WITHIN), (10**9, 10**9), (None, None), (HELD_WITHIN, None)],
    ids=[
        "moved-by-their-due-second", "one-a-cycle", "moved-when-the-next-closes",
        "closed-rows-never-settled",
    ],
)  # fmt: skip
def test_rollups_match_figures_computed_independently(  # noqa: PLR0912 (a script)
    world, held_within: int | None, settle_within: int | None
) -> None:
    apps, g, dc = world
    ids = {name: str(t.app_id) for name, t in apps.items()}
    owner = {"a1": "A", "a2": "A", "b1": "B"}
    rng = random.Random(7)
    meters = {fe: Meter(dc, fe, liveness_timeout=TIMEOUT) for fe in ("fe1", "fe2", "fe3")}
    alive = set(meters)
    # Open connections: (frontend, app, transport); channels: (frontend, app) -> names.
    open_conns: list[tuple[str, str, str]] = []
    attached: dict[tuple[str, str], set[str]] = defaultdict(set)
    books = Books()
    prev_active: dict[str, set[str]] = {a: set() for a in ids}
    aggregator = Aggregator(
        get_engine(), g, {"dc1": dc}, held_within=held_within, settle_within=settle_within
    )
    held_seen = 0
    deferred_seen = 0  # closed hour, day and month rows waiting for their held minute row
    lag_seen = 0  # entities whose closed rows lag by a minute row no longer held

    for t in range(T0, T0 + DURATION):
        if t == CRASH_AT + 1:
            alive.discard("fe3")  # its counts vanish when the tick reaps it
            open_conns = [c for c in open_conns if c[0] != "fe3"]
            for k in [k for k in attached if k[0] == "fe3"]:
                del attached[k]
            time.sleep(TIMEOUT + 0.2)
        live = sorted(alive)
        for name, app_id in ids.items():
            want = targets(name, t, rng)
            mine = [c for c in open_conns if c[1] == name]
            while len(mine) < want:
                fe = rng.choice(live)
                transport = "streaming" if name == "b1" and rng.random() < 0.4 else "websocket"
                meters[fe].connection_opened(app_id, transport)
                books.pending[name]["opened"] += 1
                conn = (fe, name, transport)
                open_conns.append(conn)
                mine.append(conn)
            while len(mine) > want:
                conn = mine.pop(rng.randrange(len(mine)))
                open_conns.remove(conn)
                meters[conn[0]].connection_closed(app_id, conn[2])
            if rng.random() < 0.3:  # attach or detach a channel somewhere
                fe = rng.choice(live)
                chan = f"ch{rng.randint(0, 4)}"
                if chan in attached[(fe, name)]:
                    attached[(fe, name)].discard(chan)
                    meters[fe].channel_detached(app_id, chan)
                else:
                    attached[(fe, name)].add(chan)
                    meters[fe].channel_attached(app_id, chan)
            for _ in range(rng.randint(0, 3)):
                fe, size = rng.choice(live), rng.randint(1, 500)
                meters[fe].message_published(app_id, "ch0", size)
                meters[fe].message_delivered(app_id, "ch0", size, count=2)
                p = books.pending[name]
                p["pub_n"] += 1
                p["pub_b"] += size
                p["del_n"] += 2
                p["del_b"] += 2 * size
            if name == "a1" and t % 37 == 0:
                meters[rng.choice(live)].connection_refused(app_id)
                books.pending[name]["refused"] += 1
            # Channel attaches and messages refused (the frontend picked without the random
            # generator, which would change the rest of the scenario).
            if name == "b1" and t % 23 == 0:
                meters[live[t % len(live)]].channel_refused(app_id)
                books.pending[name]["ch_refused"] += 1
            if name == "a2" and t % 29 == 0:
                meters[live[t % len(live)]].message_refused(app_id, count=1 + t % 3)
                books.pending[name]["msg_refused"] += 1 + t % 3
        for fe in live:
            meters[fe].flush()
        if t in MISSED:
            continue
        assert tick(
            g, {"dc1": dc}, liveness_timeout=TIMEOUT, sample_retention=10_000, now=t
        ).committed
        # The truth at this counted second.
        per_account: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        for name in ids:
            conns = [c for c in open_conns if c[1] == name]
            active = set().union(*(attached[(fe, name)] for fe in alive))
            value = (len(conns), sum(1 for c in conns if c[2] == "websocket"), len(active))
            books.values[name][t] = value
            acc = per_account[owner[name]]
            for i in range(3):
                acc[i] += value[i]
            opened_now = len(active - prev_active[name])
            prev_active[name] = active
            if opened_now:
                books.counters[name][t]["ch_opened"] += opened_now
                books.counters[owner[name]][t]["ch_opened"] += opened_now
        for acct in ("A", "B"):
            books.values[acct][t] = tuple(per_account[acct])  # type: ignore[assignment]
        if (t - T0) % 7 == 3 or t == T0 + DURATION - 1:
            if (t - T0) % 21 == 3:
                # A fresh aggregator (a restarted worker) loads the held rows from Postgres.
                aggregator = Aggregator(
                    get_engine(), g, {"dc1": dc}, held_within=held_within,
                    settle_within=settle_within,
                )  # fmt: skip
            assert aggregator.run().committed
            held_seen = max(held_seen, len(_held_rows()))
            book = aggregator._loaded.book
            deferred_seen = max(deferred_seen, int((book.deferred[:, : book.size, 0] >= 0).sum()))
            lag = book.lag[: book.size]
            lag_seen = max(lag_seen, int(((lag >= 0) & (lag != book.held[: book.size, 0])).sum()))
            if held_within == HELD_WITHIN:  # none held past its due second
                assert all(s + 60 + HELD_WITHIN > t for s in _held_rows()), t
            for name, counts in books.pending.items():
                for k, n in counts.items():
                    books.counters[name][t][k] += n
                    books.counters[owner[name]][t][k] += n
            books.pending.clear()
            _assert_a_fresh_aggregator_loads_the_same(aggregator, g, dc)
            if t - T0 in CHECKPOINTS:
                with TestClient(create_app()) as client:
                    _check_api(client, apps, books)

    client = TestClient(create_app())
    with client:
        _check_api(client, apps, books)

        # The account's peak is the peak of its per-second sums, below the sum of its apps' peaks.
        month = {
            e: _fetch(client, apps[k].key, s, Unit.MONTH)["2026-03"]["connections.all.peak"]
            for e, k, s in (("a1", "a1", "app"), ("a2", "a2", "app"), ("A", "a1", "account"))
        }
        assert month["A"] < month["a1"] + month["a2"]
        assert month["A"] == max(v[0] for t, v in books.values["A"].items() if t < T0 + 180)

    # The variant held rows as it says, and a held row is not in usage_rollups as well (the
    # reads would count its minute twice).
    assert held_seen > 0
    if held_within is not None:  # (else a row's minute before the last has left at its end)
        assert deferred_seen > 0  # the hour's, day's and month's end deferred some rows
    if held_within is None:
        assert _held_rows()
    narrower = _narrower_copies()
    if settle_within is None and held_within is not None:
        # Rows lagged by minute rows no longer held, and the API read them widened: their
        # copies in usage_rollups alone would have given other figures.
        assert lag_seen > 0
        assert narrower > 0
    elif settle_within is not None:  # all settled by now: the copies are whole
        assert not (aggregator._loaded.book.lag >= 0).any()
        assert narrower == 0
    with get_engine().connect() as conn:
        scopes, ids, values = entity_state.select(conn)
        at = values[:, entity_state.column("held")]
        held = [
            (scope, entity, start)
            for scope, entity, start in zip(scopes.tolist(), ids.tolist(), at.tolist(), strict=True)
            if start >= 0
        ]
        moved = set(
            conn.execute(
                text("SELECT scope, entity_id, period_start FROM usage_rollups WHERE unit = 1")
            ).all()
        )
    assert not {tuple(h) for h in held} & {tuple(m) for m in moved}, held


def _check_api(client: TestClient, apps: dict[str, Tenant], books: Books) -> None:
    """Every unit's figures of every entity, as the API gives them, against the books; and
    the month figures billing reads (``query.month_usage``) against the API's."""
    for scope, entity, key in (
        ("app", "a1", apps["a1"].key),
        ("app", "a2", apps["a2"].key),
        ("app", "b1", apps["b1"].key),
        ("account", "A", apps["a1"].key),
        ("account", "B", apps["b1"].key),
    ):
        for unit in Unit:
            got = _fetch(client, key, scope, unit)
            want = _expected(books, entity, unit)
            for interval, figures in want.items():
                assert interval in got, (scope, entity, unit, interval)
                entry = got[interval]
                for name, value in figures.items():
                    assert entry[name] == value, (scope, entity, unit, interval, name)
            for interval, entry in got.items():
                if interval not in want:  # a period whose only event was a fall to zero
                    assert entry["connections.all.peak"] == 0, (entity, unit, interval)
                    assert entry["messages.all.count"] == 0
    # What billing reads for a month (in bulk, per scope) is what the API gives for it.
    with get_engine().connect() as conn:
        for scope, code, entities in (
            ("app", APP, [(apps[n].app_id, apps[n].key) for n in ("a1", "a2", "b1")]),
            ("account", ACCOUNT, [(apps[n].account_id, apps[n].key) for n in ("a1", "b1")]),
        ):
            for entity_id, key in entities:
                for month, entry in _fetch(client, key, scope, Unit.MONTH).items():
                    start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC).timestamp()
                    usage = query.month_usage(conn, code, int(start))
                    [i] = usage.find(np.array([entity_id], dtype=np.int64)).tolist()
                    assert i >= 0, (scope, entity_id, month)
                    assert (
                        int(usage.peak[i]), int(usage.peak_at[i]) * 1000, int(usage.ch_peak[i]),
                        int(usage.messages[i]), int(usage.data[i]),
                    ) == (
                        entry["connections.all.peak"], entry["connections.all.peakAt"],
                        entry["channels.peak"], entry["messages.all.count"],
                        entry["messages.all.data"],
                    ), (scope, entity_id, month)  # fmt: skip


def _assert_a_fresh_aggregator_loads_the_same(
    live: Aggregator, g: GlobalStore, dc: DatacenterStore
) -> None:
    """What a restarted worker loads from Postgres is what the running one holds: every
    entity's state, latest row of every unit (the lazily written ones rebuilt from the state
    rows) and held row."""
    book = live._loaded.book
    fresh = Aggregator(get_engine(), g, {"dc1": dc})
    with get_engine().connect() as conn:
        cursor = fresh._lock(conn)
        assert cursor is not None
        loaded = fresh._load(conn, cursor).book
    order = book.find(loaded.codes[: loaded.size])
    assert loaded.size == book.size
    assert (loaded.state[: loaded.size] == book.state[order]).all()
    for u in range(len(loaded.rows)):
        live_rows, got = book.rows[u, order], loaded.rows[u, : loaded.size]
        exists = live_rows[:, 0] >= 0
        if u == 0:
            exists &= live_rows[:, R_PEAK] >= 0  # (a minute row with no counted second yet)
        assert (got[exists] == live_rows[exists]).all(), u
    held = book.held[order, 0] >= 0
    assert (loaded.held[: loaded.size, 0] >= 0).tolist() == held.tolist()
    assert (loaded.held[: loaded.size][held] == book.held[order][held]).all()
    assert (loaded.lag[: loaded.size] == book.lag[order]).all()
    # The closed rows that wait for their held row to leave or to be settled, rebuilt from
    # their copy and the minute row they lag by (held, or in usage_rollups).
    deferred = book.deferred[:, order, 0] >= 0
    assert ((loaded.deferred[:, : loaded.size, 0] >= 0) == deferred).all()
    assert (loaded.deferred[:, : loaded.size][deferred] == book.deferred[:, order][deferred]).all()
    stored = book.deferred_stored[:, order][deferred]
    assert (loaded.deferred_stored[:, : loaded.size][deferred] == stored).all()


def _narrower_copies() -> int:
    """How many closed hour, day and month rows in usage_rollups lack what the minute row
    their entity's state says they lag by (``fold.Book.lag``) holds: a higher peak, WebSocket
    or channel peak, or a lower min or channel min."""
    with get_engine().connect() as conn:
        scopes, ids, values = entity_state.select(conn)
        n = 0
        for scope, entity, lag in zip(
            scopes.tolist(),
            ids.tolist(),
            values[:, entity_state.column("lag")].tolist(),
            strict=True,
        ):
            if lag < 0:
                continue
            minute = conn.execute(
                text(
                    "SELECT peak, min, ws_peak, ch_peak, ch_min FROM usage_rollups WHERE "
                    "scope = :s AND entity_id = :e AND unit = 1 AND period_start = :p"
                ),
                {"s": scope, "e": entity, "p": lag},
            ).first()
            if minute is None:
                continue
            for unit in (Unit.HOUR, Unit.DAY, Unit.MONTH):
                copy = conn.execute(
                    text(
                        "SELECT peak, min, ws_peak, ch_peak, ch_min FROM usage_rollups WHERE "
                        "scope = :s AND entity_id = :e AND unit = :u AND period_start = :p"
                    ),
                    {"s": scope, "e": entity, "u": UNIT_CODES[unit],
                     "p": period_start(unit, lag)},
                ).first()  # fmt: skip
                if copy is not None and (
                    minute[0] > copy[0] or minute[1] < copy[1] or minute[2] > copy[2]
                    or minute[3] > copy[3] or minute[4] < copy[4]
                ):  # fmt: skip
                    n += 1
        return n


def _held_rows() -> list[int]:
    """The start of each closed minute row held in a state row."""
    with get_engine().connect() as conn:
        _, _, values = entity_state.select(conn)
    at = values[:, entity_state.column("held")]
    return at[at >= 0].tolist()


def _fetch(client: TestClient, key: str, scope: str, unit: Unit) -> dict[str, dict]:
    response = client.get(
        "/v1/stats",
        params={"unit": unit.value, "scope": scope, "limit": 1000, "direction": "forwards"},
        headers={"IM-API-KEY": key},
    )
    assert response.status_code == 200, response.text
    return {e["intervalId"]: e for e in response.json()["result"]}


def _expected(books: Books, entity: str, unit: Unit) -> dict[str, dict[str, object]]:
    by_period: dict[int, list[tuple[int, tuple[int, int, int]]]] = defaultdict(list)
    for t, value in sorted(books.values[entity].items()):
        by_period[period_start(unit, t)].append((t, value))
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t, c in books.counters[entity].items():
        for k, n in c.items():
            counts[period_start(unit, t)][k] += n
    out: dict[str, dict[str, object]] = {}
    for start, series in by_period.items():
        c = counts[start]
        if not any(v[0] or v[2] for _, v in series) and not any(c.values()):
            continue
        conns = [v[0] for _, v in series]
        peak = max(conns)
        out[interval_id(unit, datetime.fromtimestamp(start, UTC))] = {
            "seconds": len(series),
            "connections.all.peak": peak,
            "connections.all.peakAt": next(t for t, v in series if v[0] == peak) * 1000,
            "connections.all.min": min(conns),
            "connections.all.mean": round(sum(conns) / len(conns), 3),
            "connections.websocket.peak": max(v[1] for _, v in series),
            "channels.peak": max(v[2] for _, v in series),
            "channels.min": min(v[2] for _, v in series),
            "channels.mean": round(sum(v[2] for _, v in series) / len(series), 3),
            "connections.all.opened": c["opened"],
            "connections.all.refused": c["refused"],
            "channels.opened": c["ch_opened"],
            "channels.refused": c["ch_refused"],
            "messages.published.count": c["pub_n"],
            "messages.published.data": c["pub_b"],
            "messages.delivered.count": c["del_n"],
            "messages.delivered.data": c["del_b"],
            "messages.refused": c["msg_refused"],
        }
    return out
