"""The example gateway as a real process: real WebSocket, event-stream and REST clients, real Redis.

Needs only Redis (``METERING_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``), each test
under a key prefix of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from metering.accounts.store import RegistryStore
from metering.gateway.registry import AppRegistry, RegistryUnavailable, valid_app_id
from metering.gateway.sdk import Meter
from metering.limits.repository import AdmissionRow
from metering.limits.store import AdmissionStore
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups.models import FRONTEND_COUNTERS
from tests.scratch import REDIS_URL, delete_keys

APP, OTHER_APP = "1", "2"
MAX_CHANNELS = 5

RUN = """
from metering.core.logging import configure
from metering.core.settings import get_settings
from metering.gateway.server import run_gateway
settings = get_settings()
configure("WARNING")
run_gateway(settings, host="127.0.0.1", port=0, frontend_id="gw-t", datacenter="dc1")
"""


def wait_until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, "condition not met in time"
            return value
        time.sleep(0.02)


@dataclass
class Gateway:
    proc: subprocess.Popen[str]
    port: int
    lines: list[str]
    store: DatacenterStore

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws(self, app: str = APP) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime?app={app}"

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.http}/healthz", timeout=5).json()
        return body

    def live(self, app: str = APP, channels: tuple[str, ...] = ()) -> tuple[Any, list[bool]]:
        """(websocket, streaming, long_poll) of ``app`` in Redis, and channel presence."""
        conns, present = self.store.current([app], [f"{app}|{c}" for c in channels])
        return conns[0], present

    def counters(self) -> dict[str, int]:
        """The incarnation's non-zero counters, as '<app>|<name>' -> total."""
        inc = self.health()["incarnation"]
        raw = self.store.client.hgetall(self.store.key(f"fe:{inc}:counters"))
        return {
            f"{app.decode()}|{name}": int(total)
            for app, packed in raw.items()
            for name, total in zip(FRONTEND_COUNTERS, packed.split(), strict=True)
            if int(total)
        }


@pytest.fixture
def prefix() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    name = f"t{uuid.uuid4().hex[:8]}"
    RegistryStore(client, name).publish({int(APP): 1, int(OTHER_APP): 1}, replace=True)
    yield name
    delete_keys(client, name)
    client.close()


@pytest.fixture
def gateway(prefix: str) -> Iterator[Gateway]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    env.update(
        METERING_REDIS_URL=REDIS_URL,
        METERING_REDIS_PREFIX=prefix,
        METERING_DATACENTER="dc1",
        METERING_MAX_CHANNELS_PER_CONNECTION=str(MAX_CHANNELS),
        METERING_MAX_MESSAGE_BYTES="65536",
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "listening on" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    assert ready.wait(20), "\n".join(lines)
    line = next(ln for ln in lines if "listening on" in ln)
    assert line.startswith("gateway gw-t (dc1) listening on http://127.0.0.1:")
    client = redis.Redis.from_url(REDIS_URL)
    gw = Gateway(proc, int(line.rsplit(":", 1)[1]), lines, DatacenterStore(client, prefix, "dc1"))
    yield gw
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    assert proc.stdout is not None
    proc.stdout.close()
    client.close()
    # Nothing unexpected logged (uvicorn's spurious denial error included).
    assert not [ln for ln in lines if "error" in ln.lower()], "\n".join(lines)


async def _open(url: str) -> ClientConnection:
    ws = await connect(url)
    hello = json.loads(await ws.recv())
    assert hello["action"] == "connected"
    assert hello["connectionId"]
    return ws


async def _ask(ws: ClientConnection, frame: Any) -> dict[str, Any]:
    await ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))
    reply: dict[str, Any] = json.loads(await ws.recv())
    return reply


