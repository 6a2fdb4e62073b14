"""Redis key names and Lua scripts of live counting, in one place.

The layout is documented for gateways in other languages in ``docs/redis-keys.md``; keep the
two in step. A datacenter's keys share the hash tag ``{<prefix>:<dc>}`` and the global keys
``{<prefix>}``, so each group lives in one Redis Cluster slot and every script is atomic.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

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
COLLECT = _Script("collect")
READ = _Script("read")
COMMIT = _Script("commit")

# A read reaps at most this many dead frontends; the tick reaps the rest within a second.
MAX_REAP = 100


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
        counters: Iterable[tuple[str, int]],
    ) -> str:
        args: list[Any] = [incarnation, "1" if full else "0", _ms(timeout), epoch]
        for pairs in (conns, ((f, "1" if p else "0") for f, p in channels), counters):
            flat = [x for pair in pairs for x in pair]
            args.append(len(flat) // 2)
            args.extend(flat)
        return _s(FLUSH(self.client, [self.base], args))

    def deregister(self, incarnation: str) -> bool:
        return bool(DEREGISTER(self.client, [self.base], [incarnation]))

    def collect(
        self, *, cursor: int, trim_upto: int, timeout: float, epoch: str, full: bool = False
    ) -> Collected:
        raw = COLLECT(
            self.client,
            [self.base],
            [_ms(timeout), cursor, trim_upto, epoch, MAX_REAP, "1" if full else "0"],
        )
        conns: dict[str, tuple[int, int, int]] = {}
        channels: dict[str, bool] = {}
        for k in range(2, len(raw), 2):
            member, value = _s(raw[k]), _s(raw[k + 1])
            if member[0] == "a":
                w, s, lp = value.split()
                conns[member[2:]] = (int(w), int(s), int(lp))
            else:
                channels[member[2:]] = value == "1"
        return Collected(epoch=_s(raw[0]), seq=int(raw[1]), conns=conns, channels=channels)

    def current(
        self, apps: Sequence[str], channels: Sequence[str]
    ) -> tuple[list[tuple[int, int, int]], list[bool]]:
        """Current values of some apps and channels here (no reaping: the tick just did it)."""
        fields = [f"{app}|{code}" for app in apps for code in "wsl"]
        conn_vals: list[int] = []
        present: list[bool] = []
        for i in range(0, len(fields), 30_000):
            conn_vals += [int(v) if v else 0 for v in self.client.hmget(self.key("conns"), fields[i : i + 30_000])]
        for i in range(0, len(channels), 10_000):
            present += [bool(v) for v in self.client.hmget(self.key("channels"), list(channels[i : i + 10_000]))]
        triples = [
            (conn_vals[i], conn_vals[i + 1], conn_vals[i + 2]) for i in range(0, len(conn_vals), 3)
        ]
        return triples, present

    def incarnations(self) -> dict[str, int]:
        """Live incarnations and when each was last seen (ms, Redis clock)."""
        return {_s(m): int(s) for m, s in self.client.zrange(self.key("frontends"), 0, -1, withscores=True)}


class AsyncDatacenterReader:
    """The API's read of one datacenter's totals, at the moment of the call."""

    def __init__(self, client: AsyncRedis, prefix: str, datacenter: str) -> None:
        self.client = client
        self.base = f"{{{prefix}:{datacenter}}}"

    async def connections(self, app: str, *, timeout: float) -> tuple[int, int, int]:
        raw = await READ.acall(
            self.client, [self.base], [_ms(timeout), MAX_REAP, f"{app}|w", f"{app}|s", f"{app}|l"]
        )
        w, s, lp = (int(v) if v else 0 for v in raw)
        return w, s, lp


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

    @classmethod
    def parse(cls, packed: str | bytes | None) -> LiveValue:
        if not packed:
            return cls(0, 0, 0, 0)
        w, s, lp, c = (int(x) for x in _s(packed).split()[:4])
        return cls(w, s, lp, c)


class GlobalStore:
    """The primary Redis: global live values, the tick's state, the 1-second samples."""

    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.base = f"{{{prefix}}}"

    def key(self, suffix: str) -> str:
        return f"{self.base}:{suffix}"

    def tick_state(self) -> TickState:
        raw = {_s(k): _s(v) for k, v in self.client.hgetall(self.key("tick")).items()}
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
    ) -> tuple[bool, int, int, int]:
        args: list[Any] = [second, len(cursors)]
        for dc, epoch, cursor in cursors:
            args += [dc, epoch, cursor]
        args.append(len(conns))
        for app, (w, s, lp) in conns.items():
            args += [app, w, s, lp]
        args.append(len(channels))
        for field, present in channels.items():
            args += [field, 1 if present else 0]
        args.append(maxlen)
        raw = COMMIT(self.client, [self.base], args)
        if int(raw[0]) != 1:
            return False, 0, 0, 0
        return True, int(raw[1]), int(raw[2]), int(raw[3])

    def app_value(self, app: str) -> LiveValue:
        return LiveValue.parse(self.client.hget(self.key("live:apps"), app))

    def account_value(self, account: str) -> LiveValue:
        return LiveValue.parse(self.client.hget(self.key("live:accounts"), account))

    def samples(self, start: int = 0, count: int = 1000) -> list[tuple[int, dict[str, str]]]:
        """1-second samples from ``start`` (a second), oldest first."""
        entries = self.client.xrange(self.key("samples"), min=f"{start * 1000}", count=count)
        return [
            (int(_s(entry_id).split("-")[0]) // 1000, {_s(k): _s(v) for k, v in fields.items()})
            for entry_id, fields in entries
        ]
