"""A load generator of real WebSocket clients, for demos and soak runs (``metering simulate``).

Every connection it opens, the publisher's too, keeps reading whatever the gateway sends. The
websockets library stops reading the socket of a connection whose received frames pile up
unread: its pongs go unread with them, and the keepalive (the client's or the gateway's) then
fails that connection with an internal error.

Whatever stops a run early is a :class:`SimulationError`, its message one line for the user.
A connection the gateway refuses for the account's limits is part of the load, not an error:
it is counted as refused, and a request it rejects (an ``error`` frame) as rejected.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)
from websockets.uri import parse_uri

from metering.core.ids import is_id

T = TypeVar("T")

MAX_CONNECTIONS: Final = 10_000
MIN_DURATION: Final = 0.5  # seconds
OPEN_TIMEOUT: Final = 10.0  # seconds for a WebSocket handshake
CLOSE_TIMEOUT: Final = 5.0  # seconds for a closing handshake, so that stopping is bounded
TICK: Final = 0.1  # seconds between rounds of publishing


class SimulationError(Exception):
    """What stopped a run (or kept it from starting): its message is one line."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class Interrupted(SimulationError):
    """Ctrl-C: the run stopped early; ``summary`` is what it did until then."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__("interrupted (Ctrl-C)", exit_code=130)
        self.summary = summary


def check_arguments(
    *,
    gateway_url: str,
    app_id: int,
    connections: int,
    duration: float,
    churn: float,
    channels: int,
    publish_rate: float,
) -> str:
    """The realtime URL to connect to; raises :class:`SimulationError` (a usage error) naming
    the first argument out of range."""

    def bad(message: str) -> SimulationError:
        return SimulationError(message, exit_code=2)

    if not is_id(app_id):
        raise bad(f"--app must be an app's id (a positive number), got {app_id}")
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise bad(f"--connections must be 1 to {MAX_CONNECTIONS}, got {connections}")
    if not (math.isfinite(duration) and duration >= MIN_DURATION):
        raise bad(f"--duration must be at least {MIN_DURATION} seconds, got {duration}")
    if not 0.0 <= churn <= 1.0:  # NaN fails both
        raise bad(f"--churn must be a share from 0 to 1, got {churn}")
    if channels < 1:
        raise bad(f"--channels must be at least 1, got {channels}")
    if not (math.isfinite(publish_rate) and publish_rate >= 0):
        raise bad(f"--publish-rate must be 0 or more messages per second, got {publish_rate}")
    base = gateway_url.strip()
    if not base.startswith(("ws://", "wss://")):
        raise bad(f"--gateway must be a ws:// or wss:// URL, got {gateway_url!r}")
    url = f"{base.rstrip('/')}/v1/realtime?app={app_id}"
    try:
        parse_uri(url)
    except (InvalidURI, ValueError):  # ValueError: a port out of range
        raise bad(f"--gateway is not a valid URL: {gateway_url!r}") from None
    return url


class _Stats:
    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.refused = 0
        self.rejected = 0
        self.published = 0
        self.received = 0

    def summary(self) -> dict[str, Any]:
        return {
            "opened": self.opened,
            "closed": self.closed,
            "refused": self.refused,
            "rejected": self.rejected,
            "published": self.published,
            "received": self.received,
        }


class _Refused(Exception):
    """A connection refused by the account's limits: counted, the run goes on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(exc: InvalidStatus) -> tuple[int, int | None, str]:
    """The HTTP status, and the gateway's error code and message if it gave them."""
    response = exc.response
    try:
        error = json.loads(response.body or b"")["error"]
        return response.status_code, int(error["code"]), str(error["message"])
    except (ValueError, TypeError, KeyError):
        # Not our gateway's JSON: something else answers there.
        return response.status_code, None, response.reason_phrase


def _describe_close(exc: ConnectionClosed) -> str:
    """Who ended a connection we did not close, and with what code and reason."""
    if exc.rcvd is not None:
        return f"the gateway closed a connection: {exc.rcvd}"
    if exc.sent is not None:
        # Our side gave up on it, e.g. the gateway stopped answering the keepalive pings.
        return f"a connection to the gateway failed: sent {exc.sent}"
    return "the gateway dropped a connection without closing it (no close frame)"


