"""Admission without guesses, all real: gateway processes, WebSocket clients, the engine's own
tick (``workers.jobs.tick``, once a second, writing the live counts gateways read).

Nothing is refused while the account is below its hard limit: a burst from nothing to the
limit on one gateway, the same burst split over two, a reconnect storm after a gateway holding
most of the account's connections is SIGKILLed (its clients come back on the other at once,
while the dead one's counts still stand in Redis). At the limit the next one is refused, on
evidence. Channels likewise."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from metering.accounts import service
from metering.accounts.store import RegistryStore
from metering.core import redis as redis_clients
from metering.core.database import unit_of_work
from metering.limits import staff
from metering.limits.store import AdmissionStore
from metering.live.wiring import global_store
from tests import processes
from tests.conftest import Env
from tests.e2e.test_gateway_counting import Clients
from tests.factories import Tenant, tenant
from workers import jobs

ACCEPTED = 101


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    c.shutdown()


@pytest.fixture
def ticking(env: Env) -> Iterator[None]:
    """The engine's 1-second tick, as the beat runs it."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(1.0 - time.time() % 1.0):
            jobs.tick()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=10)


def limited(env: Env, **limits: tuple[int, int]) -> Tenant:
    t = tenant("stats", name="limited")
    with unit_of_work() as session:
        staff.create_package(session, "tiny", dict(limits))
        change = staff.set_package(session, t.account_id, "tiny", by="e2e")
    AdmissionStore(redis_clients.primary(), env.prefix).write(change.admission)
    return t


def outcome(clients: Clients, port: int, app_id: int, n: int) -> list[int]:
    """Open ``n`` WebSockets at once: 101 for each let in (kept open), else the refusal code."""

    async def one() -> int:
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?app={app_id}")
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status != 403:
                return status
            return int(json.loads(exc.response.body or b"{}")["error"]["code"])
        assert json.loads(await ws.recv())["action"] == "connected"
        clients.open.append(ws)
        return ACCEPTED

    async def many() -> list[int]:
        return list(await asyncio.gather(*(one() for _ in range(n))))

    return clients.run(many())


def attach(clients: Clients, ws: ClientConnection, channel: str) -> int:
    reply = clients.request(ws, json.dumps({"action": "attach", "channel": channel}))
    return ACCEPTED if reply["action"] == "attached" else int(reply["error"]["code"])


def counted(env: Env, t: Tenant) -> tuple[int, int]:
    """The account's live connections and channels at the last tick."""
    value = global_store(env.settings).account_value(str(t.account_id))
    return value.connections, value.channels


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_burst_to_the_hard_limit_is_accepted_whole_on_one_gateway_or_two(
    env: Env, clients: Clients, ticking: None, start_gateway: Callable[..., processes.Process]
) -> None:
    # The new user's case: hard limit 6, nothing open, 6 WebSockets within a second.
    t = limited(env, connections=(4, 6))
    gw1, gw2 = start_gateway("gw-1"), start_gateway("gw-2")
    until(lambda: counted(env, t) == (0, 0), "a first tick")
    got = [outcome(clients, gw1.port, t.app_id, 1)[0] for _ in range(6)]
    assert got == [ACCEPTED] * 6
    assert outcome(clients, gw1.port, t.app_id, 1) == [40111]
    time.sleep(0.1)  # gw1's flush of its last connection (20 ms after it)
    assert outcome(clients, gw2.port, t.app_id, 1) == [40111]  # on evidence, elsewhere too

    clients.close(list(clients.open))
    until(lambda: counted(env, t) == (0, 0), "the closes counted")
    # Split over two gateways, all at once.
    both = outcome(clients, gw1.port, t.app_id, 3) + outcome(clients, gw2.port, t.app_id, 3)
    assert both == [ACCEPTED] * 6
    time.sleep(0.3)  # the last flush: each gateway has its evidence from the other
    assert outcome(clients, gw2.port, t.app_id, 1) == [40111]
    assert outcome(clients, gw1.port, t.app_id, 1) == [40111]


