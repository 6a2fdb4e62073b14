"""Redis key names and Lua scripts of live counting, in one place.

The layout is documented for gateways in other languages in ``docs/redis-keys.md``; keep the
two in step. A datacenter's keys share the hash tag ``{<prefix>:<dc>}`` and the global keys
``{<prefix>}``, so each group lives in one Redis Cluster slot and every script is atomic.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import islice
from pathlib import Path
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from metering.core.redis import AsyncRedis, Redis

_LUA = Path(__file__).with_name("lua")


class Transport(StrEnum):
    """Realtime transports: each open one is a connection. REST requests never are."""

    WEBSOCKET = "websocket"
    STREAMING = "streaming"  # HTTP streaming: server-sent events, XHR streaming
    LONG_POLL = "long_poll"  # HTTP long polling: XHR, JSONP


# One letter per transport in Redis fields, in the order every packed value uses.
TRANSPORT_CODES: dict[Transport, str] = {
    Transport.WEBSOCKET: "w",
    Transport.STREAMING: "s",
    Transport.LONG_POLL: "l",
}

# The figures of a live value, in order: websocket, streaming, long_poll, channels.
FIGURES = ("w", "s", "l", "c")

# The cumulative counters a frontend reports per app (``FRONTEND_COUNTERS`` of the rollups).
COUNTERS_PER_APP = 8

FLUSH_OK = "ok"
FLUSH_REPLACED = "replaced"
FLUSH_UNKNOWN = "unknown"
FLUSH_SUPERSEDED = "superseded"


class _Script:
    """One ``.lua`` file (after ``_common.lua``), registered once per client, called by SHA."""

    def __init__(self, name: str, *, common: bool = True) -> None:
        prelude = (_LUA / "_common.lua").read_text() if common else ""
        self.source = prelude + (_LUA / f"{name}.lua").read_text()
        self._registered: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def _for(self, client: Any) -> Any:
        script = self._registered.get(client)
        if script is None:
            script = self._registered[client] = client.register_script(self.source)
        return script

    def __call__(self, client: Redis, keys: list[str], args: Sequence[Any]) -> Any:
        return self._for(client)(keys=keys, args=list(args))

    async def acall(self, client: AsyncRedis, keys: list[str], args: Sequence[Any]) -> Any:
        return await self._for(client)(keys=keys, args=list(args))


FLUSH = _Script("flush")
DEREGISTER = _Script("deregister")
PREPARE = _Script("prepare")
READ = _Script("read")
EVIDENCE = _Script("evidence")

# A read reaps at most this many dead frontends; the tick reaps the rest within a second.
MAX_REAP = 100
_CHUNK = 10_000
# App -> account, per registry key, for the life of the process (see GlobalStore._owners).
_OWNERS: dict[str, dict[str, str]] = {}
_OWNER_CACHE_MAX = 2_000_000


def _hmget_chunks(pipe: Any, key: str, fields: Sequence[str]) -> None:
    """Queue HMGETs of ``fields`` in chunks (one command for a million fields is too big)."""
    for start in range(0, len(fields), _CHUNK):
        pipe.hmget(key, list(fields[start : start + _CHUNK]))


def _joined(replies: Iterator[list[Any]], fields: Sequence[str]) -> list[Any]:
    """The replies of the HMGETs ``_hmget_chunks`` queued for ``fields``, as one list."""
    out: list[Any] = []
    for _ in range(0, len(fields), _CHUNK):
        out.extend(next(replies))
    return out


def _unpack(packed: Any) -> tuple[int, int, int, int]:
    """A live value as stored: '<websocket> <streaming> <long_poll> <channels>'."""
    if packed is None:
        return (0, 0, 0, 0)
    w, s, lp, c = packed.split()
    return int(w), int(s), int(lp), int(c)


def _ints(values: list[Any]) -> list[int]:
    return [int(v) if v is not None else 0 for v in values]


def _column(values: Sequence[tuple[int, ...]], i: int) -> str:
    return ",".join([str(v[i]) for v in values])


_Value = tuple[int, int, int, int]
_Change = tuple[str, _Value, _Value]  # app, before, after


@dataclass(slots=True)
class _ChannelMoves:
    delta: dict[str, int] = field(default_factory=dict)  # app -> change of its channel count
    opened: dict[str, int] = field(default_factory=dict)  # app -> channels that became active
    activated: list[str] = field(default_factory=list)
    idled: list[str] = field(default_factory=list)


def pack_counters(totals: Sequence[int]) -> str:
    """An app's counters as stored: '<opened> <refused> <pub_n> <pub_b> <del_n> <del_b>
    <ch_refused> <msg_refused>'."""
    if len(totals) != COUNTERS_PER_APP:
        raise ValueError(f"expected {COUNTERS_PER_APP} counter totals, got {len(totals)}")
    return " ".join(map(str, totals))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Collected:
    """What one datacenter reported to the tick."""

    epoch: str
    seq: int
    conns: dict[str, tuple[int, int, int]]  # app -> (websocket, streaming, long_poll)
    channels: dict[str, bool]  # '<app>|<channel>' -> active here