def test_websocket_attach_publish_deliver_and_counts(gateway: Gateway) -> None:
    async def scenario() -> None:
        a, b, other = (
            await _open(gateway.ws()),
            await _open(gateway.ws()),
            await _open(gateway.ws(OTHER_APP)),
        )
        for ws in (a, b, other):
            assert await _ask(ws, {"action": "attach", "channel": "c"}) == {
                "action": "attached",
                "channel": "c",
            }
        # Attaching twice is a no-op; one more channel on a.
        assert (await _ask(a, {"action": "attach", "channel": "c"}))["action"] == "attached"
        assert (await _ask(a, {"action": "attach", "channel": "d"}))["action"] == "attached"
        assert gateway.health()["connections"] == 3
        await asyncio.to_thread(
            wait_until, lambda: gateway.live(APP, ("c", "d")) == ((2, 0, 0), [True, True])
        )
        await asyncio.to_thread(
            wait_until, lambda: gateway.live(OTHER_APP, ("c",)) == ((1, 0, 0), [True])
        )

        data = {"text": "héllo", "n": [1, 2]}
        await a.send(json.dumps({"action": "publish", "channel": "c", "data": data}))
        # The sender is attached: it gets the message, then the ack.
        assert json.loads(await a.recv()) == {"action": "message", "channel": "c", "data": data}
        assert json.loads(await a.recv()) == {"action": "published", "channel": "c"}
        assert json.loads(await b.recv()) == {"action": "message", "channel": "c", "data": data}
        # Channels are per app: the other app's "c" got nothing.
        assert (await _ask(other, {"action": "detach", "channel": "c"}))["action"] == "detached"

        # Publishing does not need an attach; detaching what is not attached is a no-op.
        reply = await _ask(b, {"action": "publish", "channel": "nobody", "data": None})
        assert reply == {"action": "published", "channel": "nobody"}
        assert (await _ask(b, {"action": "detach", "channel": "zz"}))["action"] == "detached"
        assert (await _ask(a, {"action": "detach", "channel": "d"}))["action"] == "detached"

        nbytes = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())
        expected = {
            "1|pub_n": 2,
            "1|pub_b": nbytes + len(b"null"),
            "1|del_n": 2,
            "1|del_b": 2 * nbytes,
            "1|opened": 2,
            "2|opened": 1,
        }
        await asyncio.to_thread(wait_until, lambda: gateway.counters() == expected)
        await asyncio.to_thread(
            wait_until, lambda: gateway.live(APP, ("c", "d")) == ((2, 0, 0), [True, False])
        )

        for ws in (a, b, other):
            await ws.close()
        # Each close is handled on its own: the other app's may come after this app's.
        await asyncio.to_thread(
            wait_until, lambda: gateway.live(APP, ("c",)) == ((0, 0, 0), [False])
        )
        await asyncio.to_thread(wait_until, lambda: gateway.live(OTHER_APP) == ((0, 0, 0), []))
        assert gateway.health()["connections"] == 0

    asyncio.run(scenario())


def test_unknown_or_missing_app_is_refused_before_the_upgrade(gateway: Gateway) -> None:
    async def refused(url: str) -> tuple[int, dict[str, Any]]:
        with pytest.raises(InvalidStatus) as info:
            await connect(url)
        response = info.value.response
        return response.status_code, json.loads(bytes(response.body or b""))

    async def scenario() -> None:
        for app in ("999999", "not-a-number", "1" * 21):
            status, body = await refused(gateway.ws(app))
            assert status == 404
            assert body == {
                "error": {"code": 40400, "statusCode": 404, "message": f"unknown app {app}"}
            }
        status, body = await refused(f"ws://127.0.0.1:{gateway.port}/v1/realtime")
        assert (status, body["error"]["code"]) == (400, 40000)
        status, body = await refused(gateway.ws(""))
        assert (status, body["error"]["code"]) == (400, 40000)

    asyncio.run(scenario())
    assert gateway.health()["connections"] == 0
    time.sleep(0.4)  # a flush or two: nothing was counted
    assert gateway.live() == ((0, 0, 0), [])
    assert gateway.counters() == {}


