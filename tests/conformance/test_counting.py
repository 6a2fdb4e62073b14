"""The same counting, whichever language the gateways are written in: each scenario runs with
two Python gateways, two Node.js gateways, and one of each in the same account, all real
processes, counted by the engine's real tick."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from metering.core import database
from metering.core import redis as redis_clients
from metering.gateway.server import encode
from metering.limits import staff
from metering.limits import wiring as limits_wiring
from metering.limits.store import AdmissionStore
from metering.rollups.models import FRONTEND_COUNTERS
from tests.conformance.conftest import DRIVERS, Engine, Gateway, publish_registry
from tests.conftest import Env
from tests.e2e.test_gateway_counting import Clients
from tests.factories import tenant
from tests.limits.test_enforcement_e2e import _try_connect

drivers = pytest.mark.parametrize("driver", list(DRIVERS))
Start = Callable[..., list[Gateway]]


def _stream(stack: contextlib.ExitStack, port: int, query: str) -> Iterator[str]:
    """An event stream held open until ``stack`` closes (its hello read). Keep the lines it
    returns: the iterator, once garbage, closes the response."""
    http = stack.enter_context(httpx.Client(timeout=10))
    stream = stack.enter_context(http.stream("GET", f"http://127.0.0.1:{port}/v1/stream?{query}"))
    assert stream.status_code == 200
    lines = stream.iter_lines()
    assert next(lines) == "event: connected"
    return lines


def _attach(clients: Clients, ws: object, channel: str) -> None:
    reply = clients.request(ws, json.dumps({"action": "attach", "channel": channel}))  # type: ignore[arg-type]
    assert reply == {"action": "attached", "channel": channel}


def _counters(engine: Engine, incarnations: list[str]) -> dict[str, dict[str, int]]:
    """Per app, each counter summed over the incarnations (as the aggregator applies them)."""
    store = engine.store()
    out: dict[str, dict[str, int]] = {}
    for inc in incarnations:
        for app, packed in store.client.hgetall(store.key(f"fe:{inc}:counters")).items():
            totals = out.setdefault(app.decode(), dict.fromkeys(FRONTEND_COUNTERS, 0))
            for name, value in zip(FRONTEND_COUNTERS, packed.split(), strict=True):
                totals[name] += int(value)
    return out


def _incarnation(gw: Gateway) -> str:
    inc: str = httpx.get(f"{gw.http}/healthz", timeout=5).json()["incarnation"]
    return inc


@drivers
def test_connections_are_counted_per_app_and_transport(
    driver: str, env: Env, engine: Engine, start_gateways: Start, clients: Clients
) -> None:
    t1 = tenant("platform")
    t2 = tenant("platform", account_id=t1.account_id, name="second")
    publish_registry(env)
    a, b = start_gateways(DRIVERS[driver])
    on_a = clients.connect(a.port, t1.app_id, 3)
    clients.connect(b.port, t2.app_id, 2)
    with contextlib.ExitStack() as stack:
        lines = _stream(stack, b.port, f"app={t1.app_id}")
        for gw in (a, b):  # REST publishes are never connections
            posted = httpx.post(
                f"{gw.http}/v1/apps/{t1.app_id}/messages", json={"channel": "c", "data": 1}
            )
            assert posted.status_code == 201
        engine.values_after_tick(
            lambda: (
                (engine.app(t1.app_id).websocket, engine.app(t1.app_id).streaming) == (3, 1)
                and engine.app(t2.app_id).websocket == 2
            ),
            "3 + 2 WebSockets, 1 stream",
        )
        account = engine.account(t1.account_id)
        assert (account.websocket, account.streaming, account.long_poll) == (5, 1, 0)
        del lines

    clients.close(on_a[:1])
    engine.values_after_tick(
        lambda: (engine.app(t1.app_id).websocket, engine.app(t1.app_id).streaming) == (2, 0),
        "one WebSocket and the stream closed",
    )
    assert engine.account(t1.account_id).connections == 4


@drivers
def test_a_channel_attached_on_several_frontends_is_one(
    driver: str, env: Env, engine: Engine, start_gateways: Start, clients: Clients
) -> None:
    t1 = tenant("platform")
    t2 = tenant("platform", account_id=t1.account_id, name="second")
    publish_registry(env)
    a, b = start_gateways(DRIVERS[driver])
    (on_a,) = clients.connect(a.port, t1.app_id)
    (on_b,) = clients.connect(b.port, t1.app_id)
    (other_app,) = clients.connect(b.port, t2.app_id)
    for ws, channel in (
        (on_a, "shared"),
        (on_a, "only-a"),
        (on_b, "shared"),
        (other_app, "shared"),
    ):
        _attach(clients, ws, channel)
    engine.values_after_tick(
        lambda: engine.app(t1.app_id).channels == 2 and engine.app(t2.app_id).channels == 1,
        "two channels of app 1 (one on both frontends), one of app 2",
    )
    assert engine.account(t1.account_id).channels == 3  # channels are per app

    clients.request(on_a, json.dumps({"action": "detach", "channel": "shared"}))
    time.sleep(0.1)
    engine.tick()
    assert engine.app(t1.app_id).channels == 2  # still held on the other frontend
    clients.close([on_b])
    engine.values_after_tick(lambda: engine.app(t1.app_id).channels == 1, "'shared' released")


@drivers
def test_a_killed_gateway_is_reaped_within_the_liveness_timeout(
    driver: str,
    *,
    env: Env,
    engine: Engine,
    start_gateways: Start,
    clients: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env.override(monkeypatch, METERING_LIVENESS_TIMEOUT="1.5")
    timeout = 1.5
    t = tenant("platform")
    publish_registry(env)
    survivor, victim = start_gateways(DRIVERS[driver])
    clients.connect(survivor.port, t.app_id, 2)
    clients.connect(victim.port, t.app_id, 3)
    deadline = time.monotonic() + 5
    while engine.websockets_now(t.app_id) != 5:
        assert time.monotonic() < deadline, "5 connections never counted"
        time.sleep(0.02)

    victim.proc.kill()  # SIGKILL: nothing on that process cooperates
    killed = time.monotonic()
    while engine.websockets_now(t.app_id) != 2:
        assert time.monotonic() - killed < timeout + 2, "the dead gateway was never reaped"
        time.sleep(0.01)
    elapsed = time.monotonic() - killed
    # Within the timeout of its last heartbeat (at most 250 ms before the kill).
    assert elapsed <= timeout + 0.2, f"took {elapsed:.2f}s"
    engine.tick()
    assert engine.app(t.app_id).websocket == 2


@drivers
def test_a_restart_under_the_same_frontend_id_is_never_counted_twice(
    driver: str,
    *,
    env: Env,
    engine: Engine,
    start_gateways: Start,
    clients: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env.override(monkeypatch, METERING_LIVENESS_TIMEOUT="1.5")
    t = tenant("platform")
    publish_registry(env)
    first_kind, second_kind = DRIVERS[driver]  # mixed: a Python process replaced by a Node one
    (first,) = start_gateways([first_kind], ["gw-same"])
    clients.connect(first.port, t.app_id, 4)
    deadline = time.monotonic() + 5
    while engine.websockets_now(t.app_id) != 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)

    first.proc.kill()
    (second,) = start_gateways([second_kind], ["gw-same"])
    # It took the id over at its start: the old incarnation is gone at once, not reaped later.
    assert list(engine.store().incarnations()) == [_incarnation(second)]
    clients.connect(second.port, t.app_id, 4)  # the users reconnect at once
    seen = []
    deadline = time.monotonic() + 1.5 + 0.5
    while time.monotonic() < deadline:
        seen.append(engine.websockets_now(t.app_id))
        time.sleep(0.02)
    assert max(seen) <= 4, f"double counted: {max(seen)}"
    assert seen[-1] == 4


@drivers
def test_messages_are_counted_exactly_once_with_python_sizes(
    driver: str, env: Env, engine: Engine, start_gateways: Start, clients: Clients
) -> None:
    t = tenant("platform")
    publish_registry(env)
    a, b = start_gateways(DRIVERS[driver])
    subscribers_a = clients.connect(a.port, t.app_id, 2)
    (subscriber_b,) = clients.connect(b.port, t.app_id)
    (publisher,) = clients.connect(a.port, t.app_id)
    for ws in (*subscribers_a, subscriber_b):
        _attach(clients, ws, "c")
    incarnations = [_incarnation(a), _incarnation(b)]

    # Sizes as Python measures them: floats as repr writes them, big integers exact, keys in
    # their order, non-ASCII as UTF-8.
    d1 = {"t": "héllo 😀", "n": [1.0, 1e16, 1e-05, 12345678901234567890], "2": 0, "1": None}
    d2, d3 = [{"x": 0.1}, "z"], {"deep": [[[]]]}
    raw_d1 = json.dumps({"action": "publish", "channel": "c", "data": d1}, ensure_ascii=False)
    for _ in range(3):
        assert clients.request(publisher, raw_d1) == {"action": "published", "channel": "c"}
    batch = httpx.post(
        f"{b.http}/v1/apps/{t.app_id}/messages",
        content=json.dumps([{"channel": "c", "data": d} for d in d2]).encode(),
    )
    assert batch.json() == {
        "published": 2,
        "delivered": 2,
        "messages": [{"channel": "c", "delivered": 1}] * 2,
    }
    one = httpx.post(f"{a.http}/v1/apps/{t.app_id}/messages", json={"channel": "c", "data": d3})
    assert one.json() == {"channel": "c", "published": 1, "delivered": 2}
    for ws in subscribers_a:  # each message reached each subscriber once, as Python writes it
        got = [clients.run(ws.recv()) for _ in range(4)]
        assert got[0] == f'{{"action":"message","channel":"c","data":{encode(d1)}}}'

    size = {k: len(encode(v).encode()) for k, v in (("d1", d1), ("d3", d3))}
    sizes2 = [len(encode(d).encode()) for d in d2]
    expected = {
        "pub_n": 3 + 1 + 2,
        "pub_b": 3 * size["d1"] + size["d3"] + sum(sizes2),
        "del_n": 4 * 2 + 2 * 1,
        "del_b": 2 * (3 * size["d1"] + size["d3"]) + sum(sizes2),
        "opened": 4,
    }
    for gw in (a, b):  # a clean stop flushes the last counters before it deregisters
        gw.proc.stop()
    totals = _counters(engine, incarnations)[str(t.app_id)]
    assert {k: totals[k] for k in expected} == expected
    assert engine.store().incarnations() == {}


@drivers
def test_connections_are_refused_at_the_hard_limit_and_let_in_below_it(
    driver: str,
    *,
    env: Env,
    engine: Engine,
    start_gateways: Start,
    clients: Clients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = tenant("platform", name="limited")
    publish_registry(env)
    with database.unit_of_work() as session:
        staff.create_package(session, "tiny", {"connections": (2, 3)})
        change = staff.set_package(session, t.account_id, "tiny", by="conformance")
    AdmissionStore(redis_clients.primary(), env.prefix).write(change.admission)
    limits = limits_wiring.build(env.settings, database.get_engine(), dispatch=lambda _ids: None)

    def tick_and_publish_live() -> None:
        # The engine's own after-tick step: the live counts of accounts near a hard limit.
        second, accounts = engine.tick()
        limits.live.after_tick(second, accounts)

    a, b = start_gateways(DRIVERS[driver])
    held = clients.connect(a.port, t.app_id, 2) + clients.connect(b.port, t.app_id, 1)
    refused = 0

    def attempt(gw: Gateway, keep: list | None = None) -> int:  # type: ignore[type-arg]
        nonlocal refused
        status, body = _try_connect(clients, gw.port, t.app_id, keep=keep)
        if status == 403:
            assert body == {
                "error": {
                    "code": 40111,
                    "statusCode": 403,
                    "message": "account restricted (connection limits exceeded)",
                }
            }
            refused += 1
        return status

    deadline = time.monotonic() + 5
    while engine.websockets_now(t.app_id) != 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tick_and_publish_live()  # 3 open: the hard limit
    deadline = time.monotonic() + 3
    while attempt(b) != 403:
        assert time.monotonic() < deadline, "never refused at the hard limit"
        time.sleep(0.05)
    assert attempt(a) == 403  # the other gateway too
    for ws in held:  # the open ones stay
        assert clients.request(ws, '{"action":"attach","channel":"c"}')["action"] == "attached"

    clients.close(held[:1])  # one on a: below the limit
    deadline = time.monotonic() + 5
    while engine.websockets_now(t.app_id) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    tick_and_publish_live()
    deadline = time.monotonic() + 3
    while attempt(b, keep=held) != 101:
        assert time.monotonic() < deadline, "never let in again below the limit"
        time.sleep(0.05)

    # Every refusal counted as refused, by whichever gateway refused it.
    incarnations = [_incarnation(a), _incarnation(b)]
    deadline = time.monotonic() + 3
    while _counters(engine, incarnations)[str(t.app_id)]["refused"] != refused:
        assert time.monotonic() < deadline, f"{refused} refusals not counted"
        time.sleep(0.05)
