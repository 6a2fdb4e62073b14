"""The gateway's admission decisions against a real Redis, with the other frontends played by
real Meters (a heartbeating one, one that went silent as if SIGKILLed): nothing refused below
the hard limit, refused at it on evidence, a frontend killed a moment ago no evidence, a
channel already the account's never counted twice, notices between gateways, publishing
blocked for the month, and a copy that cannot be refreshed failing open or closed as set."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis

from metering.gateway.admission import (
    CHANNELS_EXCEEDED,
    CONNECTIONS_EXCEEDED,
    MESSAGES_EXCEEDED,
    UNAVAILABLE,
    Admission,
    Check,
    Evidence,
)
from metering.gateway.sdk import Meter
from metering.limits.repository import AdmissionRow
from metering.limits.store import AdmissionStore
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from tests.scratch import REDIS_URL, delete_keys

ACCOUNT = 7
APPS = ("71", "72")  # the account's apps
THIS_MONTH = datetime.now(UTC).strftime("%Y-%m")
HEARTBEAT = 0.1  # the Meters' flush interval here, and what the checks wait for


@dataclass
class Scene:
    store: AdmissionStore
    dc: DatacenterStore
    live: GlobalStore
    meters: list[Meter]

    def meter(self, frontend: str, *, start: bool = True) -> Meter:
        m = Meter(self.dc, frontend, flush_interval=HEARTBEAT, liveness_timeout=3.0)
        if start:
            m.start()
        self.meters.append(m)
        return m

    def gateway(self, meter: Meter | None = None, **kw: object) -> Admission:
        """An Admission as a gateway builds it, its own counts from ``meter``."""
        evidence = Evidence([self.dc], self.live, lambda a: APPS if a == ACCOUNT else ())
        if meter is not None:
            evidence.incarnation = meter.incarnation
            evidence.connections_here = meter.connections_of
            evidence.channels_here = meter.channels_of
        adm = Admission(self.store, evidence=evidence, heartbeat=HEARTBEAT, **kw)  # type: ignore[arg-type]
        adm.refresh()
        return adm

    def tick(self) -> None:
        time.sleep(1.01 - time.time() % 1)  # one tick per second: the next one
        tick(self.live, {"dc1": self.dc}, liveness_timeout=3.0, sample_retention=100)


@pytest.fixture
def scene() -> Iterator[Scene]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"adm{time.monotonic_ns()}"
    live = GlobalStore(client, prefix)
    client.hset(live.key("apps"), mapping=dict.fromkeys(APPS, str(ACCOUNT)))
    s = Scene(AdmissionStore(client, prefix), DatacenterStore(client, prefix, "dc1"), live, [])
    yield s
    for m in s.meters:
        m.close()
    delete_keys(client, prefix)
    client.close()


@pytest.fixture
def store(scene: Scene) -> AdmissionStore:
    return scene.store


def connect(adm: Admission, meter: Meter | None = None, app: str = APPS[0]) -> int | None:
    """What a gateway does on a connect: the copy, a check if it cannot tell, the count."""
    refusal = adm.admit_connection(ACCOUNT)
    if isinstance(refusal, Check):
        refusal = asyncio.run(adm.check_connection(ACCOUNT))
    if refusal is None and meter is not None:
        meter.connection_opened(app)
    return None if refusal is None else refusal.code


def attach(adm: Admission, meter: Meter | None, channel: str, app: str = APPS[0]) -> int | None:
    refusal = adm.admit_channel(ACCOUNT)
    if isinstance(refusal, Check):
        refusal = asyncio.run(adm.check_channel(ACCOUNT, app, channel))
    if refusal is None and meter is not None:
        meter.channel_attached(app, channel)
    return None if refusal is None else refusal.code


def codes(decide, n: int) -> list[int | None]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        r = decide(ACCOUNT)
        if isinstance(r, Check):
            r = asyncio.run(
                decide.__self__.check_connection(ACCOUNT)
                if decide.__name__ == "admit_connection"
                else decide.__self__.check_channel(ACCOUNT, APPS[0], None)
            )
        out.append(None if r is None else r.code)
    return out


def test_a_burst_from_nothing_to_the_hard_limit_is_accepted_whole(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(connections_hard=6)})
    here = scene.meter("gw-a")
    adm = scene.gateway(here)
    # Not listed at the last tick: the copy alone lets in 4 (it may hold 2); the rest by
    # reads that find only this gateway's own 4, then 5; the 7th is this gateway's own proof.
    assert [connect(adm, here) for _ in range(7)] == [None] * 6 + [CONNECTIONS_EXCEEDED]
    reads = adm.checks
    assert connect(adm, here) == CONNECTIONS_EXCEEDED
    assert adm.checks == reads  # this gateway alone holds the limit: no read for that
    here.connection_closed(APPS[0])
    adm.connection_closed(ACCOUNT)
    assert connect(adm, here) is None  # one closed: room for one
    assert connect(adm, here) == CONNECTIONS_EXCEEDED


def test_refused_at_the_limit_held_by_a_live_frontend_and_let_in_below_it(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(connections_hard=10)})
    other = scene.meter("gw-b")
    for app in (APPS[0], APPS[1], APPS[1]):
        other.connection_opened(app)
    other.flush()
    here = scene.meter("gw-a")
    adm = scene.gateway(here)
    assert [connect(adm, here) for _ in range(8)] == [None] * 7 + [CONNECTIONS_EXCEEDED]
    other.connection_closed(APPS[1])
    other.flush()
    # The copy has no room, so the check reads: the other frontend's close is seen at once.
    assert connect(adm, here) is None
    assert connect(adm, here) == CONNECTIONS_EXCEEDED


def test_a_frontend_killed_a_moment_ago_is_no_evidence(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(connections_hard=10)})
    dead = scene.meter("gw-dead", start=False)
    for _ in range(8):
        dead.connection_opened(APPS[0])
    dead.flush()  # its last heartbeat: then SIGKILLed, not reaped for 3 s
    scene.tick()
    scene.store.write_live({ACCOUNT: (8, 0)})  # the tick saw the 8
    here = scene.meter("gw-a")
    adm = scene.gateway(here)
    # Its 8 clients reconnect here at once: all of them let in, though the tick still
    # counts the dead frontend's 8 (and would for up to the liveness timeout).
    assert [connect(adm, here) for _ in range(8)] == [None] * 8
    assert [connect(adm, here) for _ in range(3)] == [None, None, CONNECTIONS_EXCEEDED]


def test_concurrent_checks_of_one_account_share_one_read(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(connections_hard=4)})
    scene.store.write_live({ACCOUNT: (4, 0)})
    other = scene.meter("gw-b")
    for _ in range(4):
        other.connection_opened(APPS[0])
    other.flush()
    adm = scene.gateway(scene.meter("gw-a"))

    async def many() -> list[int | None]:
        assert all(isinstance(adm.admit_connection(ACCOUNT), Check) for _ in range(20))
        got = await asyncio.gather(*(adm.check_connection(ACCOUNT) for _ in range(20)))
        return [None if r is None else r.code for r in got]

    assert asyncio.run(many()) == [CONNECTIONS_EXCEEDED] * 20
    assert adm.checks == 2  # one proof (two reads) for all twenty


def test_a_channel_already_the_accounts_is_never_counted_again(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(channels_hard=3)})
    other = scene.meter("gw-b")
    other.connection_opened(APPS[0])
    for channel in ("a", "b", "c"):
        other.channel_attached(APPS[0], channel)
    other.flush()
    scene.tick()
    scene.store.write_live({ACCOUNT: (1, 3)})
    here = scene.meter("gw-a")
    adm = scene.gateway(here)
    # Held elsewhere: the account still has three channels, whatever this gateway attaches.
    assert [attach(adm, here, c) for c in ("a", "b", "c")] == [None] * 3
    assert attach(adm, here, "d") == CHANNELS_EXCEEDED  # a fourth, on evidence
    for meter in (other, here):
        meter.channel_detached(APPS[0], "c")
        meter.flush()
    scene.tick()  # the tick sees two: room for one more
    assert attach(adm, here, "d") is None


def test_channels_of_a_frontend_killed_a_moment_ago_are_no_evidence(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(channels_hard=3)})
    dead = scene.meter("gw-dead", start=False)
    dead.connection_opened(APPS[0])
    for channel in ("a", "b", "c"):
        dead.channel_attached(APPS[0], channel)
    dead.flush()
    scene.tick()
    scene.store.write_live({ACCOUNT: (1, 3)})
    here = scene.meter("gw-a")
    adm = scene.gateway(here)
    # Its clients come back here with other channels: three, the dead ones not evidence.
    assert [attach(adm, here, c) for c in ("x", "y", "z")] == [None] * 3
    here.flush()
    assert attach(adm, here, "w") == CHANNELS_EXCEEDED  # this gateway's own three


def test_a_gateway_near_the_limit_makes_the_others_check(scene: Scene) -> None:
    scene.store.write({ACCOUNT: AdmissionRow(connections_hard=10)})
    a_meter, b_meter = scene.meter("gw-a"), scene.meter("gw-b")
    a, b = scene.gateway(a_meter, refresh_interval=60), scene.gateway(b_meter, refresh_interval=60)
    a.start()
    b.start()
    try:
        # a takes 10: at half its room it tells the others; b checks from then on.
        assert [connect(a, a_meter) for _ in range(10)] == [None] * 10
        a_meter.flush()
        deadline = time.monotonic() + 2
        while not isinstance(b.admit_connection(ACCOUNT), Check):
            b.connection_closed(ACCOUNT)  # undo the count of the accepted probe
            assert time.monotonic() < deadline, "the notice did not reach the other gateway"
            time.sleep(0.01)
        assert asyncio.run(b.check_connection(ACCOUNT)) is not None
    finally:
        a.close()
        b.close()


def test_without_evidence_sources_a_copy_with_no_room_lets_in(store: AdmissionStore) -> None:
    # The admission endpoint's process has no connections; its checks read the frontends.
    store.write({ACCOUNT: AdmissionRow(connections_hard=2, channels_hard=2)})
    store.write_live({ACCOUNT: (2, 2)})
    adm = Admission(store)
    adm.refresh()
    assert codes(adm.admit_connection, 3) == [None] * 3
    assert codes(adm.admit_channel, 3) == [None] * 3


def test_publishing_is_refused_for_the_rest_of_a_blocked_month(store: AdmissionStore) -> None:
    store.write(
        {ACCOUNT: AdmissionRow(publish_blocked_month=THIS_MONTH, publish_blocked_by="data")}
    )
    adm = Admission(store)
    adm.refresh()
    refusal = adm.admit_message(ACCOUNT)
    assert refusal is not None
    assert refusal.code == MESSAGES_EXCEEDED
    assert "data" in refusal.reason
    assert refusal.retry_after is not None
    assert 0 < refusal.retry_after <= 31 * 86400
    assert adm.admit_connection(ACCOUNT) is None  # connections are not limited here
    store.write({ACCOUNT: AdmissionRow(publish_blocked_month="2000-01", publish_blocked_by="data")})
    adm.refresh()
    assert adm.admit_message(ACCOUNT) is None  # a block of another month is no block


def test_a_notice_applies_a_change_at_once(store: AdmissionStore) -> None:
    adm = Admission(store, refresh_interval=60)  # only the notice can bring the change
    adm.start()
    try:
        assert adm.admit_connection(ACCOUNT) is None
        store.write({ACCOUNT: AdmissionRow(connections_hard=1)})
        store.write_live({ACCOUNT: (1, 0)})
        deadline = time.monotonic() + 2
        while adm.admit_connection(ACCOUNT) is None:
            assert time.monotonic() < deadline, "the notice was not applied"
            time.sleep(0.01)
        store.write({ACCOUNT: AdmissionRow()})  # lifted (a package change, an override)
        deadline = time.monotonic() + 2
        while adm.admit_connection(ACCOUNT) is not None:
            assert time.monotonic() < deadline, "the lift was not applied"
            time.sleep(0.01)
    finally:
        adm.close()


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_copy_that_cannot_be_refreshed_fails_open_or_closed(
    store: AdmissionStore, fail_open: bool
) -> None:
    now = [0.0]
    store.write({ACCOUNT: AdmissionRow(connections_hard=1)})
    store.write_live({ACCOUNT: (5, 0)})
    adm = Admission(store, fail_open=fail_open, stale_after=15, clock=lambda: now[0])
    adm.refresh()
    assert isinstance(adm.admit_connection(ACCOUNT), Check)  # no room: a check would read
    now[0] = 16.0  # no refresh for longer than stale_after: Redis unreachable
    expected = None if fail_open else UNAVAILABLE
    assert codes(adm.admit_connection, 1) == [expected]
    assert [None if (r := adm.admit_message(ACCOUNT + 1)) is None else r.code] == [expected]


def test_the_limits_are_read_whole_only_when_their_version_moved(store: AdmissionStore) -> None:
    store.write({ACCOUNT: AdmissionRow(connections_hard=3)})
    version, rows = store.read_if_changed(None)
    assert rows == {ACCOUNT: AdmissionRow(connections_hard=3)}
    assert store.read_if_changed(version) == (version, None)  # unchanged: not read again
    store.write({ACCOUNT: AdmissionRow()})
    moved, rows = store.read_if_changed(version)
    assert (moved != version, rows) == (True, {})


def test_a_copy_lost_by_redis_keeps_the_last_limits(store: AdmissionStore) -> None:
    store.write({ACCOUNT: AdmissionRow(connections_hard=3)})
    adm = Admission(store)
    adm.refresh()
    delete_keys(store.client, store.key.split(":")[0].strip("{}"))  # Redis restarted empty
    adm.refresh()
    assert adm._rows == {ACCOUNT: AdmissionRow(connections_hard=3)}
    store.write({ACCOUNT: AdmissionRow(connections_hard=5)})  # the engine writes again
    adm.refresh()
    assert adm._rows == {ACCOUNT: AdmissionRow(connections_hard=5)}