def test_bad_frames_get_an_error_and_the_connection_stays(gateway: Gateway) -> None:
    async def scenario() -> None:
        ws = await _open(gateway.ws())
        cases: list[tuple[Any, int]] = [
            ("{not json", 40000),
            ('["a list"]', 40000),
            ('{"n": NaN}', 40000),
            ({"action": "dance"}, 40000),
            ({"no": "action"}, 40000),
            (b"\x00binary", 40000),
            ({"action": "attach"}, 40010),
            ({"action": "attach", "channel": ""}, 40010),
            ({"action": "attach", "channel": 7}, 40010),
            ({"action": "attach", "channel": "x" * 257}, 40010),
            ({"action": "attach", "channel": "new\nline"}, 40010),
            ({"action": "detach", "channel": ""}, 40010),
            ({"action": "publish", "channel": "c"}, 40000),
            ({"action": "publish", "data": 1}, 40010),
            ({"action": "publish", "channel": "c", "data": "x" * 70_000}, 40009),
            ('{"action": "publish", "channel": "c", "data": "\\ud800"}', 40000),
        ]
        for frame, code in cases:
            reply = await _ask(ws, frame)
            assert reply["action"] == "error", frame
            assert reply["error"]["code"] == code, (frame, reply)
            assert reply["error"]["message"]

        for i in range(MAX_CHANNELS):
            assert (await _ask(ws, {"action": "attach", "channel": f"c{i}"}))[
                "action"
            ] == "attached"
        reply = await _ask(ws, {"action": "attach", "channel": "one-too-many"})
        assert reply["error"]["code"] == 40010
        assert "too many channels" in reply["error"]["message"]
        # Still the same, usable connection.
        reply = await _ask(ws, {"action": "publish", "channel": "c0", "data": "ok"})
        assert reply == {"action": "message", "channel": "c0", "data": "ok"}
        assert gateway.health()["connections"] == 1
        await ws.close()

    asyncio.run(scenario())
    wait_until(lambda: gateway.live() == ((0, 0, 0), []))
    counters = gateway.counters()
    assert (counters["1|pub_n"], counters["1|del_n"], counters["1|opened"]) == (1, 1, 1)


def test_an_oversized_frame_closes_with_1009_and_counts_the_close_once(gateway: Gateway) -> None:
    async def scenario() -> None:
        keep, big = await _open(gateway.ws()), await _open(gateway.ws())
        await _ask(big, {"action": "attach", "channel": "c"})
        await _ask(keep, {"action": "attach", "channel": "c"})
        await asyncio.to_thread(wait_until, lambda: gateway.live(APP, ("c",))[0] == (2, 0, 0))
        await big.send(json.dumps({"action": "publish", "channel": "c", "data": "x" * 200_000}))
        with pytest.raises(ConnectionClosed) as closed:
            await big.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        await asyncio.to_thread(
            wait_until, lambda: gateway.live(APP, ("c",)) == ((1, 0, 0), [True])
        )
        assert gateway.health()["connections"] == 1
        await keep.close()
        await asyncio.to_thread(
            wait_until, lambda: gateway.live(APP, ("c",)) == ((0, 0, 0), [False])
        )

    asyncio.run(scenario())
    assert gateway.counters().get("1|pub_n", 0) == 0


def test_event_stream_is_a_streaming_connection(gateway: Gateway) -> None:
    url = f"{gateway.http}/v1/stream?app={APP}&channel=c&channel=d&channel=c"
    with httpx.Client(timeout=10) as http, http.stream("GET", url) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        assert next(lines) == "event: connected"
        hello = json.loads(next(lines).removeprefix("data: "))
        assert hello["channels"] == ["c", "d"]
        assert next(lines) == ""
        wait_until(lambda: gateway.live(APP, ("c", "d")) == ((0, 1, 0), [True, True]))
        assert gateway.health()["connections"] == 1

        posted = http.post(
            f"{gateway.http}/v1/apps/{APP}/messages", json={"channel": "d", "data": {"a": 1}}
        )
        assert posted.status_code == 201
        assert posted.json() == {"channel": "d", "published": 1, "delivered": 1}
        assert next(lines) == "event: message"
        message = json.loads(next(lines).removeprefix("data: "))
        assert message == {"action": "message", "channel": "d", "data": {"a": 1}}

    wait_until(lambda: gateway.live(APP, ("c", "d")) == ((0, 0, 0), [False, False]))
    assert gateway.health()["connections"] == 0

    for query, status, code in [
        ("app=999", 404, 40400),
        ("channel=c", 400, 40000),
        (f"app={APP}&channel=", 400, 40010),
        (f"app={APP}&" + "&".join(f"channel=c{i}" for i in range(MAX_CHANNELS + 1)), 400, 40010),
    ]:
        response = httpx.get(f"{gateway.http}/v1/stream?{query}", timeout=5)
        assert response.status_code == status, query
        assert response.json()["error"]["code"] == code, query
    assert gateway.counters()["1|opened"] == 1