@dataclass(frozen=True, slots=True)
class Frontends:
    """One datacenter's frontends as a gateway weighing a refusal sees them (``evidence.lua``)."""

    now: int  # ms, this Redis's clock
    last_reap: int  # ms: when an incarnation was last reaped here (0: never)
    seen: dict[str, int]  # every other live incarnation -> last seen (ms)
    connections: dict[str, int]  # each of them -> its connections of the fields asked
    held: list[bool]  # per channel asked: held by another incarnation


class DatacenterStore:
    """The keys of one datacenter's Redis: frontends, their counts, the change log."""

    def __init__(self, client: Redis, prefix: str, datacenter: str) -> None:
        self.client = client
        self.datacenter = datacenter
        self.base = f"{{{prefix}:{datacenter}}}"

    def key(self, suffix: str) -> str:
        return f"{self.base}:{suffix}"

    def flush(
        self,
        incarnation: str,
        *,
        full: bool,
        timeout: float,
        epoch: str,
        conns: Iterable[tuple[str, int]],
        channels: Iterable[tuple[str, bool]],
        counters: Iterable[tuple[str, Sequence[int]]],
    ) -> str:
        """Run ``flush.lua``: connection fields and counts, channel presence, and per app the
        eight cumulative counters of this incarnation (``FRONTEND_COUNTERS`` order), absolute."""
        args: list[Any] = [incarnation, "1" if full else "0", _ms(timeout), epoch]
        for pairs in (
            conns,
            ((f, "1" if p else "0") for f, p in channels),
            ((app, pack_counters(totals)) for app, totals in counters),
        ):
            flat = [x for pair in pairs for x in pair]
            args.append(len(flat) // 2)
            args.extend(flat)
        return _s(FLUSH(self.client, [self.base], args))

    def deregister(self, incarnation: str) -> bool:
        return bool(DEREGISTER(self.client, [self.base], [incarnation]))

    def collect(
        self, *, cursor: int, trim_upto: int, timeout: float, epoch: str, full: bool = False
    ) -> Collected:
        """What changed after ``cursor`` (everything, with ``full``), with its value here.

        The ids and the values are each read in one MULTI, a consistent snapshot. A value
        newer than the returned sequence is fine: counts are absolute, and that change is
        logged after the sequence, so the next tick reads it again.
        """
        raw_epoch, raw_seq = PREPARE(
            self.client, [self.base], [_ms(timeout), trim_upto, epoch, MAX_REAP]
        )
        seq = int(raw_seq)
        pipe = self.client.pipeline(transaction=True)
        if full:
            for code in "wsl":
                pipe.hkeys(self.key(f"conns:{code}"))
            pipe.hkeys(self.key("channels"))
            *per_transport, chan_ids = pipe.execute()
            app_ids = list(dict.fromkeys(a for ids in per_transport for a in ids))
        else:
            pipe.zrangebyscore(self.key("changes:apps"), f"({cursor}", seq)
            pipe.zrangebyscore(self.key("changes:channels"), f"({cursor}", seq)
            app_ids, chan_ids = pipe.execute()
        apps = [_s(a) for a in app_ids]
        channels = [_s(c) for c in chan_ids]
        values, present = self.current(apps, channels)
        return Collected(
            epoch=_s(raw_epoch),
            seq=seq,
            conns=dict(zip(apps, values, strict=True)),
            channels=dict(zip(channels, present, strict=True)),
        )

    def current(
        self, apps: Sequence[str], channels: Sequence[str]
    ) -> tuple[list[tuple[int, int, int]], list[bool]]:
        """Current values of some apps and channels here, in one MULTI (a consistent snapshot)."""
        pipe = self.client.pipeline(transaction=True)
        for code in "wsl":
            _hmget_chunks(pipe, self.key(f"conns:{code}"), apps)
        _hmget_chunks(pipe, self.key("channels"), channels)
        replies = iter(pipe.execute())
        columns = [_ints(_joined(replies, apps)) for _ in range(3)]
        present = [v is not None for v in _joined(replies, channels)]
        return list(zip(*columns, strict=True)), present

    def frontends(
        self, incarnation: str, conn_fields: Sequence[str], channel_fields: Sequence[str]
    ) -> Frontends:
        """Every other incarnation with its last heartbeat and its connections of
        ``conn_fields`` (``<app>|<t>``), and which of ``channel_fields`` another one holds."""
        args: list[Any] = [incarnation, len(conn_fields), *conn_fields]
        args += [len(channel_fields), *channel_fields]
        raw = EVIDENCE(self.client, [self.base], args)
        m = len(channel_fields)
        held = [bool(int(v)) for v in raw[2 : 2 + m]]
        rest = raw[2 + m :]
        seen: dict[str, int] = {}
        connections: dict[str, int] = {}
        for i in range(0, len(rest), 3):
            inc = _s(rest[i])
            seen[inc] = int(float(_s(rest[i + 1])))
            connections[inc] = int(rest[i + 2])
        return Frontends(int(raw[0]), int(raw[1]), seen, connections, held)

    def channels_of(
        self, incarnation: str, apps: Collection[str], besides: Collection[str] = ()
    ) -> int:
        """How many channels of ``apps`` an incarnation holds, not counting those in
        ``besides``: a scan of its whole hash, in steps that never block Redis for long
        (only asked of a frontend gone silent)."""
        total = 0
        for raw, _ in self.client.hscan_iter(self.key(f"fe:{incarnation}:channels"), count=1000):
            name = _s(raw)
            if name.split("|", 1)[0] in apps and name not in besides:
                total += 1
        return total

    def incarnations(self) -> dict[str, int]:
        """Live incarnations and when each was last seen (ms, Redis clock)."""
        members: list[tuple[bytes, float]] = self.client.zrange(  # type: ignore[assignment]
            self.key("frontends"), 0, -1, withscores=True
        )
        return {_s(m): int(s) for m, s in members}


class AsyncDatacenterReader:
    """The API's read of one datacenter's totals, at the moment of the call."""

    def __init__(self, client: AsyncRedis, prefix: str, datacenter: str) -> None:
        self.client = client
        self.base = f"{{{prefix}:{datacenter}}}"

    async def connections(self, app: str, transport: Transport, *, liveness_timeout: float) -> int:
        args = [_ms(liveness_timeout), MAX_REAP, TRANSPORT_CODES[transport], app]
        raw = await READ.acall(self.client, [self.base], args)
        return int(raw[0]) if raw[0] else 0


@dataclass(frozen=True, slots=True)
class TickState:
    second: int | None
    epochs: dict[str, str]
    cursors: dict[str, int]


@dataclass(frozen=True, slots=True)
class LiveValue:
    websocket: int
    streaming: int
    long_poll: int
    channels: int

    @property
    def connections(self) -> int:
        return self.websocket + self.streaming + self.long_poll


class GlobalStore:
    """The primary Redis: global live values, the tick's state, the 1-second samples."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.base = f"{{{prefix}}}"

    def key(self, suffix: str) -> str:
        return f"{self.base}:{suffix}"

    def tick_state(self) -> TickState:
        return self._tick_state(self.client.hgetall(self.key("tick")))

    @staticmethod
    def _tick_state(fields: dict[Any, Any]) -> TickState:
        raw = {_s(k): _s(v) for k, v in fields.items()}
        second = int(raw["second"]) if "second" in raw else None
        epochs = {k[6:]: v for k, v in raw.items() if k.startswith("epoch:")}
        cursors = {k[7:]: int(v) for k, v in raw.items() if k.startswith("cursor:")}
        return TickState(second=second, epochs=epochs, cursors=cursors)

    def known(self) -> tuple[list[str], list[str]]:
        """Every app and channel the global state counts now (for a datacenter resync)."""
        apps = [_s(a) for a in self.client.hkeys(self.key("live:apps"))]
        channels = [_s(c) for c in self.client.hkeys(self.key("live:channels"))]
        return apps, channels

    def commit(
        self,
        second: int,
        cursors: Sequence[tuple[str, str, int]],
        conns: dict[str, tuple[int, int, int]],
        channels: dict[str, bool],
        *,
        maxlen: int,
    ) -> tuple[bool, int, int, list[tuple[str, tuple[int, int, int, int]]]]:
        """Store the new global values, the account sums and the sample, claiming ``second``.

        Optimistic and atomic: the tick hash is WATCHed while the old values are read, and
        every commit writes it, so of two ticks racing, the one that commits second fails
        whole (MULTI/EXEC) and counts nothing. Returns (committed, gap, apps changed, the
        accounts changed with their new values: websocket, streaming, long poll, channels).
        """
        tick_key = self.key("tick")
        with self.client.pipeline(transaction=True) as txn:
            txn.watch(tick_key)  # type: ignore[no-untyped-call]
            state = self._tick_state(txn.hgetall(tick_key))
            if state.second is not None and second <= state.second:
                return False, 0, 0, []
            for dc, epoch, cursor in cursors:
                if state.epochs.get(dc) == epoch and cursor < state.cursors.get(dc, 0):
                    return False, 0, 0, []  # read older than the last commit

            moves = self._channel_moves(channels)
            changed = self._app_changes(conns, moves)
            accounts = self._account_sums(changed)
            gap = 1 if state.second is None else second - state.second

            txn.multi()
            if moves.activated:
                txn.hset(self.key("live:channels"), mapping=dict.fromkeys(moves.activated, 1))
            if moves.idled:
                txn.hdel(self.key("live:channels"), *moves.idled)
            self._write(txn, "apps", [(a, after) for a, _, after in changed])
            self._write(txn, "accounts", accounts)
            app_ids = [a for a, _, _ in changed]
            txn.xadd(
                self.key("samples"),
                {
                    "gap": gap,
                    # The first second this Redis ever counted: nothing came before it.
                    **({"origin": 1} if state.second is None else {}),
                    "apps": ",".join(app_ids),
                    **{
                        code: _column([a for _, _, a in changed], i)
                        for i, code in enumerate(FIGURES)
                    },
                    "opened": ",".join([str(moves.opened.get(a, 0)) for a in app_ids]),
                    "accounts": ",".join([a for a, _ in accounts]),
                    **{
                        f"a{code}": _column([v for _, v in accounts], i)
                        for i, code in enumerate(FIGURES)
                    },
                },
                id=f"{second * 1000}-0",
                maxlen=maxlen,
                approximate=True,
            )
            mapping: dict[FieldT, EncodableT] = {"second": second}
            for dc, epoch, cursor in cursors:
                mapping[f"epoch:{dc}"] = epoch
                mapping[f"cursor:{dc}"] = cursor
            txn.hset(tick_key, mapping=mapping)
            try:
                txn.execute()
            except redis.WatchError:
                return False, 0, 0, []
        return True, gap, len(changed), accounts

    def _channel_moves(self, channels: dict[str, bool]) -> _ChannelMoves:
        """Channels becoming active or idle globally, and how that moves each app's count."""
        ids = list(channels)
        reads = self.client.pipeline(transaction=False)
        _hmget_chunks(reads, self.key("live:channels"), ids)
        was_active = [v is not None for v in _joined(iter(reads.execute()), ids)]
        moves = _ChannelMoves()
        for chan, active, was in zip(ids, channels.values(), was_active, strict=True):
            if active == was:
                continue
            app = chan.split("|", 1)[0]
            step = 1 if active else -1
            moves.delta[app] = moves.delta.get(app, 0) + step
            if active:
                moves.activated.append(chan)
                moves.opened[app] = moves.opened.get(app, 0) + 1
            else:
                moves.idled.append(chan)
        return moves

    def _app_changes(
        self, conns: dict[str, tuple[int, int, int]], moves: _ChannelMoves
    ) -> list[_Change]:
        """Each app whose global value moves: (app, before, after)."""
        apps = list(conns) + [a for a in moves.delta if a not in conns]
        changed: list[_Change] = []
        for app, before in zip(apps, self._load("apps", apps), strict=True):
            now = conns.get(app)
            channels_now = before[3] + moves.delta.get(app, 0)
            if now is None:
                after = (before[0], before[1], before[2], channels_now)
            else:
                after = (now[0], now[1], now[2], channels_now)
            if after != before or app in moves.opened:
                changed.append((app, before, after))
        return changed

    def _account_sums(self, changed: list[_Change]) -> list[tuple[str, _Value]]:
        """The new value of each account whose apps moved: its sum over its apps at this tick."""
        owners = self._owners([app for app, _, _ in changed])
        delta: dict[str, list[int]] = {}
        for (_app, b, a), owner in zip(changed, owners, strict=True):
            if owner is not None:
                d = delta.get(owner)
                if d is None:
                    d = delta[owner] = [0, 0, 0, 0]
                d[0] += a[0] - b[0]
                d[1] += a[1] - b[1]
                d[2] += a[2] - b[2]
                d[3] += a[3] - b[3]
        accounts = [a for a, d in delta.items() if any(d)]
        return [
            (acct, (o[0] + d[0], o[1] + d[1], o[2] + d[2], o[3] + d[3]))
            for acct, o, d in zip(
                accounts,
                self._load("accounts", accounts),
                (delta[a] for a in accounts),
                strict=True,
            )
        ]

    def _load(self, scope: str, ids: Sequence[str]) -> list[tuple[int, int, int, int]]:
        reads = self.client.pipeline(transaction=False)
        _hmget_chunks(reads, self.key(f"live:{scope}"), ids)
        return [_unpack(v) for v in _joined(iter(reads.execute()), ids)]

    def _owners(self, apps: Sequence[str]) -> list[str | None]:
        """Each app's account. An app never changes account, so owners are cached here;
        only apps not seen before are read from the registry."""
        cache = _OWNERS.setdefault(self.key("apps"), {})
        missing = [a for a in apps if a not in cache]
        if missing:
            reads = self.client.pipeline(transaction=False)
            _hmget_chunks(reads, self.key("apps"), missing)
            for app, owner in zip(missing, _joined(iter(reads.execute()), missing), strict=True):
                if owner is not None:  # unknown apps are asked again: they may be registered soon
                    cache[app] = _s(owner)
            if len(cache) > _OWNER_CACHE_MAX:
                cache.clear()
        return [cache.get(a) for a in apps]

    def _write(self, txn: Any, scope: str, rows: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        key = self.key(f"live:{scope}")
        keep = {ident: " ".join(map(str, values)) for ident, values in rows if any(values)}
        drop = [ident for ident, values in rows if not any(values)]
        for start in range(0, len(keep), _CHUNK):
            txn.hset(key, mapping=dict(islice(keep.items(), start, start + _CHUNK)))
        for start in range(0, len(drop), _CHUNK):
            txn.hdel(key, *drop[start : start + _CHUNK])

    def _value(self, scope: str, ident: str) -> LiveValue:
        return LiveValue(*_unpack(self.client.hget(self.key(f"live:{scope}"), ident)))

    def channels_at_tick(self, account: str, fields: Sequence[str]) -> tuple[int, int, list[bool]]:
        """As of the last tick, in one snapshot: its second (0: none yet), the account's
        active channels, and which of ``fields`` (``<app>|<channel>``) were active."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hget(self.key("tick"), "second")
        pipe.hget(self.key("live:accounts"), account)
        _hmget_chunks(pipe, self.key("live:channels"), fields)
        replies = iter(pipe.execute())
        second, value = next(replies), next(replies)
        active = [v is not None for v in _joined(replies, fields)]
        return int(second or 0), _unpack(value)[3], active

    def app_value(self, app: str) -> LiveValue:
        return self._value("apps", app)

    def account_value(self, account: str) -> LiveValue:
        return self._value("accounts", account)

    def samples(self, start: int = 0, count: int = 1000) -> list[tuple[int, Sample]]:
        """1-second samples from ``start`` (a second), oldest first."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.client.xrange(  # type: ignore[assignment]
            self.key("samples"), min=f"{start * 1000}", count=count
        )
        return [
            (int(_s(entry_id).split("-")[0]) // 1000, Sample.parse(fields))
            for entry_id, fields in entries
        ]


@dataclass(frozen=True, slots=True)
class Sample:
    """One counted second: the gap since the previous one, and what changed in it."""

    gap: int
    apps: dict[str, LiveValue]
    accounts: dict[str, LiveValue]
    channels_opened: dict[str, int]
    origin: bool = False  # the first second this Redis counted

    @classmethod
    def parse(cls, fields: dict[Any, Any]) -> Sample:
        f = {_s(k): _s(v) for k, v in fields.items()}

        def columns(ids: str, *names: str) -> list[tuple[str, list[int]]]:
            keys = f[ids].split(",") if f[ids] else []
            cols = [[int(x) for x in f[n].split(",")] if keys else [] for n in names]
            return [(k, [col[i] for col in cols]) for i, k in enumerate(keys)]

        apps = columns("apps", "w", "s", "l", "c", "opened")
        return cls(
            gap=int(f["gap"]),
            apps={k: LiveValue(*v[:4]) for k, v in apps},
            accounts={k: LiveValue(*v) for k, v in columns("accounts", "aw", "as", "al", "ac")},
            channels_opened={k: v[4] for k, v in apps if v[4]},
            origin="origin" in f,
        )
