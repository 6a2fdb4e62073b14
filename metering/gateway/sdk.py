"""The metering SDK a realtime frontend embeds.

Every event is an O(1) update of in-memory counts under one lock: no I/O on the hot path. A
background thread writes the frontend's *absolute* counts to its datacenter's Redis (only what
changed since the last flush, at most every ``flush_min_interval`` and at least every
``flush_interval`` as a heartbeat), so a lost or repeated write heals at the next flush and
Redis writes grow with frontends × apps, not with the event rate.

Counts belong to one *incarnation* (``<frontend id>#<random>``): a process restarted under the
same frontend id starts a new incarnation, which takes the id over and removes the old one's
counts at once, so nothing is inherited or counted twice.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Final

import redis

from metering.core.logging import get_logger
from metering.live.store import (
    FLUSH_REPLACED,
    FLUSH_SUPERSEDED,
    FLUSH_UNKNOWN,
    TRANSPORT_CODES,
    DatacenterStore,
    Transport,
)

log = get_logger(__name__)

_SUFFIX: Final = {t: "|" + c for t, c in TRANSPORT_CODES.items()}
_SUFFIX.update({str(t): s for t, s in list(_SUFFIX.items())})  # plain strings work too

# Cumulative counters per incarnation and app (absolute totals, like connections).
OPENED = "opened"
PUBLISHED_COUNT = "pub_n"
PUBLISHED_BYTES = "pub_b"
DELIVERED_COUNT = "del_n"
DELIVERED_BYTES = "del_b"


class Meter:
    """Counts one frontend's connections, channels and messages, and reports them."""

    def __init__(
        self,
        store: DatacenterStore,
        frontend_id: str,
        *,
        liveness_timeout: float = 3.0,
        flush_interval: float = 0.25,
        flush_min_interval: float = 0.02,
        on_superseded: Callable[[], None] | None = None,
    ) -> None:
        if not frontend_id or "#" in frontend_id or "|" in frontend_id:
            raise ValueError("frontend id must be non-empty, without '#' or '|'")
        self.store = store
        self.frontend_id = frontend_id
        self.incarnation = f"{frontend_id}#{int(time.time())}-{secrets.token_hex(4)}"
        self.liveness_timeout = liveness_timeout
        self.flush_interval = flush_interval
        self.flush_min_interval = flush_min_interval
        self.on_superseded = on_superseded

        self._lock = threading.Lock()
        self._conns: dict[str, int] = {}
        self._channels: dict[str, int] = {}  # '<app>|<channel>' -> attached connections here
        self._counters: dict[str, int] = {}
        self._dirty_conns: set[str] = set()
        self._dirty_channels: set[str] = set()
        self._dirty_counters: set[str] = set()

        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._superseded = False
        self.flushes = 0
        self.failures = 0
        self.last_flush_at = 0.0

    # -- events: the hot path ------------------------------------------------------------

    def connection_opened(self, app: str, transport: Transport | str = Transport.WEBSOCKET) -> None:
        field = app + _SUFFIX[transport]
        opened = app + "|" + OPENED
        with self._lock:
            self._conns[field] = self._conns.get(field, 0) + 1
            self._dirty_conns.add(field)
            self._counters[opened] = self._counters.get(opened, 0) + 1
            self._dirty_counters.add(opened)
        if not self._wake.is_set():
            self._wake.set()

    def connection_closed(self, app: str, transport: Transport | str = Transport.WEBSOCKET) -> None:
        field = app + _SUFFIX[transport]
        with self._lock:
            n = self._conns.get(field, 0)
            if n <= 0:
                return  # a close without its open (a bug in the caller) must not go negative
            self._conns[field] = n - 1
            self._dirty_conns.add(field)
        if not self._wake.is_set():
            self._wake.set()

    def channel_attached(self, app: str, channel: str) -> None:
        field = app + "|" + channel
        with self._lock:
            n = self._channels.get(field, 0)
            self._channels[field] = n + 1
            if n == 0:
                self._dirty_channels.add(field)
        if n == 0 and not self._wake.is_set():
            self._wake.set()

    def channel_detached(self, app: str, channel: str) -> None:
        field = app + "|" + channel
        with self._lock:
            n = self._channels.get(field, 0)
            if n <= 0:
                return
            if n == 1:
                del self._channels[field]
                self._dirty_channels.add(field)
            else:
                self._channels[field] = n - 1
        if n == 1 and not self._wake.is_set():
            self._wake.set()

    def message_published(self, app: str, channel: str, nbytes: int) -> None:
        self._count_message(app, PUBLISHED_COUNT, PUBLISHED_BYTES, 1, nbytes)

    def message_delivered(self, app: str, channel: str, nbytes: int, count: int = 1) -> None:
        """``count`` deliveries of one message of ``nbytes`` (a fan-out to ``count`` clients)."""
        self._count_message(app, DELIVERED_COUNT, DELIVERED_BYTES, count, nbytes * count)

    def _count_message(self, app: str, n_name: str, b_name: str, n: int, nbytes: int) -> None:
        kn, kb = app + "|" + n_name, app + "|" + b_name
        with self._lock:
            self._counters[kn] = self._counters.get(kn, 0) + n
            self._counters[kb] = self._counters.get(kb, 0) + nbytes
            self._dirty_counters.add(kn)
            self._dirty_counters.add(kb)
        # Counters ride on the next heartbeat flush: no wake-up needed.

    # -- reading what this frontend holds -------------------------------------------------

    def connections(self, app: str, transport: Transport | str = Transport.WEBSOCKET) -> int:
        return self._conns.get(app + _SUFFIX[transport], 0)

    def counter(self, app: str, name: str) -> int:
        return self._counters.get(app + "|" + name, 0)

    @property
    def superseded(self) -> bool:
        return self._superseded

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Register (a full flush) and start the background flush thread."""
        try:
            self.flush()
        except redis.RedisError as exc:
            # Counting goes on in memory; the thread registers once Redis answers.
            log.warning("metering.redis_unavailable", frontend=self.frontend_id, error=str(exc))
        self._thread = threading.Thread(
            target=self._run, name=f"metering-flush-{self.frontend_id}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Flush the final counters, then remove this incarnation's counts at once."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._superseded:
            return
        try:
            self.flush()
            self.store.deregister(self.incarnation)
        except redis.RedisError as exc:
            log.warning("metering.deregister_failed", frontend=self.frontend_id, error=str(exc))

    def _run(self) -> None:
        backoff = self.flush_min_interval
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                self.flush()
                backoff = self.flush_min_interval
            except redis.RedisError as exc:
                self.failures += 1
                log.warning("metering.flush_failed", frontend=self.frontend_id, error=str(exc))
                backoff = min(backoff * 2, self.flush_interval)
            if self._superseded:
                return
            # Coalesce bursts: at most one flush per flush_min_interval.
            self._stop.wait(backoff)

    def flush(self) -> str:
        """Write what changed (everything, if Redis does not know this incarnation)."""
        if self._superseded:
            return FLUSH_SUPERSEDED
        status = self._flush(full=not self._registered)
        if status == FLUSH_UNKNOWN:
            # Reaped after a pause, or Redis restarted empty: send the whole state again.
            log.warning("metering.resync", frontend=self.frontend_id, incarnation=self.incarnation)
            status = self._flush(full=True)
        if status == FLUSH_SUPERSEDED:
            self._superseded = True
            log.error(
                "metering.superseded",
                frontend=self.frontend_id,
                incarnation=self.incarnation,
                hint="another process registered under the same frontend id; this one stops counting",
            )
            if self.on_superseded is not None:
                self.on_superseded()
            return status
        if status == FLUSH_REPLACED:
            log.info("metering.replaced_previous_incarnation", frontend=self.frontend_id)
        self._registered = True
        return status

    def _flush(self, *, full: bool) -> str:
        with self._lock:
            if full:
                conn_fields: set[str] = {f for f, n in self._conns.items() if n > 0}
                chan_fields: set[str] = set(self._channels)
                ctr_fields: set[str] = set(self._counters)
            else:
                conn_fields, chan_fields, ctr_fields = (
                    self._dirty_conns,
                    self._dirty_channels,
                    self._dirty_counters,
                )
            conns = [(f, self._conns.get(f, 0)) for f in conn_fields]
            channels = [(f, f in self._channels) for f in chan_fields]
            counters = [(f, self._counters[f]) for f in ctr_fields]
            self._dirty_conns, self._dirty_channels, self._dirty_counters = set(), set(), set()
            # Closed-out fields can go: their zero has been captured above.
            for f, n in conns:
                if n == 0:
                    self._conns.pop(f, None)
        try:
            status = self.store.flush(
                self.incarnation,
                full=full,
                timeout=self.liveness_timeout,
                # A fresh candidate every time: a Redis that restarted empty must get an epoch
                # it never had, so the tick knows to resync it.
                epoch=secrets.token_hex(8),
                conns=conns,
                channels=channels,
                counters=counters,
            )
        except BaseException:
            # Not written: mark the fields dirty again; the values are absolute, so the next
            # flush sends whatever they are by then.
            with self._lock:
                self._dirty_conns.update(f for f, _ in conns)
                self._dirty_channels.update(f for f, _ in channels)
                self._dirty_counters.update(f for f, _ in counters)
            raise
        if status == FLUSH_UNKNOWN:
            with self._lock:
                self._dirty_conns.update(f for f, _ in conns)
                self._dirty_channels.update(f for f, _ in channels)
                self._dirty_counters.update(f for f, _ in counters)
        self.flushes += 1
        self.last_flush_at = time.monotonic()
        return status