def test_rest_publish(gateway: Gateway) -> None:
    url = f"{gateway.http}/v1/apps/{APP}/messages"

    async def scenario() -> None:
        subscribers = [await _open(gateway.ws()) for _ in range(3)]
        for ws in subscribers:
            await _ask(ws, {"action": "attach", "channel": "c"})
        async with httpx.AsyncClient(timeout=10) as http:
            one = await http.post(url, json={"channel": "c", "data": "hi"})
            assert (one.status_code, one.json()) == (
                201,
                {"channel": "c", "published": 1, "delivered": 3},
            )
            batch = [{"channel": "c", "data": i} for i in range(2)] + [{"channel": "e", "data": 0}]
            many = await http.post(url, json=batch)
            assert many.status_code == 201
            assert many.json() == {
                "published": 3,
                "delivered": 6,
                "messages": [
                    {"channel": "c", "delivered": 3},
                    {"channel": "c", "delivered": 3},
                    {"channel": "e", "delivered": 0},
                ],
            }
            for ws in subscribers:
                got = [json.loads(await ws.recv())["data"] for _ in range(3)]
                assert got == ["hi", 0, 1]

            for body, status, code in [
                (b"{oops", 400, 40000),
                (b"[]", 400, 40000),
                (json.dumps([{"channel": "c", "data": 1}] * 101).encode(), 400, 40000),
                (b'{"channel": "c"}', 400, 40000),
                (b'{"channel": "", "data": 1}', 400, 40010),
                # One bad message: none of the batch is published.
                (b'[{"channel": "c", "data": 1}, {"channel": 5, "data": 1}]', 400, 40010),
                (json.dumps({"channel": "c", "data": "x" * 70_000}).encode(), 413, 40009),
                (b"x" * 20_000_000, 413, 40009),
            ]:
                response = await http.post(url, content=body)
                assert response.status_code == status, body[:80]
                assert response.json()["error"] == {
                    "code": code,
                    "statusCode": status,
                    "message": response.json()["error"]["message"],
                }
            unknown = await http.post(
                f"{gateway.http}/v1/apps/424242/messages", json={"channel": "c", "data": 1}
            )
            assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, 40400)
        for ws in subscribers:
            await ws.close()

    asyncio.run(scenario())
    expected = {"1|pub_n": 4, "1|pub_b": 4 + 3, "1|del_n": 9, "1|del_b": 3 * 4 + 6}
    counters = wait_until(lambda: (c := gateway.counters()) and c.get("1|del_n") == 9 and c)
    assert {k: counters[k] for k in expected} == expected
    assert counters["1|opened"] == 3  # REST publishes are never connections