def test_a_reconnect_storm_is_not_refused_below_the_hard_limit(
    env: Env, clients: Clients, ticking: None, start_gateway: Callable[..., processes.Process]
) -> None:
    t = limited(env, connections=(8, 10))
    gw1, gw2 = start_gateway("gw-1"), start_gateway("gw-2")
    assert outcome(clients, gw1.port, t.app_id, 7) == [ACCEPTED] * 7
    assert outcome(clients, gw2.port, t.app_id, 2) == [ACCEPTED] * 2
    until(lambda: counted(env, t)[0] == 9, "the tick to count 9 of 10")

    gw1.kill()  # its 7 clients come back on gw2 at once; its counts stand until reaped
    assert outcome(clients, gw2.port, t.app_id, 7) == [ACCEPTED] * 7
    # 9 open for real: one more fits, then the limit.
    assert outcome(clients, gw2.port, t.app_id, 1) == [ACCEPTED]
    assert outcome(clients, gw2.port, t.app_id, 1) == [40111]
    until(lambda: counted(env, t)[0] == 10, "the dead gateway reaped")
    assert outcome(clients, gw2.port, t.app_id, 1) == [40111]


def test_channels_are_refused_only_at_the_hard_limit_storm_or_not(
    env: Env, clients: Clients, ticking: None, start_gateway: Callable[..., processes.Process]
) -> None:
    t = limited(env, channels=(3, 4))
    gw1, gw2 = start_gateway("gw-1"), start_gateway("gw-2")
    until(lambda: counted(env, t) == (0, 0), "a first tick")
    [a] = clients.connect(gw1.port, t.app_id)
    # From nothing to the limit on one connection within a second, then refused.
    assert [attach(clients, a, f"c{i}") for i in range(4)] == [ACCEPTED] * 4
    assert attach(clients, a, "c4") == 40114
    until(lambda: counted(env, t)[1] == 4, "the tick to count the 4 channels")
    [b] = clients.connect(gw2.port, t.app_id)
    assert attach(clients, b, "c0") == ACCEPTED  # one of the account's already
    assert attach(clients, b, "c5") == 40114  # a fifth, on the tick's evidence
    clients.open.remove(a)
    gw1.kill()  # a's channels stand in Redis until reaped; its client comes back on gw2
    [a2] = clients.connect(gw2.port, t.app_id)
    # Three of them back (one still held by b), then a new one in the room the others left:
    # 1 + 3 = 4 channels for real.
    assert [attach(clients, a2, f"c{i}") for i in (1, 2)] == [ACCEPTED] * 2
    assert attach(clients, a2, "n1") == ACCEPTED
    assert attach(clients, a2, "n2") == 40114


def test_a_registry_redis_lost_is_refilled_and_never_means_unknown_app(
    env: Env, tmp_path: Path, clients: Clients, start_gateway: Callable[..., processes.Process]
) -> None:
    t = tenant("stats", name="known")
    celery = shutil.which("celery", path=str(processes.BIN))
    assert celery
    # As in production: the beat, and a worker running the tick and what it asks for.
    beat = processes.Process(
        [celery, "-A", "workers", "beat", "--loglevel", "INFO", "-s", str(tmp_path / "beat")],
        env.child_env(), ready="beat: Starting", timeout=60,
    )  # fmt: skip
    worker = processes.Process(
        [celery, "-A", "workers", "worker", "--loglevel", "INFO", "-Q", "live,celery",
         "--concurrency", "2", "-n", f"w-{env.prefix}@%h"],
        env.child_env(), ready="ready.", timeout=60,
    )  # fmt: skip
    try:
        _refilled(env, clients, t, start_gateway)
    finally:
        worker.stop(timeout=30)
        beat.stop()


def _refilled(
    env: Env, clients: Clients, t: Tenant, start_gateway: Callable[..., processes.Process]
) -> None:
    gw = start_gateway("gw-1", METERING_REGISTRY_REFRESH_INTERVAL="0.2")
    assert outcome(clients, gw.port, t.app_id, 1) == [ACCEPTED]
    # Redis restarted empty (the registry's keys gone) between two syncs, and an app is made
    # meanwhile: the gateway's next refresh sees an empty mirror.
    store = RegistryStore(redis_clients.primary(), env.prefix)
    env.redis.delete(store.key, store.synced_key)
    with unit_of_work() as session:
        fresh = service.create_app(session, t.account_id, "fresh").id
    time.sleep(0.5)
    assert outcome(clients, gw.port, t.app_id, 3) == [ACCEPTED] * 3  # the last copy holds
    # The tick notices within a second and asks for a full sync: the new app connects (a
    # connect that came first waits for it), and an app that does not exist is unknown again.
    assert outcome(clients, gw.port, fresh, 1) == [ACCEPTED]
    until(store.complete, "the mirror refilled")
    assert outcome(clients, gw.port, 987654321, 1) == [404]
