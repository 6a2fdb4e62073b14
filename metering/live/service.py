"""The 1-second global tick, and reading live counts.

The tick reads, from every datacenter, only what changed since the last committed tick (the
change log, plus frontends reaped now), sums those apps and channels across datacenters, and
commits the new global values, per-account sums and the 1-second sample in one atomic script
that claims the second: two ticks for one second (two beat processes, a retried task) count
it once.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from metering.core.coalesce import Coalescer
from metering.core.logging import get_logger
from metering.live.store import AsyncDatacenterReader, DatacenterStore, GlobalStore, Transport

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TickResult:
    second: int
    committed: bool
    apps_changed: int = 0
    # The accounts whose live values moved, with them: (websocket, streaming, long poll,
    # channels).
    accounts: tuple[tuple[str, tuple[int, int, int, int]], ...] = ()
    gap: int = 0
    resynced: tuple[str, ...] = ()
    duration: float = 0.0


def tick(
    global_store: GlobalStore,
    datacenters: Mapping[str, DatacenterStore],
    *,
    liveness_timeout: float,
    sample_retention: int,
    now: float | None = None,
) -> TickResult:
    started = time.perf_counter()
    second = int(time.time() if now is None else now)
    state = global_store.tick_state()

    conns: dict[str, tuple[int, int, int]] = {}
    channels: dict[str, bool] = {}
    cursors: list[tuple[str, str, int]] = []
    resynced: list[str] = []
    for name, store in datacenters.items():
        known_epoch = state.epochs.get(name)
        cursor = state.cursors.get(name, 0)
        collected = store.collect(
            cursor=cursor,
            trim_upto=cursor,
            timeout=liveness_timeout,
            epoch=known_epoch or secrets.token_hex(8),
        )
        if collected.epoch != known_epoch:
            # A Redis we have not read before, or one that restarted empty: its change log
            # starts over, so read it whole and recheck everything counted so far.
            collected = store.collect(
                cursor=0, trim_upto=0, timeout=liveness_timeout, epoch=collected.epoch, full=True
            )
            resynced.append(name)
        cursors.append((name, collected.epoch, collected.seq))
        for app, value in collected.conns.items():
            conns[app] = value
        channels.update(collected.channels)

    if resynced:
        apps, chans = global_store.known()
        for app in apps:
            conns.setdefault(app, (0, 0, 0))
        for chan in chans:
            channels.setdefault(chan, False)

    if len(datacenters) > 1 and (conns or channels):
        # A value read in one datacenter is only that datacenter's share: sum the apps across
        # all of them, and a channel is active if any datacenter has it.
        app_list, chan_list = list(conns), list(channels)
        totals = [[0, 0, 0] for _ in app_list]
        present = [False] * len(chan_list)
        for store in datacenters.values():
            triples, flags = store.current(app_list, chan_list)
            for i, (w, s, lp) in enumerate(triples):
                totals[i][0] += w
                totals[i][1] += s
                totals[i][2] += lp
            for i, flag in enumerate(flags):
                present[i] = present[i] or flag
        conns = {app: (t[0], t[1], t[2]) for app, t in zip(app_list, totals, strict=True)}
        channels = dict(zip(chan_list, present, strict=True))

    committed, gap, apps_changed, accounts = global_store.commit(
        second, cursors, conns, channels, maxlen=sample_retention
    )
    result = TickResult(
        second=second,
        committed=committed,
        apps_changed=apps_changed,
        accounts=tuple(accounts),
        gap=gap,
        resynced=tuple(resynced),
        duration=time.perf_counter() - started,
    )
    if not committed:
        log.info("live.tick_skipped", second=second, reason="already counted or superseded")
    elif gap > 1:
        log.warning("live.tick_gap", second=second, missed_seconds=gap - 1)
    return result


class LiveCounts:
    """Live counts read from the datacenter totals at the moment of the call.

    Reads of one app are coalesced: a caller arriving while a read is under way, or within
    ``reuse`` seconds after one started, gets that read's result instead of adding its own
    Redis round trip. Under load this turns N reads of a hot app into one per window, and adds
    at most ``reuse`` seconds of staleness to a count the flush already delays by ~20 ms.
    """

    def __init__(
        self,
        readers: Mapping[str, AsyncDatacenterReader],
        *,
        liveness_timeout: float,
        reuse: float = 0.0,
    ) -> None:
        self.readers = readers
        self.liveness_timeout = liveness_timeout
        self._reads: Coalescer[str, int] = Coalescer(reuse)

    async def websocket(self, app: str) -> int:
        """The app's WebSocket connections open now, on all frontends of all datacenters."""
        return await self._reads.get(app, lambda: self._read(app, Transport.WEBSOCKET))

    async def all_transports(self, app: str) -> dict[Transport, int]:
        """The app's connections open now, per realtime transport (not coalesced: the
        dashboard asks once a second, not thousands of times)."""
        return {t: await self._read(app, t) for t in Transport}

    async def _read(self, app: str, transport: Transport) -> int:
        total = 0
        for reader in self.readers.values():
            total += await reader.connections(
                app, transport, liveness_timeout=self.liveness_timeout
            )
        return total
