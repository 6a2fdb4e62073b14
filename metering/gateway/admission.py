"""Admission in the gateway process: may this account open a connection, attach a channel,
publish a message? Refused only on evidence that the account is at or over its hard limit.

The engine keeps what gateways enforce per account in Redis (``metering.limits.store``): the
hard limits of the concurrent metrics, a publishing block for the rest of the month, and the
live counts at the last tick of the accounts within reach of a hard limit. A daemon thread
keeps a copy here, re-read at once on a pub/sub notice (a staff change, each tick) and every
``refresh_interval`` in any case.

The accept path is in process, with no I/O: the copy's count (the last tick's, or for an
account the tick did not list, the most it can be: just under half the limit) plus what this
gateway let in since, with room for one more. When that has no room it proves nothing either
(the tick's count may hold a frontend that has since died, its clients reconnecting here), so
the gateway *checks*, off the event loop:

- connections: every frontend's own counts of the account's apps, read fresh from each
  datacenter. Below the limit, the request is let in at once. At or over it, the frontends
  are read again one heartbeat later, and only those heard from in between are evidence:
  a frontend killed a moment ago (whose clients are reconnecting) counts for nothing.
- channels: a channel another frontend holds, or that was active at the last tick, is not
  a new one. Otherwise the evidence is the tick's count plus this gateway's channels new
  since, less what silent frontends held.

Concurrent checks of one account share one read; a refusal is never reused for a request
that arrived after it was read. A gateway that takes an account within half its room of the
limit, or refuses it, tells the others (``check`` notice), which then check that account
instead of trusting their copy until the next tick: that bounds how far several gateways can
overshoot together (``docs/limits.md``).

If the copy cannot be refreshed for ``stale_after`` (Redis unreachable), the gateway lets
everything in (``fail_open``, the default) or refuses everything with ``UNAVAILABLE``; a check
that cannot read Redis decides the same way.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import redis

from metering.core.logging import get_logger
from metering.limits.repository import AdmissionRow
from metering.limits.store import CHECK_NOTICE, LIVE_NOTICE, AdmissionStore
from metering.live.store import TRANSPORT_CODES, DatacenterStore, Frontends, GlobalStore

log = get_logger(__name__)

# Stable refusal codes (DESIGN.md): the HTTP status times 100, plus a detail.
CONNECTIONS_EXCEEDED: Final = 40111
MESSAGES_EXCEEDED: Final = 40112
CHANNELS_EXCEEDED: Final = 40114
UNAVAILABLE: Final = 50310

# How long past one heartbeat a live frontend may take to be heard again.
HEARD_MARGIN: Final = 0.1
# How long an account another gateway told of is checked here: two ticks.
FLAGGED_FOR: Final = 2.0
# Between two checks of one account: longer than a gateway takes to flush what it let in.
READ_SPACING: Final = 0.05


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int
    reason: str
    retry_after: int | None = None  # seconds, where the refusal has a known end


class Check:
    """The in-process copy can neither accept nor refuse: await the ``check_*`` method."""

    def __repr__(self) -> str:
        return "CHECK"


CHECK: Final = Check()
Decision = Refusal | Check | None

_CONNECTIONS = Refusal(CONNECTIONS_EXCEEDED, "account restricted (connection limits exceeded)")
_CHANNELS = Refusal(CHANNELS_EXCEEDED, "account restricted (channel limits exceeded)")
_UNAVAILABLE = Refusal(UNAVAILABLE, "admission unavailable: the limits could not be read")


def seconds_to_month_end(now: datetime) -> int:
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    end = datetime(year, month, 1, tzinfo=UTC)
    return max(1, int((end - now).total_seconds()) + 1)


def _none(_apps: Collection[str]) -> Any:
    return 0


def _no_channels(_apps: Collection[str]) -> list[str]:
    return []


@dataclass(slots=True)
class Evidence:
    """Where a check reads: every datacenter's frontends, the last tick, and this process.

    ``incarnation`` is this gateway's own (its counts are taken from memory, not Redis);
    empty for a process with no connections of its own (the API's admission endpoint).
    """

    datacenters: Sequence[DatacenterStore]
    live: GlobalStore
    apps_of: Callable[[int], Collection[str]]
    incarnation: str = ""
    connections_here: Callable[[Collection[str]], int] = _none
    channels_here: Callable[[Collection[str]], list[str]] = _no_channels


class _Tally:
    """One concurrent metric's counts per account on top of a copy of the live counts.

    A copy's count comes from a tick that read the frontends up to a second before the copy
    arrived: what this gateway opened in that time may be missing from it. So the opens of
    the previous copy's time are kept on top of the new copy (counted twice at worst: a
    check rather than a refusal), while closes count only from the copy on (a close counted
    twice could let the account past its limit).
    """

    __slots__ = ("base", "before", "delta", "opened")

    def __init__(self, before: dict[int, int] | None = None) -> None:
        self.base: dict[int, int] = {}  # a check's fresh count, instead of the copy's
        self.before: dict[int, int] = before or {}  # opened during the previous copy
        self.delta: dict[int, int] = {}  # opened less closed since this copy (or the check)
        self.opened: dict[int, int] = {}  # opened since this copy (or the check)

    def held(self, account: int, base: int) -> int:
        return base + self.before.get(account, 0) + self.delta.get(account, 0)

    def took(self, account: int) -> None:
        self.delta[account] = self.delta.get(account, 0) + 1
        self.opened[account] = self.opened.get(account, 0) + 1

    def left(self, account: int) -> None:
        self.delta[account] = self.delta.get(account, 0) - 1

    def settle(self, account: int, base: int) -> None:
        """Go on from a count just read: it holds everything opened and closed so far."""
        self.base[account] = base
        self.delta[account] = self.opened[account] = 0
        self.before.pop(account, None)

    def renewed(self) -> _Tally:
        return _Tally(self.opened)


@dataclass(frozen=True, slots=True)
class _Proof:
    base: int  # the account's count the decisions go on from
    proven: bool  # read twice: at or over the limit is evidence
    upto: int  # what the decisions made from it may take the account to


class Admission:
    """The gateway's copy of the admission state, and the decisions made from it.

    Call the ``admit_*`` and ``check_*`` methods from the gateway's event loop (one thread):
    each one that lets something in also counts it, until the next copy of the live counts.
    ``admit_connection`` and ``admit_channel`` may answer :data:`CHECK`: then await
    ``check_connection`` / ``check_channel`` for the answer.
    """

    def __init__(
        self,
        store: AdmissionStore,
        *,
        evidence: Evidence | None = None,
        fail_open: bool = True,
        refresh_interval: float = 5.0,
        stale_after: float = 15.0,
        heartbeat: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.evidence = evidence
        self.fail_open = fail_open
        self.refresh_interval = refresh_interval
        self.stale_after = stale_after
        self.heard_wait = heartbeat + HEARD_MARGIN
        self.clock = clock
        self.sender = secrets.token_hex(4)
        # Replaced whole by the refresh thread, never mutated there.
        self._rows: dict[int, AdmissionRow] = {}
        self._live: dict[int, tuple[int, int]] = {}
        # Renewed with each copy: what this gateway let in on top of it, per metric and
        # account, and the accounts it already told the other gateways about.
        self._connections = _Tally()
        self._channels = _Tally()
        self._flagged: dict[int, float] = {}  # account -> until when (clock)
        self._told: set[int] = set()
        self._pending: dict[int, asyncio.Future[_Proof]] = {}
        self._read_at: dict[int, float] = {}  # account -> its last check's first read
        self._fresh_at = clock()
        self._version: str | None = None
        self._month = datetime.now(UTC).strftime("%Y-%m")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._teller: threading.Thread | None = None
        self.checks = 0  # reads made by checks (for tests and the benchmark)

    # -- decisions: the hot path ------------------------------------------------------

    def admit_connection(self, account: int) -> Decision:
        """None to accept a new connection of ``account`` (and count it), :data:`CHECK`,
        or why not."""
        row = self._rows.get(account)
        if row is None or row.connections_hard is None:
            return self._stale_refusal()
        return self._admit(account, row.connections_hard, self._connections, 0)

    def admit_channel(self, account: int) -> Decision:
        """None to let ``account`` activate one more channel (and count it), :data:`CHECK`,
        or why not."""
        row = self._rows.get(account)
        if row is None or row.channels_hard is None:
            return self._stale_refusal()
        return self._admit(account, row.channels_hard, self._channels, 1)

    def _admit(self, account: int, hard: int, tally: _Tally, metric: int) -> Decision:
        if self._stale():
            return None if self.fail_open else _UNAVAILABLE
        if self._flagged and self._checking(account):
            return CHECK
        base = tally.base.get(account)
        if base is None:
            live = self._live.get(account)
            # Not listed: the tick saw it below half of the limit.
            base = live[metric] if live is not None else (hard - 1) // 2
        held = tally.held(account, base)
        if held >= hard:
            return CHECK
        tally.took(account)
        if hard - held - 1 <= (hard - base) // 2:
            self._tell(account, reached=held + 1 >= hard)
        return None

    def connection_closed(self, account: int) -> None:
        """A connection of ``account`` closed here: one fewer than the copy's count says
        (whether it opened before the copy or after, the copy does not know of its close)."""
        if account in self._rows:
            self._connections.left(account)

    def channel_released(self, account: int) -> None:
        """A channel of ``account`` has no connection attached here any more."""
        if account in self._rows:
            self._channels.left(account)

    def admit_message(self, account: int) -> Refusal | None:
        """None to let ``account`` publish, or why not (the month's messages or data)."""
        row = self._rows.get(account)
        if row is not None and row.publish_blocked_month == self._month:
            now = datetime.now(UTC)
            reason = f"account restricted (monthly {row.publish_blocked_by} limit exceeded)"
            refusal = Refusal(MESSAGES_EXCEEDED, reason, seconds_to_month_end(now))
            return self._unless_stale(refusal)
        return self._stale_refusal()

    def _checking(self, account: int) -> bool:
        until = self._flagged.get(account)
        if until is None:
            return False
        if self.clock() < until:
            return True
        self._flagged.pop(account, None)
        return False

    def _stale(self) -> bool:
        return self.clock() - self._fresh_at > self.stale_after

    def _stale_refusal(self) -> Refusal | None:
        return _UNAVAILABLE if not self.fail_open and self._stale() else None

    def _unless_stale(self, refusal: Refusal) -> Refusal | None:
        # An old copy is no ground for refusing when the setting says to let traffic in.
        if self._stale():
            return None if self.fail_open else _UNAVAILABLE
        return refusal

    def _unreadable(self, exc: Exception) -> Refusal | None:
        log.warning("gateway.admission_check_failed", error=str(exc))
        return None if self.fail_open else _UNAVAILABLE

    # -- checks: the refusal path -------------------------------------------------------

    async def check_connection(self, account: int) -> Refusal | None:
        """The answer :meth:`admit_connection` could not give from memory."""
        while True:
            row = self._rows.get(account)
            if row is None or row.connections_hard is None or self.evidence is None:
                return None
            hard = row.connections_hard
            apps = self.evidence.apps_of(account)
            if self.evidence.connections_here(apps) >= hard:
                self._tell(account)
                return _CONNECTIONS  # this gateway alone holds the limit: no read needed
            proof = self._pending.get(account)
            if proof is None:
                proof = asyncio.ensure_future(self._prove_connections(account, apps, hard))
                self._pending[account] = proof
                proof.add_done_callback(lambda _f: self._pending.pop(account, None))
            try:
                result = await asyncio.shield(proof)
            except (redis.RedisError, OSError) as exc:
                return self._unreadable(exc)
            tally = self._connections
            base = tally.base.get(account, result.base)
            held = tally.held(account, base)
            if held < result.upto:
                tally.took(account)
                if hard - held - 1 <= (hard - base) // 2:
                    self._tell(account, reached=held + 1 >= hard)
                return None
            if result.proven:
                self._tell(account)
                return _CONNECTIONS
            # The first read left room, others took it first: read again, twice this time.

    async def _prove_connections(self, account: int, apps: Collection[str], hard: int) -> _Proof:
        assert self.evidence is not None
        fields = [f"{app}|{code}" for app in apps for code in TRANSPORT_CODES.values()]
        wait = self._read_at.get(account, 0.0) + READ_SPACING - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)  # let the others' last opens reach Redis first
        first = await asyncio.to_thread(self._frontends, fields, ())
        self._read_at[account] = self.clock()
        upper = sum(sum(f.connections.values()) for f in first)
        upper += self.evidence.connections_here(apps)
        if upper < hard:
            # Other gateways may be letting the same burst in, unflushed yet: take half of
            # the room seen, then read again.
            upto = upper + (hard - upper + 1) // 2
            return self._settle(self._connections, account, upper, False, upto)
        await asyncio.sleep(self.heard_wait)
        second = await asyncio.to_thread(self._frontends, fields, ())
        heard = self.evidence.connections_here(apps)
        for before, after in zip(first, second, strict=True):
            heard += sum(n for inc, n in after.connections.items() if after.seen[inc] > before.now)
        return self._settle(self._connections, account, heard, True, hard)

    async def check_channel(self, account: int, app: str, channel: str | None) -> Refusal | None:
        """The answer :meth:`admit_channel` could not give from memory, for ``channel`` of
        ``app`` (None: a channel not named, as the admission endpoint asks)."""
        row = self._rows.get(account)
        if row is None or row.channels_hard is None or self.evidence is None:
            return None
        hard = row.channels_hard
        try:
            count = await self._count_channels(account, app, channel, hard)
        except (redis.RedisError, OSError) as exc:
            return self._unreadable(exc)
        if count is None:
            return None  # not a new channel of the account: nothing to count
        if count < hard:
            self._settle(self._channels, account, count, False, hard)
            self._channels.took(account)
            if hard - count - 1 <= (hard - count) // 2:
                self._tell(account, reached=count + 1 >= hard)
            return None
        self._tell(account)
        return _CHANNELS

    async def _count_channels(
        self, account: int, app: str, channel: str | None, hard: int
    ) -> int | None:
        """The account's channels as evidence has them (None: ``channel`` is not new)."""
        assert self.evidence is not None
        apps = self.evidence.apps_of(account)
        mine = self.evidence.channels_here(apps)
        if len(mine) >= hard:
            return len(mine)
        wanted = [] if channel is None else [f"{app}|{channel}"]
        first, tick = await asyncio.to_thread(self._channel_reads, account, mine, wanted)
        if _held(first, tick, wanted):
            return None
        second_at, counted, active = tick
        new_here = sum(1 for was in active[: len(mine)] if not was)
        if counted + new_here < hard:
            return counted + new_here
        await asyncio.sleep(self.heard_wait)
        mine = self.evidence.channels_here(apps)
        second, tick = await asyncio.to_thread(self._channel_reads, account, mine, wanted)
        if _held(second, tick, wanted):
            return None
        second_at, counted, active = tick
        if any(after.last_reap >= second_at * 1000 for after in second):
            # Someone was reaped since the tick counted: its channels may be in the count
            # and gone now, and which they were is gone with them. Only ours are certain.
            return len(mine)
        count = counted + sum(1 for was in active[: len(mine)] if not was)
        ours = set(mine)
        for store, before, after in zip(self.evidence.datacenters, first, second, strict=True):
            for inc in before.seen:
                if after.seen.get(inc, 0) <= before.now:  # silent since the first read
                    count -= await asyncio.to_thread(store.channels_of, inc, apps, ours)
        return max(count, len(mine))  # ours are certain, whatever else went

    def _frontends(self, conns: Sequence[str], channels: Sequence[str]) -> list[Frontends]:
        assert self.evidence is not None
        self.checks += 1
        inc = self.evidence.incarnation
        return [dc.frontends(inc, conns, channels) for dc in self.evidence.datacenters]

    def _channel_reads(
        self, account: int, mine: list[str], wanted: list[str]
    ) -> tuple[list[Frontends], tuple[int, int, list[bool]]]:
        assert self.evidence is not None
        frontends = self._frontends((), wanted)
        return frontends, self.evidence.live.channels_at_tick(str(account), mine + wanted)

    def _settle(self, tally: _Tally, account: int, base: int, proven: bool, upto: int) -> _Proof:
        """Go on from a count just read: the account's decisions start from it, afresh."""
        tally.settle(account, base)
        self._told.discard(account)
        return _Proof(base, proven, upto)

    # -- telling the other gateways -------------------------------------------------------

    def _tell(self, account: int, *, reached: bool = True) -> None:
        # Near the limit, once per copy: the others then check for longer than a copy lasts.
        # At it (or refusing), every time: the account may have gone below and back since.
        if reached or account not in self._told:
            self._told.add(account)
            self._outbox.put(account)

    def _run_teller(self) -> None:
        while (account := self._outbox.get()) is not None:
            try:
                self.store.notify_check(account, self.sender)
            except redis.RedisError as exc:
                log.warning("gateway.admission_notice_failed", error=str(exc))

    def _heard(self, data: str) -> None:
        """A notice from the engine or another gateway."""
        if data == LIVE_NOTICE:
            self.refresh(rows=False)
        elif data.startswith(CHECK_NOTICE):
            _, account, sender = data.split(" ")
            if sender != self.sender:
                # Until a tick has surely counted what the sender saw: a tick already under
                # way may not have, and its copy must not end the checks.
                self._flagged[int(account)] = self.clock() + FLAGGED_FOR
        else:
            self.refresh()

    # -- keeping the copy ---------------------------------------------------------------

    def refresh(self, *, rows: bool = True) -> None:
        """Read the copy from Redis (``rows``: the limits too, not only the live counts; they
        are read whole only when their version moved)."""
        if rows:
            self._version, changed = self.store.read_if_changed(self._version)
            if changed is not None:
                self._rows = changed
        self._live = self.store.read_live()
        self._connections = self._connections.renewed()
        self._channels = self._channels.renewed()
        self._read_at = {}
        self._told = set()
        self._month = datetime.now(UTC).strftime("%Y-%m")
        self._fresh_at = self.clock()

    def start(self) -> None:
        try:
            self.refresh()
        except redis.RedisError as exc:
            log.warning("gateway.admission_unavailable", error=str(exc))
        self._thread = threading.Thread(target=self._run, name="gateway-admission", daemon=True)
        self._thread.start()
        self._teller = threading.Thread(
            target=self._run_teller, name="gateway-admission-notices", daemon=True
        )
        self._teller.start()

    def close(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for thread in (self._thread, self._teller):
            if thread is not None:
                thread.join(timeout=5)

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
                    data = _s(message["data"])
                    self._heard(data)
                    if data != LIVE_NOTICE and not data.startswith(CHECK_NOTICE):
                        deadline = self.clock() + self.refresh_interval
                elif self.clock() >= deadline:
                    self.refresh()
                    deadline = self.clock() + self.refresh_interval
        finally:
            pubsub.close()


def _held(frontends: list[Frontends], tick: tuple[int, int, list[bool]], wanted: list[str]) -> bool:
    """Whether the channel asked about is already one of the account's."""
    if not wanted:
        return False
    return any(f.held[0] for f in frontends) or tick[2][-1]


def _s(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
