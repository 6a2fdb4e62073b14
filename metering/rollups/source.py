"""What the aggregator reads from Redis: the 1-second samples, a live snapshot, counters.

Key names come from ``metering.live.store`` (the one place that defines them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from metering.core.logging import get_logger
from metering.live.store import DatacenterStore, GlobalStore, _hmget_chunks, _joined, _s
from metering.rollups.fold import ACCOUNT, APP, Ints, codes
from metering.rollups.models import FRONTEND_COUNTERS

log = get_logger(__name__)

# A packed counters value holds the FRONTEND_COUNTERS totals; one written by an older gateway
# (or held by a Redis since before the upgrade) the first six of them: the others are 0.
WIDTH = len(FRONTEND_COUNTERS)
LEGACY_WIDTH = 6
_INT64_MAX = np.iinfo(np.int64).max


def _b(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _ints(raw: Any, sep: str = ",") -> Ints:
    """Decimal integers separated by ``sep`` (b"" or None: none), parsed by NumPy."""
    if not raw:
        return np.zeros(0, dtype=np.int64)
    return np.fromstring(_b(raw), dtype=np.int64, sep=sep)


@dataclass(frozen=True, slots=True)
class Values:
    """Values of entities (apps and accounts, as ``fold.codes``) at some second, column-wise."""

    code: Ints
    conns: Ints  # all realtime transports
    ws: Ints
    channels: Ints


@dataclass(frozen=True, slots=True)
class Columns:
    """One 1-second sample, column-wise (``docs/redis-keys.md``: ``{p}:samples``)."""

    second: int
    gap: int
    origin: bool  # the first second this Redis counted: it holds every value
    values: Values  # what changed in it
    opened_apps: Ints  # apps in which channels became active in it
    opened: Ints  # how many, per app


def _values(f: dict[bytes, Any], ids: bytes, columns: tuple[bytes, ...], scope: int) -> Values:
    code = codes(scope, _ints(f.get(ids)))
    if not code.size:
        empty = np.zeros(0, dtype=np.int64)
        return Values(code, empty, empty, empty)
    w, s, lp, c = (_ints(f[name]) for name in columns)
    return Values(code, w + s + lp, w, c)


def _concat(*parts: Values) -> Values:
    """The parts as one, in code order: the book adds entities in code order, so a sample in
    that order is folded walking its arrays forwards (at 100 000 apps, random access to them
    costs more than the sort)."""
    joined = [np.concatenate([getattr(p, name) for p in parts]) for name in Values.__slots__]
    order = np.argsort(joined[0])
    return Values(*(column[order] for column in joined))


def parse_sample(second: int, fields: dict[Any, Any]) -> Columns:
    f = {_b(k): v for k, v in fields.items()}
    apps = _values(f, b"apps", (b"w", b"s", b"l", b"c"), APP)
    accounts = _values(f, b"accounts", (b"aw", b"as", b"al", b"ac"), ACCOUNT)
    opened = _ints(f.get(b"opened")) if apps.code.size else np.zeros(0, dtype=np.int64)
    some = opened > 0
    return Columns(
        second=second,
        gap=int(f[b"gap"]),
        origin=b"origin" in f,
        values=_concat(apps, accounts),
        opened_apps=(apps.code // 4)[some] if opened.size else opened,
        opened=opened[some],
    )


def samples_after(store: GlobalStore, second: int | None, count: int) -> list[Columns]:
    """Up to ``count`` samples after ``second`` (all of them from the start if None)."""
    start = 0 if second is None else second + 1
    entries: list[tuple[Any, dict[Any, Any]]] = store.client.xrange(  # type: ignore[assignment]
        store.key("samples"), min=f"{start * 1000}", count=count
    )
    return [
        parse_sample(int(_s(entry_id).split("-")[0]) // 1000, fields)
        for entry_id, fields in entries
    ]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The global live values as of the tick ``second``, read in one MULTI."""

    second: int | None
    values: Values  # every app and account with a value (absent: all zero)