def test_attaches_and_publishes_refused_by_the_limits_are_answered_and_counted(
    gateway: Gateway, prefix: str
) -> None:
    """Enforcement refuses a new channel (40114) and publishing (40112) for the apps' account:
    each channel attach refused counts as ``ch_refused``, each message as ``msg_refused`` (a
    refused REST batch: every message in it); a publish refused for a bad request counts none."""
    client = redis.Redis.from_url(REDIS_URL)
    # The account holds 1 channel, its hard limit, on another frontend that stays alive;
    # a tick counted it, and told the gateways.
    other = Meter(DatacenterStore(client, prefix, "dc1"), "gw-other", flush_interval=0.1)
    other.connection_opened(APP)
    other.channel_attached(APP, "held")
    other.start()
    tick(GlobalStore(client, prefix), {"dc1": other.store}, liveness_timeout=3, sample_retention=9)
    limits = AdmissionStore(client, prefix)
    limits.write_live({1: (1, 1)})
    month = datetime.now(UTC).strftime("%Y-%m")
    limits.write(
        {
            1: AdmissionRow(
                channels_hard=1, publish_blocked_month=month, publish_blocked_by="messages"
            )
        }
    )
    url = f"{gateway.http}/v1/apps/{APP}/messages"

    async def scenario() -> None:
        ws = await _open(gateway.ws())
        # The notice reaches the gateway in a moment: until then attaches go through.
        for i in itertools.count():
            reply = await _ask(ws, {"action": "attach", "channel": f"early{i}"})
            if reply["action"] != "attached":
                break
        assert reply["error"]["code"] == 40114
        reply = await _ask(ws, {"action": "attach", "channel": "x"})
        assert (reply["action"], reply["error"]["code"]) == ("error", 40114)
        reply = await _ask(ws, {"action": "publish", "channel": "x", "data": 1})
        assert (reply["action"], reply["error"]["code"]) == ("error", 40112)
        async with httpx.AsyncClient(timeout=10) as http:
            batch = await http.post(url, json=[{"channel": "c", "data": i} for i in range(3)])
            assert (batch.status_code, batch.json()["error"]["code"]) == (403, 40112)
            bad = await http.post(url, json=[{"channel": "c", "data": 1}, {"channel": 5}])
            assert bad.status_code == 400  # refused as malformed, before the limits
        await ws.close()

    try:
        asyncio.run(scenario())
        # No tick runs here. Its next live counts would still say 1 channel, while this
        # gateway took off the early channels it released when the socket closed (the
        # attaches it let in before the account's limits reached it): restate them as a
        # tick would.
        limits.write_live({1: (1, 1)})
        _refused_stream(gateway)
    finally:
        other.close()
        client.close()


def _refused_stream(gateway: Gateway) -> None:
    # A stream refused on its channel (the other app, the same account) ends with the error.
    # One let in before the restated counts reached the gateway stays open: closed, tried again.
    stream_url = f"{gateway.http}/v1/stream?app={OTHER_APP}&channel=y"

    def refused() -> bool:
        try:
            with httpx.Client(timeout=2) as http, http.stream("GET", stream_url) as stream:
                return "40114" in stream.read().decode()
        except httpx.ReadTimeout:
            return False

    wait_until(refused, timeout=15)
    expected = {"1|ch_refused": 2, "1|msg_refused": 4, "2|ch_refused": 1}
    counters = wait_until(lambda: (c := gateway.counters()).get("2|ch_refused") and c)
    assert {k: v for k, v in counters.items() if "refused" in k} == expected
    assert "1|pub_n" not in counters  # nothing refused was published


def test_sigterm_closes_the_clients_and_deregisters_at_once(gateway: Gateway) -> None:
    async def scenario() -> None:
        ws = await _open(gateway.ws())
        await _ask(ws, {"action": "attach", "channel": "c"})
        url = f"{gateway.http}/v1/stream?app={APP}&channel=c"
        async with httpx.AsyncClient(timeout=10) as http, http.stream("GET", url) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            hello = [await anext(lines) for _ in range(3)]
            assert hello[0] == "event: connected"
            await asyncio.to_thread(
                wait_until, lambda: gateway.live(APP, ("c",)) == ((1, 1, 0), [True])
            )
            assert len(gateway.store.incarnations()) == 1
            started = time.monotonic()
            gateway.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
            # The event stream ends too: the server finishes the response.
            rest = [line async for line in lines]
            assert all(line in ("", ": ping") for line in rest)
        await asyncio.to_thread(gateway.proc.wait, 10)
        took = time.monotonic() - started
        assert took < 3, f"shutdown took {took:.2f}s"
        # Gone at once, not after the liveness timeout.
        assert gateway.store.incarnations() == {}
        assert gateway.live(APP, ("c",)) == ((0, 0, 0), [False])

    asyncio.run(scenario())


