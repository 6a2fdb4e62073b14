"""The example realtime gateway: WebSocket, server-sent events and REST publish on the SDK.

A real server for tests and demos, and a reference for embedding the :class:`Meter`. Every
realtime connection (a WebSocket, an event stream) is counted from the moment it is open until
it closes, exactly once whatever ends it; REST publishes are never connections. Channels are
per app. Messages fan out to the connections attached on *this* gateway only.

The size of a message (its ``nbytes``, checked against ``max_message_bytes`` and counted as
published and delivered bytes) is the length in bytes of the UTF-8, compact JSON encoding of
its ``data`` (``json.dumps(data, separators=(",", ":"), ensure_ascii=False)``), the same text
that is sent to the subscribers inside their ``message`` frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from metering.accounts.store import RegistryStore
from metering.core import redis as redis_clients
from metering.core.logging import get_logger
from metering.core.settings import Settings
from metering.gateway.admission import Admission, Check, Evidence
from metering.gateway.registry import AppRegistry, RegistryUnavailable
from metering.gateway.sdk import Meter
from metering.limits.store import AdmissionStore
from metering.live.store import DatacenterStore, Transport
from metering.live.wiring import datacenter_stores, global_store

log = get_logger(__name__)

# Error codes: the HTTP status times 100, plus a detail.
BAD_REQUEST: Final = 40000
TOO_LARGE: Final = 40009
BAD_CHANNEL: Final = 40010
UNKNOWN_APP: Final = 40400
SHUTTING_DOWN: Final = 50300
REGISTRY_UNAVAILABLE: Final = 50301

MAX_BATCH: Final = 100  # messages in one REST publish
QUEUE_FRAMES: Final = 1024  # frames waiting for one client before it is dropped as too slow
HEARTBEAT: Final = 15.0  # seconds between ": ping" comments on an event stream
DRAIN_TIMEOUT: Final = 5.0  # seconds a shutdown waits for the connections to close
GRACEFUL_TIMEOUT: Final = 5  # then seconds uvicorn waits for the last requests, before cancelling

GOING_AWAY: Final = 1001
POLICY_VIOLATION: Final = 1008

# Control characters, and lone surrogates (valid JSON escapes that UTF-8 cannot encode).
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def encode(value: Any) -> str:
    """Compact JSON: the encoding every frame uses, and that message sizes are measured in."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: Python accepts them, JSON not


def _parse(text: str | bytes) -> Any:
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise Rejected(BAD_REQUEST, "malformed JSON") from exc


def max_frame_bytes(settings: Settings) -> int:
    """The hard cap on one WebSocket frame: a frame above it closes the connection (1009)."""
    return 2 * settings.max_message_bytes + 4096


class Rejected(Exception):
    """Bad input: answered with an error, nothing counted."""

    def __init__(self, code: int, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def error_response(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "statusCode": status, "message": message}}, status_code=status
    )


def _error_frame(code: int, message: str) -> str:
    return encode({"action": "error", "error": {"code": code, "message": message}})


def _sse(event: str, data: str) -> str:
    return f"event: {event}\ndata: {data}\n\n"