def _live(values: dict[Any, Any], scope: int) -> Values:
    if not values:
        empty = np.zeros(0, dtype=np.int64)
        return Values(empty, empty, empty, empty)
    ids = np.array([int(k) for k in values], dtype=np.int64)
    # Each value is '<websocket> <streaming> <long_poll> <channels>'.
    cols = _ints(b" ".join(_b(v) for v in values.values()), sep=" ").reshape(-1, 4)
    return Values(codes(scope, ids), cols[:, 0] + cols[:, 1] + cols[:, 2], cols[:, 0], cols[:, 3])


def live_snapshot(store: GlobalStore) -> Snapshot:
    pipe = store.client.pipeline(transaction=True)
    pipe.hget(store.key("tick"), "second")
    pipe.hgetall(store.key("live:apps"))
    pipe.hgetall(store.key("live:accounts"))
    second, apps, accounts = pipe.execute()
    return Snapshot(
        second=int(second) if second is not None else None,
        values=_concat(_live(apps, APP), _live(accounts, ACCOUNT)),
    )


def trim_samples(store: GlobalStore, upto: int) -> None:
    """Drop the samples up to ``upto`` (a second): they are folded into Postgres."""
    store.client.xtrim(store.key("samples"), minid=f"{upto * 1000 + 1}", approximate=False)


@dataclass(frozen=True, slots=True)
class CounterChanges:
    epoch: str | None
    seq: int
    incarnations: list[str]  # whose counters changed after the cursor
    retired: set[str]  # reaped incarnations whose counters are still here


def counter_changes(store: DatacenterStore, after: int) -> CounterChanges:
    """Incarnations whose counters moved after the sequence ``after``, in one MULTI."""
    pipe = store.client.pipeline(transaction=True)
    pipe.get(store.key("epoch"))
    pipe.get(store.key("seq"))
    pipe.zrangebyscore(store.key("counter-changes"), f"({after}", "+inf")
    pipe.zrange(store.key("retired"), 0, -1)
    epoch, seq, changed, retired = pipe.execute()
    return CounterChanges(
        epoch=_s(epoch) if epoch is not None else None,
        seq=int(seq) if seq is not None else 0,
        incarnations=[_s(i) for i in changed],
        retired={_s(i) for i in retired},
    )


def _decimal_ints(values: list[Any], width: int) -> npt.NDArray[np.int64] | None:
    """``values`` (bytes, each ``width`` decimals separated by spaces) as an (n, width) array,
    parsed by NumPy in one call; None if any of them is not that (the caller goes one by one)."""
    if not values:
        return np.zeros((0, width), dtype=np.int64)
    joined = b" ".join(values) if isinstance(values[0], bytes) else " ".join(values).encode()
    try:
        parsed = np.fromstring(joined, dtype=np.int64, sep=" ")
    except ValueError:  # something other than decimals and spaces
        return None
    if parsed.size != len(values) * width:
        return None
    return parsed.reshape(len(values), width)


def _packed_totals(values: list[Any]) -> npt.NDArray[np.int64] | None:
    """``values`` (packed counters) as an (n, WIDTH) array, parsed by NumPy in one call: each
    of WIDTH totals, or each of LEGACY_WIDTH (then padded with zeros); None if not all of them
    are that (the caller goes one by one: malformed values, or a mix of both widths, which the
    one gateway process that writes an incarnation's hash never makes).

    A -1 goes after each value, where no total can be (totals are never negative): only if
    every -1 is found where a value of that width puts it, and nothing else is negative, did
    each value hold exactly that many numbers. (Without it, a value short of a number and one
    with a number too many would pass together.)
    """
    n = len(values)
    if not n:
        return np.zeros((0, WIDTH), dtype=np.int64)
    if isinstance(values[0], bytes):
        joined = b" -1 ".join(values) + b" -1"
    else:
        joined = (" -1 ".join(values) + " -1").encode()
    try:
        parsed = np.fromstring(joined, dtype=np.int64, sep=" ")
    except ValueError:  # something other than numbers and spaces
        return None
    width = WIDTH if parsed.size == n * (WIDTH + 1) else LEGACY_WIDTH
    if parsed.size != n * (width + 1):
        return None
    table = parsed.reshape(n, width + 1)
    # Exactly the n -1s, each where it belongs; and no number past int64, which NumPy takes
    # as the largest int64 (the slow path decides).
    placed = (table[:, width] == -1).all() and np.count_nonzero(parsed < 0) == n
    if not placed or parsed.max() == _INT64_MAX:
        return None
    if width == WIDTH:
        return table[:, :width]
    out = np.zeros((n, WIDTH), dtype=np.int64)
    out[:, :width] = table[:, :width]
    return out


