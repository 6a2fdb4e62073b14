"""Real servers for the alert channels, on 127.0.0.1, started by the tests: a webhook receiver
(an HTTP server that records what it is sent and can be told to fail first) and an SMTP
server (aiosmtpd) that keeps what it accepts."""

from __future__ import annotations

import email
import email.policy
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.processes import free_port


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    status: int  # what the receiver answered


class Receiver:
    """A webhook receiver: answers the statuses queued with ``fail`` first, then 204."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.delay = 0.0  # seconds to wait before answering (a slow receiver)
        self._statuses: deque[int] = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/metering"

    @property
    def accepted(self) -> list[Request]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def fail(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._statuses.extend([status] * times)

    def _next_status(self) -> int:
        with self._lock:
            return self._statuses.popleft() if self._statuses else 204

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.delay:
                    threading.Event().wait(receiver.delay)
                status = receiver._next_status()
                with receiver._lock:
                    receiver.requests.append(
                        Request(
                            self.path, {k.lower(): v for k, v in self.headers.items()}, body, status
                        )
                    )
                payload = b"" if status == 204 else f"status {status}".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test reads ``requests``

        return Handler

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@dataclass(frozen=True)
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


class Mailbox:
    """An aiosmtpd handler: answers the replies queued with ``refuse`` to DATA first, then
    accepts and keeps the message."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []
        self._replies: deque[str] = deque()

    def refuse(self, reply: str, times: int = 1) -> None:
        self._replies.extend([reply] * times)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._replies:
            return self._replies.popleft()
        assert isinstance(envelope.content, bytes)
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append(Mail(str(envelope.mail_from), list(envelope.rcpt_tos), message))
        return "250 2.0.0 OK"


@dataclass
class SmtpServer:
    mailbox: Mailbox
    port: int


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"alerts",
        b"s3cret",
    )
    # handled=False: aiosmtpd answers the refusal (535) itself.
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    yield server
    server.stop()


def _smtp(**kwargs: Any) -> Iterator[SmtpServer]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **kwargs)
    controller.start()
    yield SmtpServer(mailbox, port)
    controller.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    yield from _smtp()


@pytest.fixture
def smtp_with_auth() -> Iterator[SmtpServer]:
    """Requires AUTH (user ``alerts``, password ``s3cret``); over plain text, since the test
    has no certificate a client would trust."""
    yield from _smtp(authenticator=_authenticate, auth_required=True, auth_require_tls=False)
