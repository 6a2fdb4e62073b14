"""Real WebSocket clients on real gateway processes, counted by a real API process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.conftest import Admin, Env
from tests.factories import tenant

LIVENESS_TIMEOUT = 3.0


class Clients:
    """WebSocket clients held open on a background event loop, as real users would."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.open: list[ClientConnection] = []

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def connect(self, port: int, app_id: int, n: int = 1) -> list[ClientConnection]:
        async def one() -> ClientConnection:
            ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?app={app_id}")
            hello = json.loads(await ws.recv())
            assert hello["action"] == "connected"
            return ws

        async def many() -> list[ClientConnection]:
            return list(await asyncio.gather(*(one() for _ in range(n))))

        made = self.run(many())
        self.open.extend(made)
        return made

    def close(self, conns: list[ClientConnection]) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(ws.close() for ws in conns))

        self.run(close_all())
        for ws in conns:
            self.open.remove(ws)

    def request(self, ws: ClientConnection, frame: str) -> dict:  # type: ignore[type-arg]
        async def go() -> dict:  # type: ignore[type-arg]
            await ws.send(frame)
            reply: dict = json.loads(await ws.recv())  # type: ignore[type-arg]
            return reply

        return self.run(go())

    def shutdown(self) -> None:
        async def close_all() -> None:
            for ws in self.open:
                with contextlib.suppress(Exception):
                    await ws.close()

        self.run(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    c.shutdown()


def test_the_count_is_the_open_websockets_not_streams_or_rest(
    env: Env, api_port: int, start_gateway, clients: Clients
) -> None:
    t = tenant("platform")
    admin = Admin(api_port, t.key)
    gw_a, gw_b = start_gateway("gw-a"), start_gateway("gw-b")
    clients.connect(gw_a.port, t.app_id, 4)
    on_b = clients.connect(gw_b.port, t.app_id, 3)
    admin.wait_for(7)

    with contextlib.ExitStack() as stack:
        # Two server-sent-event streams: realtime connections, but not WebSockets.
        http = stack.enter_context(httpx.Client(timeout=10))
        for _ in range(2):
            stream = stack.enter_context(
                http.stream(
                    "GET", f"http://127.0.0.1:{gw_a.port}/v1/stream?app={t.app_id}&channel=c"
                )
            )
            assert stream.status_code == 200
            next(stream.iter_lines())
        for _ in range(3):
            posted = httpx.post(
                f"http://127.0.0.1:{gw_b.port}/v1/apps/{t.app_id}/messages",
                json={"channel": "c", "data": "hello"},
            )
            assert posted.status_code == 201
        time.sleep(1.0)  # several flushes: had they counted, it would show by now
        assert admin.count() == 7

    clients.close(on_b[:2])
    admin.wait_for(5)


def test_a_killed_gateway_leaves_the_count_within_the_liveness_timeout(
    env: Env, api_port: int, start_gateway, clients: Clients
) -> None:
    t = tenant("platform")
    admin = Admin(api_port, t.key)
    survivor, victim = start_gateway("gw-survivor"), start_gateway("gw-victim")
    clients.connect(survivor.port, t.app_id, 2)
    clients.connect(victim.port, t.app_id, 5)
    admin.wait_for(7)

    victim.kill()  # SIGKILL: nothing on that process cooperates
    elapsed = admin.wait_for(2, timeout=LIVENESS_TIMEOUT + 2, poll=0.01)
    # Within the timeout of its last heartbeat (before the kill), plus the API's 50 ms read
    # reuse and the measurement's own round trips.
    assert elapsed <= LIVENESS_TIMEOUT + 0.2, f"took {elapsed:.2f}s"
    time.sleep(0.5)
    assert admin.count() == 2


def test_a_gateway_restarted_under_the_same_id_does_not_double_count(
    env: Env, api_port: int, start_gateway, clients: Clients
) -> None:
    t = tenant("platform")
    admin = Admin(api_port, t.key)
    first = start_gateway("gw-same")
    clients.connect(first.port, t.app_id, 4)
    admin.wait_for(4)

    first.kill()
    second = start_gateway("gw-same")
    clients.connect(second.port, t.app_id, 4)  # the users reconnect at once
    seen = []
    deadline = time.monotonic() + LIVENESS_TIMEOUT + 1.5
    while time.monotonic() < deadline:
        seen.append(admin.count())
        time.sleep(0.05)
    assert max(seen) <= 4, f"double counted: {max(seen)}"
    assert seen[-1] == 4


def test_a_clean_shutdown_removes_the_gateways_counts_at_once(
    env: Env, api_port: int, start_gateway, clients: Clients
) -> None:
    t = tenant("platform")
    admin = Admin(api_port, t.key)
    gw = start_gateway("gw-clean")
    clients.connect(gw.port, t.app_id, 3)
    admin.wait_for(3)
    gw.stop()
    assert admin.wait_for(0, timeout=2) < 1.0


def test_bad_input_gets_a_clear_error_and_counts_nothing_twice(
    env: Env, api_port: int, start_gateway, clients: Clients
) -> None:
    t = tenant("platform")
    admin = Admin(api_port, t.key)
    gw = start_gateway("gw-bad")

    async def attempt(app: str) -> None:
        await connect(f"ws://127.0.0.1:{gw.port}/v1/realtime?app={app}")

    for app, status in (("999999", 404), ("not-a-number", 404), ("", 400)):
        with pytest.raises(InvalidStatus) as refused:
            clients.run(attempt(app))
        assert refused.value.response.status_code == status

    (ws,) = clients.connect(gw.port, t.app_id, 1)
    for frame, code in [
        ("{not json", 40000),
        ('["a list"]', 40000),
        ('{"action": "dance"}', 40000),
        ('{"action": "attach"}', 40010),
        ('{"action": "attach", "channel": ""}', 40010),
        (json.dumps({"action": "publish", "channel": "c", "data": "x" * 70_000}), 40009),
    ]:
        reply = clients.request(ws, frame)
        assert reply["action"] == "error", frame
        assert reply["error"]["code"] == code, frame
    # Still one connection, still usable.
    assert clients.request(ws, '{"action": "attach", "channel": "c"}')["action"] == "attached"
    assert admin.count() == 1

    rest = httpx.post(f"http://127.0.0.1:{gw.port}/v1/apps/{t.app_id}/messages", content=b"{oops")
    assert rest.status_code == 400
    assert rest.json()["error"]["code"] == 40000
    rest = httpx.post(
        f"http://127.0.0.1:{gw.port}/v1/apps/424242/messages", json={"channel": "c", "data": 1}
    )
    assert rest.status_code == 404