# -- AppRegistry, in process -------------------------------------------------------------


def test_app_ids_are_decimal_strings() -> None:
    assert valid_app_id("1")
    assert valid_app_id("9" * 20)
    for bad in ("", "9" * 21, "-1", "1.0", " 1", "x", "\u0661", "\u00b2"):
        assert not valid_app_id(bad), bad


@pytest.fixture
def registry_store() -> Iterator[RegistryStore]:
    client = redis.Redis.from_url(REDIS_URL)
    name = f"t{uuid.uuid4().hex[:8]}"
    yield RegistryStore(client, name)
    delete_keys(client, name)
    client.close()


def test_registry_resolves_caches_and_remembers_misses(registry_store: RegistryStore) -> None:
    store = registry_store
    store.publish({1: 10}, replace=True)
    registry = AppRegistry(store, refresh_interval=3600, negative_ttl=0.2)
    registry.start()
    try:

        async def scenario() -> None:
            assert await registry.resolve("1") == 10
            assert registry.lookups == 0  # loaded at start

            store.publish({2: 20})  # created after the load: found by one lookup
            assert await asyncio.gather(*(registry.resolve("2") for _ in range(5))) == [20] * 5
            assert registry.lookups == 1
            assert await registry.resolve("2") == 20
            assert registry.lookups == 1
            assert registry.apps_of(20) == ("2",)

            for _ in range(10):
                assert await registry.resolve("3") is None
            assert registry.lookups == 2  # the miss is remembered
            for bad in ("x", "", "1" * 21, "-3"):
                assert await registry.resolve(bad) is None
            assert registry.lookups == 2  # invalid ids are never looked up

            store.publish({3: 30})
            assert await registry.resolve("3") is None  # still remembered as missing...
            await asyncio.sleep(0.25)
            assert await registry.resolve("3") == 30  # ...for a short while only
            assert registry.lookups == 3

        asyncio.run(scenario())
    finally:
        registry.close()


def test_registry_without_redis_keeps_known_apps_and_cannot_tell_the_rest(
    registry_store: RegistryStore,
) -> None:
    store = registry_store
    store.publish({1: 10}, replace=True)
    registry = AppRegistry(store, refresh_interval=0.05)
    registry.start()
    real = store.client
    try:
        store.client = redis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens there
        time.sleep(0.2)  # refreshes fail; the loaded copy stays

        async def scenario() -> None:
            assert await registry.resolve("1") == 10
            with pytest.raises(RegistryUnavailable):  # unknown is not what Redis down says
                await registry.resolve("2")

        asyncio.run(scenario())
        assert registry.lookups == 1
    finally:
        registry.close()
        store.client.close()
        store.client = real


def test_an_emptied_mirror_is_no_evidence_that_an_app_is_unknown(
    registry_store: RegistryStore,
) -> None:
    store = registry_store
    store.publish({1: 10, 2: 10}, replace=True)
    registry = AppRegistry(store, refresh_interval=0.05, refill_wait=1.0)
    registry.start()
    try:
        # Redis restarted empty; the next refresh sees nothing, then only a newly made app.
        store.client.delete(store.key, store.synced_key)
        time.sleep(0.2)
        store.publish({4: 40})
        time.sleep(0.2)
        assert not store.complete()

        async def scenario() -> None:
            assert [await registry.resolve(a) for a in ("1", "2", "4")] == [10, 10, 40]
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable):  # not in the copy: cannot tell yet
                await registry.resolve("3")
            assert time.monotonic() - started >= 0.9  # it waited for a refill first

            async def refill() -> None:
                await asyncio.sleep(0.3)
                await asyncio.to_thread(store.publish, {1: 10, 2: 10, 3: 30, 4: 40}, replace=True)

            waiting = asyncio.ensure_future(registry.resolve("3"))
            await refill()
            assert await waiting == 30  # refilled while it waited
            assert await registry.resolve("5") is None  # the complete mirror lacks it: unknown

        asyncio.run(scenario())
    finally:
        registry.close()
