"""Admission in the gateway process: may this account open a connection, attach a channel,
publish a message? Answered from memory in well under a microsecond, no I/O.

The engine keeps what gateways enforce per account in Redis (``metering.limits.store``): the
hard limits of the concurrent metrics, a publishing block for the rest of the month, and the
live counts at the last tick of the accounts within reach of a hard limit. A daemon thread
keeps a copy here, re-read at once on a pub/sub notice (a staff change, each tick) and every
``refresh_interval`` in any case.

Between two ticks the copy's live counts do not move, so a burst could run past the limit
for a whole second: each decision also adds what *this* gateway opened (less what it closed)
since the copy was read. An enforced account missing from the live counts is below half of
its hard limit, so up to half of it may be accepted here before the next tick says more.

If the copy cannot be refreshed for ``stale_after`` (Redis unreachable), the gateway lets
everything in (``fail_open``, the default) or refuses everything with ``UNAVAILABLE``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import redis

from metering.core.logging import get_logger
from metering.limits.repository import AdmissionRow
from metering.limits.store import LIVE_NOTICE, AdmissionStore

log = get_logger(__name__)

# Stable refusal codes (DESIGN.md): the HTTP status times 100, plus a detail.
CONNECTIONS_EXCEEDED: Final = 40111
MESSAGES_EXCEEDED: Final = 40112
CHANNELS_EXCEEDED: Final = 40114
UNAVAILABLE: Final = 50310


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    reason: str
    retry_after: int | None = None  # seconds, where the refusal has a known end


_CONNECTIONS = Refusal(CONNECTIONS_EXCEEDED, "account restricted (connection limits exceeded)")
_CHANNELS = Refusal(CHANNELS_EXCEEDED, "account restricted (channel limits exceeded)")
_UNAVAILABLE = Refusal(UNAVAILABLE, "admission unavailable: the limits could not be read")


def seconds_to_month_end(now: datetime) -> int:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    end = datetime(year, month, 1, tzinfo=UTC)
    return max(1, int((end - now).total_seconds()) + 1)


class Admission:
    """The gateway's copy of the admission state, and the decisions made from it.

    Call the ``admit_*`` methods from the gateway's event loop (one thread): each one that
    lets something in also counts it, until the next copy of the live counts.
    """

    def __init__(
        self,
        store: AdmissionStore,
        *,
        fail_open: bool = True,
        refresh_interval: float = 5.0,
        stale_after: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.fail_open = fail_open
        self.refresh_interval = refresh_interval
        self.stale_after = stale_after
        self.clock = clock
        # Replaced whole by the refresh thread, never mutated there.
        self._rows: dict[int, AdmissionRow] = {}
        self._live: dict[int, tuple[int, int]] = {}
        # Opened less closed here since ``_live`` was read: replaced (reset) with each new copy.
        self._connections: dict[int, int] = {}
        self._channels: dict[int, int] = {}
        self._fresh_at = clock()
        self._version: int | None = None
        self._month = datetime.now(UTC).strftime("%Y-%m")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- decisions: the hot path ------------------------------------------------------

    def admit_connection(self, account: int) -> Refusal | None:
        """None to accept a new connection of ``account`` (and count it), or why not."""
        row = self._rows.get(account)
        if row is not None and row.connections_hard is not None:
            hard = row.connections_hard
            live = self._live.get(account)
            # Not listed: the tick saw it below half of the limit.
            held = live[0] if live is not None else (hard - 1) // 2
            if held + self._connections.get(account, 0) >= hard:
                return self._unless_stale(_CONNECTIONS)
            self._connections[account] = self._connections.get(account, 0) + 1
        return self._stale_refusal()

    def admit_channel(self, account: int) -> Refusal | None:
        """None to let ``account`` activate one more channel (and count it), or why not."""
        row = self._rows.get(account)
        if row is not None and row.channels_hard is not None:
            hard = row.channels_hard
            live = self._live.get(account)
            held = live[1] if live is not None else (hard - 1) // 2
            if held + self._channels.get(account, 0) >= hard:
                return self._unless_stale(_CHANNELS)
            self._channels[account] = self._channels.get(account, 0) + 1
        return self._stale_refusal()

    def connection_closed(self, account: int) -> None:
        """A connection of ``account`` closed here: one fewer than the copy's count says
        (whether it opened before the copy or after, the copy does not know of its close)."""
        if account in self._rows:
            self._connections[account] = self._connections.get(account, 0) - 1

    def channel_released(self, account: int) -> None:
        """A channel of ``account`` has no connection attached here any more."""
        if account in self._rows:
            self._channels[account] = self._channels.get(account, 0) - 1

    def admit_message(self, account: int) -> Refusal | None:
        """None to let ``account`` publish, or why not (the month's messages or data)."""
        row = self._rows.get(account)
        if row is not None and row.publish_blocked_month == self._month:
            now = datetime.now(UTC)
            reason = f"account restricted (monthly {row.publish_blocked_by} limit exceeded)"
            refusal = Refusal(MESSAGES_EXCEEDED, reason, seconds_to_month_end(now))
            return self._unless_stale(refusal)
        return self._stale_refusal()

    def _stale(self) -> bool:
        return self.clock() - self._fresh_at > self.stale_after

    def _stale_refusal(self) -> Refusal | None:
        return _UNAVAILABLE if not self.fail_open and self._stale() else None

    def _unless_stale(self, refusal: Refusal) -> Refusal | None:
        # An old copy is no ground for refusing when the setting says to let traffic in.
        if self._stale():
            return None if self.fail_open else _UNAVAILABLE
        return refusal

    # -- keeping the copy ---------------------------------------------------------------

    def refresh(self, *, rows: bool = True) -> None:
        """Read the copy from Redis (``rows``: the limits too, not only the live counts; they
        are read whole only when their version moved)."""
        if rows:
            self._version, changed = self.store.read_if_changed(self._version)
            if changed is not None:
                self._rows = changed
        self._live = self.store.read_live()
        self._connections = {}
        self._channels = {}
        self._month = datetime.now(UTC).strftime("%Y-%m")
        self._fresh_at = self.clock()

    def start(self) -> None:
        try:
            self.refresh()
        except redis.RedisError as exc:
            log.warning("gateway.admission_unavailable", error=str(exc))
        self._thread = threading.Thread(target=self._run, name="gateway-admission", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except redis.RedisError as exc:
                log.warning("gateway.admission_refresh_failed", error=str(exc))
                self._stop.wait(min(1.0, self.refresh_interval))

    def _listen(self) -> None:
        client: Any = self.store.client
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.store.notices)
            self.refresh()  # anything missed while not subscribed
            deadline = self.clock() + self.refresh_interval
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=min(0.5, self.refresh_interval))
                if message is not None:
                    self.refresh(rows=_s(message["data"]) != LIVE_NOTICE)
                    if _s(message["data"]) != LIVE_NOTICE:
                        deadline = self.clock() + self.refresh_interval
                elif self.clock() >= deadline:
                    self.refresh()
                    deadline = self.clock() + self.refresh_interval
        finally:
            pubsub.close()


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