class _Connection:
    """One realtime connection on this gateway and the frames waiting to be written to it."""

    __slots__ = (
        "account",
        "app",
        "channels",
        "close_code",
        "close_reason",
        "closed",
        "id",
        "queue",
        "transport",
        "writer",
    )

    def __init__(self, app: str, account: int, transport: Transport) -> None:
        self.id = secrets.token_urlsafe(12)
        self.app = app
        self.account = account
        self.transport = transport
        self.channels: set[str] = set()
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_FRAMES)
        self.writer: asyncio.Future[None] | None = None
        self.closed = False
        self.close_code: int | None = None  # set when the gateway ends it, not the client
        self.close_reason = ""

    def send(self, frame: str) -> bool:
        """Queue a frame as is; a client too slow to keep up is dropped instead of buffered."""
        if self.closed or self.close_code is not None:
            return False
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            log.info("gateway.slow_client_dropped", app=self.app, connection=self.id)
            self.stop(POLICY_VIOLATION, "too slow: messages were not read in time")
            return False
        return True

    def deliver(self, frame: str) -> bool:
        """Queue a ``message`` frame, as an event on an event stream."""
        if self.transport is Transport.STREAMING:
            frame = _sse("message", frame)
        return self.send(frame)

    def stop(self, code: int, reason: str) -> None:
        """End the connection from the server side (its handler then closes it)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if self.writer is not None:
            self.writer.cancel()


class Gateway:
    """The state of one gateway: its connections and who is attached to which channel."""

    def __init__(
        self,
        meter: Meter,
        registry: AppRegistry,
        settings: Settings,
        *,
        heartbeat: float = HEARTBEAT,
        admission: Admission | None = None,
    ) -> None:
        self.meter = meter
        self.registry = registry
        self.settings = settings
        self.admission = admission
        self.heartbeat = heartbeat
        self.connections: set[_Connection] = set()
        self.subscriptions: dict[tuple[str, str], set[_Connection]] = {}
        self.closing = False
        self._idle = asyncio.Event()  # set while no connection is open
        self._idle.set()

    # -- counting: every change of a connection or an attachment goes through these ------

    def _open(self, conn: _Connection) -> None:
        self.connections.add(conn)
        self._idle.clear()
        self.meter.connection_opened(conn.app, conn.transport)

    def _close(self, conn: _Connection) -> None:
        """Detach everything and count the close; safe to call more than once."""
        if conn.closed:
            return
        conn.closed = True
        for channel in list(conn.channels):
            self._detach(conn, channel)
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()
        self.meter.connection_closed(conn.app, conn.transport)
        if self.admission is not None:
            self.admission.connection_closed(conn.account)

    async def _attach(self, conn: _Connection, channel: str) -> None:
        if channel in conn.channels:
            return
        limit = self.settings.max_channels_per_connection
        if len(conn.channels) >= limit:
            raise Rejected(
                BAD_CHANNEL, f"too many channels attached on one connection (max {limit})"
            )
        subscribers = self.subscriptions.get((conn.app, channel))
        if not subscribers and self.admission is not None:
            # A channel new here may be a channel new to the account: one more active.
            refusal = self.admission.admit_channel(conn.account)
            if isinstance(refusal, Check):
                refusal = await self.admission.check_channel(conn.account, conn.app, channel)
                if conn.closed or channel in conn.channels:
                    return  # ended (or attached by a frame before) while the check read
            if refusal is not None:
                self.meter.channel_refused(conn.app)
                raise Rejected(refusal.code, refusal.reason, status=403)
        conn.channels.add(channel)
        self.subscriptions.setdefault((conn.app, channel), set()).add(conn)
        self.meter.channel_attached(conn.app, channel)

    def _detach(self, conn: _Connection, channel: str) -> None:
        if channel not in conn.channels:
            return
        conn.channels.discard(channel)
        key = (conn.app, channel)
        subscribers = self.subscriptions.get(key)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self.subscriptions[key]
                if self.admission is not None:
                    self.admission.channel_released(conn.account)
        self.meter.channel_detached(conn.app, channel)

    def _publish(self, app: str, channel: str, data: str, nbytes: int) -> int:
        """Fan a message (``data`` already encoded) out here; returns how many got it."""
        recipients = 0
        subscribers = self.subscriptions.get((app, channel))
        if subscribers:
            frame = f'{{"action":"message","channel":{encode(channel)},"data":{data}}}'
            for conn in subscribers:
                recipients += conn.deliver(frame)
        self.meter.message_published(app, channel, nbytes)
        if recipients:
            self.meter.message_delivered(app, channel, nbytes, count=recipients)
        return recipients

    # -- validation -----------------------------------------------------------------------

    def _channel(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise Rejected(BAD_CHANNEL, "channel must be a non-empty string")
        limit = self.settings.max_channel_length
        if len(value) > limit:
            raise Rejected(BAD_CHANNEL, f"channel longer than {limit} characters")
        if _BAD_CHARS.search(value):
            raise Rejected(BAD_CHANNEL, "channel contains control characters")
        return value

    def _message(self, message: object) -> tuple[str, str, int]:
        """A message's channel, its encoded data and the size of that (see the module doc)."""
        if not isinstance(message, dict):
            raise Rejected(BAD_REQUEST, "a message must be a JSON object")
        channel = self._channel(message.get("channel"))
        if "data" not in message:
            raise Rejected(BAD_REQUEST, "a message needs data")
        data = encode(message["data"])
        try:
            nbytes = len(data.encode())
        except UnicodeEncodeError as exc:
            raise Rejected(BAD_REQUEST, "data is not valid unicode") from exc
        limit = self.settings.max_message_bytes
        if nbytes > limit:
            raise Rejected(
                TOO_LARGE, f"message data is {nbytes} bytes, over the limit of {limit}", status=413
            )
        return channel, data, nbytes

    async def _admit(self, app: str, *, connect: bool = False) -> JSONResponse | int:
        """The app's account, or the refusal of a realtime connection (``connect``) or a
        publish for ``app``. A connection refused by the account's limits is counted."""
        if self.closing:
            return error_response(503, SHUTTING_DOWN, "gateway shutting down")
        if not app:
            return error_response(400, BAD_REQUEST, "missing app (?app=APP_ID)")
        try:
            account = await self.registry.resolve(app)
        except RegistryUnavailable as exc:
            return error_response(503, REGISTRY_UNAVAILABLE, str(exc))
        if account is None:
            return error_response(404, UNKNOWN_APP, f"unknown app {app[:64]}")
        if connect and self.admission is not None:
            refusal = self.admission.admit_connection(account)
            if isinstance(refusal, Check):
                refusal = await self.admission.check_connection(account)
            if refusal is not None:
                self.meter.connection_refused(app)
                return error_response(403, refusal.code, refusal.reason)
        return account

    def _may_publish(self, app: str, account: int, count: int = 1) -> None:
        """Refuse publishing ``count`` messages for ``app`` when its account's limits say so;
        each refused message is counted."""
        if self.admission is not None:
            refusal = self.admission.admit_message(account)
            if refusal is not None:
                self.meter.message_refused(app, count)
                raise Rejected(refusal.code, refusal.reason, status=403)

    # -- running a connection ---------------------------------------------------------------

    async def _serve(
        self,
        conn: _Connection,
        reader: Coroutine[Any, Any, None],
        write: Callable[[str], Awaitable[None]],
    ) -> None:
        """Run the reader and the writer of a connection until either ends."""

        async def pump() -> None:
            while True:
                await write(await conn.queue.get())

        conn.writer = writer = asyncio.ensure_future(pump())
        reading = asyncio.ensure_future(reader)
        if conn.close_code is not None:
            writer.cancel()
        try:
            await asyncio.wait({reading, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            reading.cancel()
            writer.cancel()
            results = await asyncio.gather(reading, writer, return_exceptions=True)
        for result in results:
            # A client gone while we wrote to it is the normal end of a connection.
            gone = isinstance(result, WebSocketDisconnect | OSError)
            if isinstance(result, Exception) and not gone:
                log.error("gateway.connection_failed", app=conn.app, error=repr(result))

    async def drain(self, grace: float = DRAIN_TIMEOUT) -> None:
        """Refuse new connections, close the open ones, wait (a while) until they are gone."""
        self.closing = True
        for conn in list(self.connections):
            conn.stop(GOING_AWAY, "gateway shutting down")
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)

    # -- WebSocket ------------------------------------------------------------------------

    async def realtime(self, websocket: WebSocket) -> None:
        app = websocket.query_params.get("app", "")
        account = await self._admit(app, connect=True)
        if not isinstance(account, int):
            if "websocket.http.response" in websocket.scope.get("extensions", {}):
                await websocket.send_denial_response(account)
            else:
                await websocket.close(POLICY_VIOLATION)  # the handshake fails with a 403
            return
        await websocket.accept()
        conn = _Connection(app, account, Transport.WEBSOCKET)
        self._open(conn)
        try:
            conn.send(encode({"action": "connected", "connectionId": conn.id}))
            await self._serve(conn, self._read_frames(websocket, conn), websocket.send_text)
        finally:
            self._close(conn)
        code = conn.close_code  # set when the gateway ended it
        if code is not None and websocket.client_state is not WebSocketState.DISCONNECTED:
            # Bounded: a client that stopped reading may never let the close frame through.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(websocket.close(code, conn.close_reason), 2)

    async def _read_frames(self, websocket: WebSocket, conn: _Connection) -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                reply = _error_frame(BAD_REQUEST, "binary frames are not supported: send JSON text")
            else:
                try:
                    reply = await self._handle(conn, text)
                except Rejected as exc:
                    reply = _error_frame(exc.code, exc.message)
            if not conn.send(reply):
                return

    async def _handle(self, conn: _Connection, text: str) -> str:
        """Act on one client frame; returns the reply."""
        frame = _parse(text)
        if not isinstance(frame, dict):
            raise Rejected(BAD_REQUEST, "a frame must be a JSON object")
        action = frame.get("action")
        if action == "publish":
            channel, data, nbytes = self._message(frame)
            self._may_publish(conn.app, conn.account)
            self._publish(conn.app, channel, data, nbytes)
            return encode({"action": "published", "channel": channel})
        if action == "attach":
            channel = self._channel(frame.get("channel"))
            await self._attach(conn, channel)
            return encode({"action": "attached", "channel": channel})
        if action == "detach":
            channel = self._channel(frame.get("channel"))
            self._detach(conn, channel)  # detaching a channel not attached is a no-op
            return encode({"action": "detached", "channel": channel})
        shown = action[:64] if isinstance(action, str) else action
        raise Rejected(BAD_REQUEST, f"unknown action {encode(shown)[:80]}")

    # -- server-sent events -----------------------------------------------------------------

    async def stream(self, request: Request) -> Response:
        app = request.query_params.get("app", "")
        account = await self._admit(app, connect=True)
        if not isinstance(account, int):
            return account
        try:
            channels = [self._channel(c) for c in request.query_params.getlist("channel")]
        except Rejected as exc:
            return error_response(400, exc.code, exc.message)
        channels = list(dict.fromkeys(channels))
        limit = self.settings.max_channels_per_connection
        if len(channels) > limit:
            message = f"too many channels on one stream (max {limit})"
            return error_response(400, BAD_CHANNEL, message)
        return _EventStream(self, app, account, channels)

    async def _watch(self, receive: Receive, conn: _Connection) -> None:
        """Until the client goes away, with a heartbeat comment now and then."""

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        gone = asyncio.ensure_future(disconnected())
        try:
            while not (await asyncio.wait({gone}, timeout=self.heartbeat))[0]:
                conn.send(": ping\n\n")
        finally:
            gone.cancel()

    # -- REST -----------------------------------------------------------------------------

    async def rest_publish(self, request: Request) -> Response:
        """Publish one message ``{"channel", "data"}`` or a list of up to 100.

        One message answers ``{"channel", "published": 1, "delivered"}``; a list answers
        ``{"published", "delivered", "messages": [{"channel", "delivered"}, ...]}``. Either
        all the messages are published, or (on any error) none.
        """
        app: str = request.path_params["app_id"]
        account = await self._admit(app)
        if not isinstance(account, int):
            return account
        body = await self._read_body(request)
        if body is None:
            return error_response(413, TOO_LARGE, "request body too large")
        try:
            parsed = _parse(body)
            messages = [self._message(m) for m in self._batch(parsed)]
            self._may_publish(app, account, len(messages))
        except Rejected as exc:
            return error_response(exc.status, exc.code, exc.message)
        delivered = [self._publish(app, *message) for message in messages]
        if not isinstance(parsed, list):
            one = {"channel": messages[0][0], "published": 1, "delivered": delivered[0]}
            return JSONResponse(one, status_code=201)
        each = [{"channel": m[0], "delivered": d} for m, d in zip(messages, delivered, strict=True)]
        return JSONResponse(
            {"published": len(messages), "delivered": sum(delivered), "messages": each},
            status_code=201,
        )

    @staticmethod
    def _batch(parsed: Any) -> list[Any]:
        if not isinstance(parsed, list):
            return [parsed]
        if not 0 < len(parsed) <= MAX_BATCH:
            raise Rejected(BAD_REQUEST, f"send between 1 and {MAX_BATCH} messages")
        return parsed

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None when it is over what a full batch of messages could need."""
        limit = MAX_BATCH * max_frame_bytes(self.settings)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # -- health ---------------------------------------------------------------------------

    async def health(self, _request: Request) -> JSONResponse:
        status = "superseded" if self.meter.superseded else "draining" if self.closing else "ok"
        return JSONResponse(
            {
                "status": status,
                "frontendId": self.meter.frontend_id,
                "incarnation": self.meter.incarnation,
                "connections": len(self.connections),
            },
            status_code=200 if status == "ok" else 503,
        )


class _EventStream(Response):
    """A server-sent event stream: a realtime connection (``Transport.STREAMING``)."""

    media_type = "text/event-stream"

    def __init__(self, gateway: Gateway, app: str, account: int, channels: list[str]) -> None:
        # Not Response.__init__: a stream has no body, hence no content-length.
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.gateway = gateway
        self.app = app
        self.account = account
        self.channels = channels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gateway = self.gateway
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def write(chunk: str) -> None:
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})

        conn = _Connection(self.app, self.account, Transport.STREAMING)
        gateway._open(conn)
        try:
            for channel in self.channels:
                await gateway._attach(conn, channel)
            hello = {"action": "connected", "connectionId": conn.id, "channels": self.channels}
            conn.send(_sse("connected", encode(hello)))
            await gateway._serve(conn, gateway._watch(receive, conn), write)
        except Rejected as exc:  # a channel refused by the account's limits: say so, and end
            conn.stop(POLICY_VIOLATION, exc.message)
            with contextlib.suppress(OSError, RuntimeError):
                await write(_sse("error", _error_frame(exc.code, exc.message)))
        finally:
            gateway._close(conn)
        if conn.close_code is not None:  # ended by the gateway: finish the response cleanly
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.status_code * 100, str(exc.detail))


def create_gateway_app(
    meter: Meter,
    registry: AppRegistry,
    settings: Settings,
    *,
    heartbeat: float = HEARTBEAT,
    admission: Admission | None = None,
) -> Starlette:
    """The gateway's ASGI app (its :class:`Gateway` is ``app.state.gateway``).

    Serve it with :func:`serve_gateway`, which also closes the event streams on shutdown;
    under a plain uvicorn, call ``await app.state.gateway.drain()`` before it stops.
    """
    gateway = Gateway(meter, registry, settings, heartbeat=heartbeat, admission=admission)
    app = Starlette(
        routes=[
            WebSocketRoute("/v1/realtime", gateway.realtime),
            Route("/v1/stream", gateway.stream, methods=["GET"]),
            Route("/v1/apps/{app_id}/messages", gateway.rest_publish, methods=["POST"]),
            Route("/healthz", gateway.health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.gateway = gateway
    return app


# -- running it --------------------------------------------------------------------------


def build_meter(
    settings: Settings,
    *,
    frontend_id: str,
    datacenter: str,
    on_superseded: Callable[[], None] | None = None,
) -> Meter:
    """A Meter writing to ``datacenter``'s Redis (not started).

    Raises ValueError for a datacenter the engine does not read (see Settings.datacenter_url).
    """
    url = settings.datacenter_url(datacenter)
    store = DatacenterStore(redis_clients.sync_client(url), settings.redis_prefix, datacenter)
    return Meter(
        store,
        frontend_id,
        liveness_timeout=settings.liveness_timeout.total_seconds(),
        flush_interval=settings.flush_interval.total_seconds(),
        flush_min_interval=settings.flush_min_interval.total_seconds(),
        on_superseded=on_superseded,
    )


def build_registry(settings: Settings) -> AppRegistry:
    """An AppRegistry over the primary Redis's copy of the registry (not started)."""
    store = RegistryStore(redis_clients.sync_client(settings.redis_url), settings.redis_prefix)
    return AppRegistry(store, refresh_interval=settings.registry_refresh_interval.total_seconds())


def build_admission(
    settings: Settings, registry: AppRegistry, meter: Meter | None = None
) -> Admission:
    """The admission copy over the primary Redis (not started), checking against every
    datacenter's frontends; ``meter``'s own counts are read from memory (none for the API)."""
    store = AdmissionStore(redis_clients.sync_client(settings.redis_url), settings.redis_prefix)
    evidence = Evidence(
        list(datacenter_stores(settings).values()), global_store(settings), registry.apps_of
    )
    if meter is not None:
        evidence.incarnation = meter.incarnation
        evidence.connections_here = meter.connections_of
        evidence.channels_here = meter.channels_of
    return Admission(
        store,
        evidence=evidence,
        fail_open=settings.admission_fail_open,
        refresh_interval=settings.admission_refresh_interval.total_seconds(),
        stale_after=settings.admission_stale_after.total_seconds(),
        heartbeat=settings.flush_interval.total_seconds(),
    )


class _DenialLogFilter(logging.Filter):
    """Drops the error uvicorn's websockets-sansio logs after every denial response.

    The client gets the denial right; only the log is wrong (uvicorn PR #3138, open).
    """

    MESSAGE = "ASGI callable returned without completing handshake."

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.MESSAGE


def _quiet_denials() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DenialLogFilter) for f in logger.filters):
        logger.addFilter(_DenialLogFilter())