def _one_by_one(
    inc: str, apps: list[Any], values: list[Any]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The slow path of ``changed_counters``: skip (and log) the values that are malformed."""
    ids: list[int] = []
    rows: list[list[int]] = []
    for app, value in zip(apps, values, strict=True):
        try:
            app_id, totals = int(app), [int(x) for x in value.split()]
        except ValueError:
            totals = []
        if len(totals) == LEGACY_WIDTH:
            totals += [0] * (WIDTH - LEGACY_WIDTH)
        if len(totals) != WIDTH or max(map(abs, totals)) >= 2**63:  # beyond int64 too
            log.warning(
                "metering.malformed_counters", incarnation=inc, app=_s(app), value=_s(value)
            )
            continue
        ids.append(app_id)
        rows.append(totals)
    return (
        np.array(ids, dtype=np.int64),
        np.array(rows, dtype=np.int64).reshape(len(rows), WIDTH),
    )


def changed_counters(
    store: DatacenterStore, incarnations: list[str], after: int
) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Per incarnation, the apps whose counters it flushed after the sequence ``after`` (0:
    every app it ever flushed) with their cumulative totals: app ids, shape (n,), and totals,
    shape (n, 8) in ``FRONTEND_COUNTERS`` order (apps that did not change may come too, when
    most of an incarnation's did): ``request_counters`` and ``PendingCounters.result`` at
    once. A six-field value (an older gateway's) has 0 for the totals it does not hold; a
    value that is neither is skipped and logged."""
    with request_counters(store, incarnations, after) as pending:
        return pending.result()


def request_counters(
    store: DatacenterStore, incarnations: list[str], after: int
) -> PendingCounters:
    """Ask for what ``changed_counters`` returns, and return before the replies come: Redis
    prepares them (at 100 000 busy apps, tens of MB of hash fields) while the caller does
    something else, and ``PendingCounters.result`` reads them. A round trip first, for how
    much of each incarnation's hash moved; then the hashes (or the apps that moved) are asked
    for; and when only part of one moved, their totals in a last round trip. Redis holds the
    replies in its output buffer meanwhile (a ``client-output-buffer-limit`` for normal
    clients below that size would cut the connection; Redis sets none by default).

    A value flushed after the returned change (its sequence is later than the caller's
    cursor) is fine to apply: totals are absolute, and the next read sees the same or more.
    An app whose hash field is gone (the incarnation was forgotten meanwhile) is left out.
    """
    changes = [store.key(f"fe:{inc}:counter-apps") for inc in incarnations]
    hashes = [store.key(f"fe:{inc}:counters") for inc in incarnations]
    whole: list[bool] = []
    if incarnations:
        pipe = store.client.pipeline(transaction=False)
        for changed, counters in zip(changes, hashes, strict=True):
            pipe.zcount(changed, f"({after}", "+inf")
            pipe.hlen(counters)
        sizes = iter(pipe.execute())
        # Most of the hash moved: read all of it, which spares sending every field's name
        # twice, in the list of what changed and in the HMGET (the unchanged ones come back
        # with totals their marks already hold: nothing applied).
        whole = [2 * next(sizes) >= next(sizes) for _ in incarnations]
    commands = [
        ("HGETALL", counters) if everything else ("ZRANGEBYSCORE", changed, f"({after}", "+inf")
        for changed, counters, everything in zip(changes, hashes, whole, strict=True)
    ]
    return PendingCounters(store, incarnations, hashes, whole, _Sent(store.client, commands))


class _Sent:
    """Commands sent on a connection of the client's own, whose replies are read later (in
    order, raw: no response callbacks). Closed unread (the caller failed meanwhile), the
    connection is dropped rather than handed back with replies still due on it."""

    def __init__(self, client: Any, commands: Sequence[tuple[str, ...]]) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._due = len(commands)
        if commands:
            self._conn = self._pool.get_connection()
            try:
                self._conn.send_packed_command(self._conn.pack_commands(commands))
            except BaseException:
                self.close()
                raise

    def replies(self) -> list[Any]:
        """Each command's reply, in order (an error reply raises, and the rest stay due)."""
        out = []
        while self._due:
            out.append(self._conn.read_response())
            self._due -= 1
        return out

    def close(self) -> None:
        if self._conn is None:
            return
        if self._due:
            self._conn.disconnect()
        self._pool.release(self._conn)
        self._conn = None


class PendingCounters:
    """What ``request_counters`` asked for: ``result()`` reads it (``changed_counters``).
    A context manager: left unread, its connection is dropped (``close``)."""

    def __init__(
        self,
        store: DatacenterStore,
        incarnations: list[str],
        hashes: list[str],
        whole: list[bool],
        sent: _Sent,
    ) -> None:
        self._store = store
        self._incarnations = incarnations
        self._hashes = hashes
        self._whole = whole
        self._sent = sent

    def __enter__(self) -> PendingCounters:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sent.close()

    def result(self) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
        try:
            read = self._sent.replies()
        finally:
            self._sent.close()
        replies: Iterator[list[Any]] = iter(())
        if not all(self._whole):  # then the totals of the apps that changed
            pipe = self._store.client.pipeline(transaction=False)
            for counters, everything, apps in zip(self._hashes, self._whole, read, strict=True):
                if not everything:
                    _hmget_chunks(pipe, counters, apps)
            replies = iter(pipe.execute())
        out = {}
        for inc, everything, got in zip(self._incarnations, self._whole, read, strict=True):
            if everything:
                out[inc] = _parse_counters(inc, *_fields_and_values(got))
            else:
                out[inc] = _parse_counters(inc, got, _joined(replies, got))
        return out


def _fields_and_values(reply: Any) -> tuple[list[Any], list[Any]]:
    """A raw HGETALL reply: a map (RESP3) or a flat list of fields and values (RESP2)."""
    if isinstance(reply, dict):
        return list(reply), list(reply.values())
    return list(reply[0::2]), list(reply[1::2])


def _parse_counters(
    inc: str, apps: list[Any], values: list[Any]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    if None in values:  # fields gone: skipped
        kept = [k for k, v in enumerate(values) if v is not None]
        apps, values = [apps[k] for k in kept], [values[k] for k in kept]
    ids, totals = _decimal_ints(apps, 1), _packed_totals(values)
    if ids is None or totals is None:
        return _one_by_one(inc, apps, values)
    return ids.reshape(-1), totals


def forget_incarnations(store: DatacenterStore, incarnations: list[str]) -> None:
    """Delete reaped incarnations' counters once their final totals are in Postgres."""
    if not incarnations:
        return
    pipe: Any = store.client.pipeline(transaction=True)
    for inc in incarnations:
        pipe.delete(store.key(f"fe:{inc}:counters"), store.key(f"fe:{inc}:counter-apps"))
    pipe.zrem(store.key("retired"), *incarnations)
    pipe.zrem(store.key("counter-changes"), *incarnations)
    pipe.execute()
