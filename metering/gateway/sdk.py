"""The metering SDK a realtime frontend embeds.

Every event is an O(1) update of in-memory counts under one lock: no I/O on the hot path. A
background thread writes the frontend's *absolute* counts to its datacenter's Redis (only what
changed since the last flush, at most every ``flush_min_interval`` and at least every
``flush_interval`` as a heartbeat), so a lost or repeated write heals at the next flush and
Redis writes grow with frontends x apps, not with the event rate.

Counts belong to one *incarnation* (``<frontend id>#<random>``): a process restarted under the
same frontend id starts a new incarnation, which takes the id over and removes the old one's
counts at once, so nothing is inherited or counted twice.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Collection
from typing import Final

import redis

from metering.core.logging import get_logger
from metering.live.store import (
    FLUSH_OK,
    FLUSH_REPLACED,
    FLUSH_SUPERSEDED,
    FLUSH_UNKNOWN,
    TRANSPORT_CODES,
    DatacenterStore,
)

log = get_logger(__name__)

# Keyed by plain strings; a Transport member is a str and finds the same entry, but hashing
# it goes through Enum's Python-level __hash__, hence the '== "websocket"' fast path.
_SUFFIX: Final[dict[str, str]] = {str(t): "|" + c for t, c in TRANSPORT_CODES.items()}


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

        # The hot path only updates these; the flush diffs them against what it last wrote,
        # so an event costs a few dict operations and nothing more. The lock is held by the
        # flush's snapshot and, in ThreadSafeMeter, by every event.
        self._lock = threading.Lock()
        self._conns: dict[str, int] = {}  # '<app>|<t>' -> open connections
        self._opened: dict[str, int] = {}  # '<app>|<t>' -> connections opened (cumulative)
        self._channels: dict[str, int] = {}  # '<app>|<channel>' -> attached connections here
        self._messages: dict[str, list[int]] = {}  # app -> [pub_n, pub_b, del_n, del_b]
        self._refused: dict[str, int] = {}  # app -> connections refused (cumulative)
        self._ch_refused: dict[str, int] = {}  # app -> channel attaches refused (cumulative)
        self._msg_refused: dict[str, int] = {}  # app -> messages refused (cumulative)
        self._changed = False
        self._sent_conns: dict[str, int] = {}
        self._sent_channels: set[str] = set()
        self._sent_counters: dict[str, tuple[int, ...]] = {}

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False
        self._superseded = False
        self.flushes = 0

    # -- events: the hot path ------------------------------------------------------------
    # Call these from one thread (a gateway's event loop): they take no lock. The flush thread
    # only reads, through C-level copies (dict(), set()) that the GIL makes atomic. A gateway
    # that reports from several threads uses ThreadSafeMeter.

    def connection_opened(self, app: str, transport: str = "websocket") -> None:
        # '==' against the plain string first: hashing a StrEnum member runs Python code.
        field = app + ("|w" if transport == "websocket" else _SUFFIX[transport])
        conns, opened = self._conns, self._opened
        conns[field] = conns.get(field, 0) + 1
        opened[field] = opened.get(field, 0) + 1
        self._changed = True

    def connection_refused(self, app: str) -> None:
        """A connection the gateway refused (enforcement): counted as ``refused``."""
        self._refused[app] = self._refused.get(app, 0) + 1
        self._changed = True

    def channel_refused(self, app: str) -> None:
        """A channel attach the gateway refused (enforcement): counted as ``ch_refused``."""
        self._ch_refused[app] = self._ch_refused.get(app, 0) + 1
        self._changed = True

    def message_refused(self, app: str, count: int = 1) -> None:
        """``count`` messages the gateway refused to publish (enforcement): counted as
        ``msg_refused``."""
        self._msg_refused[app] = self._msg_refused.get(app, 0) + count
        # Like the message counters, it rides on the next heartbeat flush: a client retrying
        # a refused publish in a loop must not make the flush thread run at its highest rate.

    def connection_closed(self, app: str, transport: str = "websocket") -> None:
        field = app + ("|w" if transport == "websocket" else _SUFFIX[transport])
        n = self._conns.get(field, 0)
        if n > 1:
            self._conns[field] = n - 1
        elif n == 1:
            del self._conns[field]
        else:
            return  # a close without its open (a bug in the caller) must not go negative
        self._changed = True

    def channel_attached(self, app: str, channel: str) -> None:
        field = app + "|" + channel
        channels = self._channels
        channels[field] = channels.get(field, 0) + 1
        self._changed = True

    def channel_detached(self, app: str, channel: str) -> None:
        field = app + "|" + channel
        n = self._channels.get(field, 0)
        if n > 1:
            self._channels[field] = n - 1
        elif n == 1:
            del self._channels[field]
        else:
            return
        self._changed = True

    def message_published(self, app: str, channel: str, nbytes: int) -> None:
        m = self._messages.get(app)
        if m is None:
            m = self._messages[app] = [0, 0, 0, 0]
        m[0] += 1
        m[1] += nbytes
        # Counters ride on the next heartbeat flush: no hurry to wake it.

    def message_delivered(self, app: str, channel: str, nbytes: int, count: int = 1) -> None:
        """``count`` deliveries of one message of ``nbytes`` (a fan-out to ``count`` clients)."""
        m = self._messages.get(app)
        if m is None:
            m = self._messages[app] = [0, 0, 0, 0]
        m[2] += count
        m[3] += nbytes * count

    # -- what this frontend holds (an admission check's own share, read off the hot path) --

    def connections_of(self, apps: Collection[str]) -> int:
        """Connections open here of any of ``apps``."""
        conns = self._conns
        return sum(conns.get(f"{app}{suffix}", 0) for app in apps for suffix in _SUFFIX.values())

    def channels_of(self, apps: Collection[str]) -> list[str]:
        """The channels (``<app>|<channel>``) of any of ``apps`` active here."""
        wanted = set(apps)
        return [f for f in list(self._channels) if f.split("|", 1)[0] in wanted]

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
        # Flush soon after a change (at most every flush_min_interval), and at least every
        # flush_interval as the heartbeat. Polling a flag keeps the hot path free of any
        # wake-up call; at 50 Hz it costs the process nothing measurable.
        backoff = self.flush_min_interval
        last = time.monotonic()
        while not self._stop.wait(backoff):
            if not self._changed and time.monotonic() - last < self.flush_interval:
                continue
            try:
                self.flush()
                backoff = self.flush_min_interval
            except redis.RedisError as exc:
                log.warning("metering.flush_failed", frontend=self.frontend_id, error=str(exc))
                backoff = min(backoff * 2, self.flush_interval)
            last = time.monotonic()
            if self._superseded:
                return

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
                hint="another process took this frontend id; this one stops counting",
            )
            if self.on_superseded is not None:
                self.on_superseded()
            return status
        if status == FLUSH_REPLACED:
            log.info("metering.replaced_previous_incarnation", frontend=self.frontend_id)
        self._registered = True
        return status

    def _counters(self) -> dict[str, tuple[int, ...]]:
        """Cumulative counters per app, in ``FRONTEND_COUNTERS`` order: (opened, refused,
        pub_n, pub_b, del_n, del_b, ch_refused, msg_refused)."""
        opened: dict[str, int] = {}
        for field, n in dict(self._opened).items():
            app = field[:-2]  # '<app>|<t>'
            opened[app] = opened.get(app, 0) + n
        refused = dict(self._refused)
        ch_refused = dict(self._ch_refused)
        msg_refused = dict(self._msg_refused)
        # tuple() copies each app's list in one C call: the hot path updates it in place.
        messages = {app: tuple(totals) for app, totals in dict(self._messages).items()}
        no_messages = (0, 0, 0, 0)
        apps = set(opened).union(refused, messages, ch_refused, msg_refused)
        return {
            app: (
                opened.get(app, 0),
                refused.get(app, 0),
                *messages.get(app, no_messages),
                ch_refused.get(app, 0),
                msg_refused.get(app, 0),
            )
            for app in apps
        }

    def _flush(self, *, full: bool) -> str:
        with self._lock:
            self._changed = False
            conns_now = dict(self._conns)
            channels_now = set(self._channels)
            counters_now = self._counters()
        if full:
            conns = list(conns_now.items())
            channels = [(f, True) for f in channels_now]
            counters = list(counters_now.items())
        else:
            sent = self._sent_conns
            conns = [(f, n) for f, n in conns_now.items() if sent.get(f) != n]
            conns += [(f, 0) for f in sent if f not in conns_now]
            channels = [(f, True) for f in channels_now - self._sent_channels]
            channels += [(f, False) for f in self._sent_channels - channels_now]
            sent_ctr = self._sent_counters
            counters = [(a, t) for a, t in counters_now.items() if sent_ctr.get(a) != t]
        if not full and not conns and not channels and not counters and self._registered:
            status = self.store.flush(
                self.incarnation,
                full=False,
                timeout=self.liveness_timeout,
                epoch=secrets.token_hex(8),
                conns=(),
                channels=(),
                counters=(),
            )
        else:
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
        if status in (FLUSH_OK, FLUSH_REPLACED):
            # Only what Redis accepted counts as sent; anything else is sent again next time.
            self._sent_conns = conns_now
            self._sent_channels = channels_now
            self._sent_counters = counters_now
        self.flushes += 1
        return status


class ThreadSafeMeter(Meter):
    """A Meter whose events may come from several threads at once (each takes a lock)."""

    def connection_opened(self, app: str, transport: str = "websocket") -> None:
        with self._lock:
            super().connection_opened(app, transport)

    def connection_refused(self, app: str) -> None:
        with self._lock:
            super().connection_refused(app)

    def connection_closed(self, app: str, transport: str = "websocket") -> None:
        with self._lock:
            super().connection_closed(app, transport)

    def channel_refused(self, app: str) -> None:
        with self._lock:
            super().channel_refused(app)

    def message_refused(self, app: str, count: int = 1) -> None:
        with self._lock:
            super().message_refused(app, count)

    def channel_attached(self, app: str, channel: str) -> None:
        with self._lock:
            super().channel_attached(app, channel)

    def channel_detached(self, app: str, channel: str) -> None:
        with self._lock:
            super().channel_detached(app, channel)

    def message_published(self, app: str, channel: str, nbytes: int) -> None:
        with self._lock:
            super().message_published(app, channel, nbytes)

    def message_delivered(self, app: str, channel: str, nbytes: int, count: int = 1) -> None:
        with self._lock:
            super().message_delivered(app, channel, nbytes, count)