class _Connection:
    """One WebSocket and the task that reads everything it receives."""

    def __init__(self, ws: ClientConnection, sim: _Simulation) -> None:
        self.ws = ws
        self.closing = False  # set before we close it: its end is then no error
        self.reader = asyncio.create_task(sim.drain(self))

    async def close(self) -> None:
        self.closing = True
        await self.ws.close()
        # The reader ends with the connection; it was reading until the close frame came.
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class _Simulation:
    def __init__(self, url: str, progress: Callable[[str], None]) -> None:
        self.url = url
        self.progress = progress
        self.stats = _Stats()
        self.failure: SimulationError | None = None
        self.interrupted = False
        self.wake = asyncio.Event()  # set on a failure or Ctrl-C: the run stops early
        self.tasks: set[asyncio.Task[None]] = set()
        self._noticed: set[tuple[str, int | None]] = set()

    def fail(self, error: SimulationError) -> None:
        """Stop the run with ``error``; the first one is what it reports. After Ctrl-C,
        connections ending are the run stopping, not what stopped it."""
        if self.failure is None and not self.interrupted:
            self.failure = error
        self.wake.set()

    def notice(self, kind: str, code: int | None, line: str) -> None:
        """A line the first time each kind of refusal happens; later ones are only counted."""
        if (kind, code) not in self._noticed:
            self._noticed.add((kind, code))
            self.progress(line)

    async def unless_stopped(self, step: Awaitable[T]) -> T | None:
        """``step``'s result, or None if the run stops first (``step`` is then cancelled)."""
        task = asyncio.ensure_future(step)
        waking = asyncio.ensure_future(self.wake.wait())
        try:
            await asyncio.wait({task, waking}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waking.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            return None
        return task.result()

    async def open(self) -> _Connection:
        """A new connection; raises :class:`_Refused` or :class:`SimulationError`."""
        try:
            ws = await connect(self.url, open_timeout=OPEN_TIMEOUT, close_timeout=CLOSE_TIMEOUT)
        except InvalidStatus as exc:
            status, code, message = _refusal(exc)
            shown = f"HTTP {status}" + (f", code {code}" if code is not None else "")
            if code is None and status >= 500:
                raise SimulationError(
                    f"the gateway failed the WebSocket handshake: {shown} {message}"
                ) from None
            if code is None:
                raise SimulationError(
                    f"{self._base()} refused the WebSocket connection: {shown} {message} "
                    "(is it a gateway's address?)"
                ) from None
            if status == 403:
                raise _Refused(code, f"{shown}: {message}") from None
            raise SimulationError(
                f"the gateway refused the connection: {shown}: {message}"
            ) from None
        except TimeoutError:
            raise SimulationError(
                f"the gateway at {self._base()} did not complete the WebSocket handshake in time"
            ) from None
        except InvalidHandshake as exc:
            raise SimulationError(f"{self.url} is not a WebSocket gateway: {exc}") from None
        except OSError as exc:
            reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
            if isinstance(exc, ConnectionRefusedError):
                reason = "connection refused"
            raise SimulationError(f"cannot reach the gateway at {self._base()}: {reason}") from None
        return _Connection(ws, self)

    def _base(self) -> str:
        return self.url.split("/v1/realtime", 1)[0]

    async def drain(self, conn: _Connection) -> None:
        """Read every frame until the connection ends; an end we did not ask for fails the
        run."""
        try:
            async for raw in conn.ws:
                self._frame(raw)
        except ConnectionClosed:
            pass  # told apart below, with the clean ends
        if not conn.closing:
            exc = conn.ws.protocol.close_exc
            self.fail(SimulationError(_describe_close(exc)))

    def _frame(self, raw: str | bytes) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            return  # not a frame of ours: nothing to count
        if not isinstance(frame, dict):
            return
        action = frame.get("action")
        if action == "message":
            self.stats.received += 1
        elif action == "error":
            self.stats.rejected += 1
            error = frame.get("error")
            error = error if isinstance(error, dict) else {}
            code = error.get("code") if isinstance(error.get("code"), int) else None
            what = f"code {code}: {error.get('message', '')}" if code else str(error)
            self.notice("rejected", code, f"the gateway rejects requests (counted): {what}")

    def spawn(self, channel: str) -> asyncio.Event:
        """Start a client attached to ``channel``; it closes once the event is set."""
        stop = asyncio.Event()
        task = asyncio.create_task(self._client(channel, stop))
        self.tasks.add(task)
        task.add_done_callback(self._ended)
        return stop

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.fail(SimulationError(f"a client failed: {type(exc).__name__}: {exc}"))

    async def _client(self, channel: str, stop: asyncio.Event) -> None:
        try:
            conn = await self.open()
        except _Refused as refused:
            self.stats.refused += 1
            self.notice(
                "refused",
                refused.code,
                f"the gateway refuses connections (counted): {refused.message}",
            )
            return
        except SimulationError as exc:
            self.fail(exc)
            return
        self.stats.opened += 1
        try:
            await conn.ws.send(json.dumps({"action": "attach", "channel": channel}))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({conn.reader, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
        except ConnectionClosed:
            pass  # the reader tells why
        finally:
            await conn.close()
            self.stats.closed += 1


async def _run(
    *,
    gateway_url: str,
    app_id: int,
    connections: int,
    duration: float,
    churn: float,
    channels: int,
    publish_rate: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    url = check_arguments(
        gateway_url=gateway_url,
        app_id=app_id,
        connections=connections,
        duration=duration,
        churn=churn,
        channels=channels,
        publish_rate=publish_rate,
    )
    sim = _Simulation(url, progress)
    main = asyncio.current_task()
    assert main is not None

    def on_interrupt() -> None:
        if sim.interrupted:
            main.cancel()  # a second Ctrl-C: stop without waiting for the connections
        sim.interrupted = True
        sim.wake.set()

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers here
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        await _drive(sim, connections, duration, churn, channels, publish_rate)
    except asyncio.CancelledError:
        if not sim.interrupted:
            raise
        raise Interrupted(sim.stats.summary()) from None
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
    if sim.failure is not None:
        raise sim.failure
    if sim.interrupted:
        raise Interrupted(sim.stats.summary())
    return sim.stats.summary()


async def _drive(  # noqa: PLR0917 (the run's shape, as given)
    sim: _Simulation,
    connections: int,
    duration: float,
    churn: float,
    channels: int,
    publish_rate: float,
) -> None:
    stats = sim.stats
    rng = random.Random(0)  # noqa: S311 (load shape, not security)
    # The publisher first: if the gateway refuses it, nothing else would do better.
    try:
        publisher = await sim.unless_stopped(sim.open())
    except _Refused as refused:
        raise SimulationError(f"the gateway refused the connection: {refused.message}") from None
    if publisher is None:
        return
    live = [sim.spawn(f"sim-{rng.randrange(channels)}") for _ in range(connections)]
    started = time.monotonic()
    deadline = started + duration
    next_report = started + 1
    carry = 0.0
    try:
        while not sim.wake.is_set() and (now := time.monotonic()) < deadline:
            carry += publish_rate * TICK
            while carry >= 1 and not sim.wake.is_set() and time.monotonic() < deadline:
                carry -= 1
                msg = {
                    "action": "publish",
                    "channel": f"sim-{rng.randrange(channels)}",
                    "data": "x",
                }
                try:
                    await publisher.ws.send(json.dumps(msg))
                except ConnectionClosed:
                    await publisher.reader  # which fails the run with why it closed
                    break
                stats.published += 1
            if now >= next_report:
                next_report += 1
                for _ in range(int(len(live) * churn)):
                    live.pop(rng.randrange(len(live))).set()
                    live.append(sim.spawn(f"sim-{rng.randrange(channels)}"))
                sim.progress(
                    f"t={now - started:4.0f}s open={stats.opened - stats.closed} "
                    f"opened={stats.opened} closed={stats.closed} refused={stats.refused} "
                    f"rejected={stats.rejected} published={stats.published} "
                    f"received={stats.received}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sim.wake.wait(), TICK)
    finally:
        for stop in live:
            stop.set()
        # Replaced clients may still be closing: every one is waited for, not only the live.
        while sim.tasks:
            await asyncio.gather(*sim.tasks, return_exceptions=True)
        await publisher.close()


def simulate(**kwargs: Any) -> dict[str, Any]:
    """Run a simulation (see :func:`_run` for the arguments); returns the summary."""
    return asyncio.run(_run(**kwargs))