class _GatewayServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        gateway: Gateway,
        *,
        on_ready: Callable[[str, int], None] | None,
        on_stopped: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.on_ready = on_ready
        self.on_stopped = on_stopped

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            port = self.servers[0].sockets[0].getsockname()[1] if self.servers else self.config.port
            self.on_ready(self.config.host, port)

    async def shutdown(self, sockets: Any = None) -> None:
        # Stop accepting, then end every connection ourselves: uvicorn would wait for event
        # streams to end by themselves, and they never do.
        for server in self.servers:
            server.close()
        await self.gateway.drain()
        try:
            await super().shutdown(sockets)
        finally:
            # Here, not after serve(): after a signal, serve() re-raises it on its way out,
            # and a SIGTERM then ends the process at once.
            await asyncio.to_thread(self.on_stopped)


async def serve_gateway(
    settings: Settings,
    *,
    host: str,
    port: int,
    frontend_id: str,
    datacenter: str,
    meter: Meter | None = None,
    registry: AppRegistry | None = None,
    admission: Admission | None = None,
    heartbeat: float = HEARTBEAT,
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Run the gateway until it is cancelled, or a signal or superseded meter stops it.

    A meter, registry or admission given is the caller's to start and close; those built here
    are started here and closed when the server stops (the meter's close deregisters it: its
    counts go at once). ``on_ready(host, port)`` is called once it listens (``port`` as
    bound, for 0). Raises :class:`GatewayStartupError` if it cannot listen.
    """
    stopper = _Stopper()
    owned: list[Callable[[], None]] = []
    try:
        if meter is None:
            meter = build_meter(
                settings, frontend_id=frontend_id, datacenter=datacenter, on_superseded=stopper
            )
            await asyncio.to_thread(meter.start)
            owned.append(meter.close)
        if registry is None:
            registry = build_registry(settings)
            await asyncio.to_thread(registry.start)
            owned.append(registry.close)
        if admission is None:
            admission = build_admission(settings, registry, meter)
            await asyncio.to_thread(admission.start)
            owned.append(admission.close)
        app = create_gateway_app(
            meter, registry, settings, heartbeat=heartbeat, admission=admission
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ws="websockets-sansio",
            ws_max_size=max_frame_bytes(settings),
            ws_ping_interval=settings.gateway_ws_ping_interval.total_seconds(),
            ws_ping_timeout=settings.gateway_ws_ping_timeout.total_seconds(),
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_TIMEOUT,
        )
        _quiet_denials()  # after Config(), which (re)configures uvicorn's loggers

        def release() -> None:
            while owned:
                owned.pop()()

        server = _GatewayServer(config, app.state.gateway, on_ready=on_ready, on_stopped=release)
        stopper.attach(server)
        serving = asyncio.ensure_future(_serve(server))
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            # Cancelled by the program embedding it: stop as gracefully as on a signal (a
            # second cancel while that runs cuts it short).
            server.should_exit = True
            try:
                await serving
            finally:
                serving.cancel()
            raise
    finally:
        while owned:  # not stopped through shutdown (cancelled, or startup failed)
            owned.pop()()


class GatewayStartupError(RuntimeError):
    """The server could not start (uvicorn has logged why, e.g. the port is taken)."""

    def __init__(self, status: object) -> None:
        super().__init__(f"the gateway could not start (status {status})")
        self.status = status


async def _serve(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn exits the process on a failed startup: not for an embedded server to decide.
        raise GatewayStartupError(exc.code) from None


class _Stopper:
    """``on_superseded``: called on the meter's thread, maybe before the server exists."""

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None
        self.requested = False

    def attach(self, server: uvicorn.Server) -> None:
        self.server = server
        server.should_exit = self.requested

    def __call__(self) -> None:
        log.error("gateway.stopping", reason="superseded by another process with this frontend id")
        self.requested = True
        if self.server is not None:
            self.server.should_exit = True


def run_gateway(
    settings: Settings, *, host: str, port: int, frontend_id: str, datacenter: str
) -> None:
    """Run a gateway process until SIGTERM or SIGINT; prints one line once it listens."""

    def ready(bound_host: str, bound_port: int) -> None:
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(  # the line tests and operators wait for
            f"gateway {frontend_id} ({datacenter}) listening on http://{shown}:{bound_port}",
            flush=True,
        )

    try:
        asyncio.run(
            serve_gateway(
                settings,
                host=host,
                port=port,
                frontend_id=frontend_id,
                datacenter=datacenter,
                on_ready=ready,
            )
        )
    except KeyboardInterrupt:
        pass  # after a SIGINT, uvicorn re-raises it once everything is closed: a clean exit
    except GatewayStartupError as exc:
        raise SystemExit(exc.status) from None
