"""How a staff alert leaves the engine: a signed webhook and an e-mail.

A channel sends one message and says how it went: it returns a short detail for the delivery
log, or raises ``DeliveryError`` saying whether trying again could help. It keeps no state
between sends and never touches the database; the outbox (``metering.limits.outbox``) decides
when to send and records what happened.

A message may arrive more than once (a sender that dies after sending and before recording
it is retried), so each carries its delivery id: the webhook in ``X-Metering-Delivery``, the
e-mail in its ``Message-ID``. Receivers deduplicate on them.

Receiving the webhook::

    body = request.body()                      # the raw bytes, before any JSON parsing
    if not verify_signature(
        secret,
        request.headers["X-Metering-Timestamp"],
        body,
        request.headers["X-Metering-Signature"],
    ):
        return 401
    if seen(request.headers["X-Metering-Delivery"]):
        return 200                             # a resend: already handled
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate
from typing import Protocol

import httpx

from metering.core.settings import Settings

SIGNATURE_VERSION = "v1"
# Seconds a webhook's timestamp may be off the receiver's clock (replayed or stale requests).
SIGNATURE_TOLERANCE = 300
USER_AGENT = "metering-alerts/1"

# What each metric counts, for people reading an alert.
_METRIC_WORDS = {
    "connections": "peak concurrent connections",
    "channels": "peak active channels",
    "messages": "messages this month",
    "data": "bytes of messages this month",
}
# What gateways refuse at the hard level, and the rejection code clients see (DESIGN.md).
_REFUSED = {
    "connections": (
        "New connections are being refused (code 40111) while the account's live connection "
        "count is at or over the hard limit; this lifts by itself once it is below."
    ),
    "channels": (
        "New channel attaches are being refused (code 40114) while the account's active "
        "channels are at or over the hard limit; this lifts by itself once they are below."
    ),
    "messages": "New messages are being refused (code 40112) for the rest of the month.",
    "data": "New messages are being refused (code 40112) for the rest of the month.",
}


@dataclass(frozen=True, slots=True)
class AlertMessage:
    """What one delivery of an alert says: the alert as recorded, and which delivery it is."""

    alert_id: int
    delivery_id: int
    account_id: int
    account_name: str
    month: str  # UTC calendar month, 'YYYY-MM'
    metric: str
    level: str  # warning, soft or hard
    usage: int
    threshold: int
    quota: int
    hard_limit: int
    rejects: bool  # the hard level refuses traffic (True) or only notifies
    detected_at: datetime

    def __post_init__(self) -> None:
        if self.detected_at.tzinfo is None:
            raise ValueError("detected_at must be timezone-aware (UTC)")

    @property
    def message_id(self) -> str:
        """The e-mail Message-ID: the same for every resend of this delivery."""
        return f"<metering-alert-{self.alert_id}-{self.delivery_id}@metering>"

    def to_json(self) -> bytes:
        """The webhook body: compact JSON with camelCase keys."""
        detected = self.detected_at.astimezone(UTC).isoformat(timespec="milliseconds")
        document = {
            "type": "limit.alert",
            "alertId": self.alert_id,
            "deliveryId": self.delivery_id,
            "account": {"id": self.account_id, "name": self.account_name},
            "month": self.month,
            "metric": self.metric,
            "level": self.level,
            "usage": self.usage,
            "threshold": self.threshold,
            "quota": self.quota,
            "hardLimit": self.hard_limit,
            "rejects": self.rejects,
            "detectedAt": detected.replace("+00:00", "Z"),
        }
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()

    def subject(self) -> str:
        """One line, e.g. ``[metering] Acme (account 12): connections at the hard level, 2600
        of hard limit 2500 (2026-11)``."""
        # One line whatever the account is called: a newline would end an e-mail header.
        name = " ".join(self.account_name.split())
        limit = f"hard limit {self.hard_limit}" if self.level == "hard" else f"quota {self.quota}"
        return (
            f"[metering] {name} (account {self.account_id}): {self.metric} at the {self.level} "
            f"level, {self.usage} of {limit} ({self.month})"
        )

    def body(self) -> str:
        """Plain text for staff: what happened and what to do."""
        what = _METRIC_WORDS.get(self.metric, self.metric)
        detected = self.detected_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if self.level == "warning":
            happened = (
                f"The account is nearing its quota: {self.usage} {what} in {self.month}, "
                f"{_share(self.usage, self.quota)} of its quota of {self.quota} (the warning "
                f"level starts at {self.threshold})."
            )
            todo = (
                "Nothing is refused. Watch the account; if it keeps growing, talk to the customer "
                "about a larger package before usage is billed as overage."
            )
        elif self.level == "soft":
            happened = (
                f"The account is over its quota: {self.usage} {what} in {self.month}, against a "
                f"quota of {self.quota}. Usage over the quota is billed as overage."
            )
            todo = (
                "Contact the customer: explain the overage and offer a larger package. Nothing is "
                f"refused until the hard limit of {self.hard_limit}."
            )
        else:
            happened = (
                f"The account is over its hard limit: {self.usage} {what} in {self.month}, against "
                f"a hard limit of {self.hard_limit} (quota {self.quota})."
            )
            if self.rejects:
                todo = (
                    f"{_REFUSED.get(self.metric, 'Traffic is being refused.')} Contact the "
                    "customer now. A package change or a staff override lifts the rejection at "
                    "once."
                )
            else:
                todo = (
                    "Nothing is being refused: the account's package only notifies at the hard "
                    "level. Contact the customer now about the usage and their package."
                )
        return (
            f"{happened}\n\n{todo}\n\n"
            f"Account:    {self.account_name} (id {self.account_id})\n"
            f"Metric:     {self.metric}\n"
            f"Level:      {self.level}\n"
            f"Usage:      {self.usage}\n"
            f"Threshold:  {self.threshold}\n"
            f"Quota:      {self.quota}\n"
            f"Hard limit: {self.hard_limit}\n"
            f"Month:      {self.month} (UTC)\n"
            f"Detected:   {detected}\n"
            f"Alert {self.alert_id}, delivery {self.delivery_id}.\n"
        )


def _share(usage: int, quota: int) -> str:
    return f"{usage * 100 // quota} %" if quota > 0 else "all"


class DeliveryError(Exception):
    """A send that did not deliver; ``retryable`` says whether trying again later may work."""

    def __init__(self, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retryable = retryable


class Channel(Protocol):
    """Something that sends an alert message."""

    @property
    def timeout(self) -> timedelta:
        """How long one network operation of a send may wait (the outbox leases twice it)."""
        ...

    def send(self, message: AlertMessage) -> str:
        """Deliver ``message``; return a detail for the log, or raise ``DeliveryError``."""
        ...


def sign(secret: str | bytes, timestamp: int | str, body: bytes) -> str:
    """The ``X-Metering-Signature`` value: HMAC-SHA256 of ``b"<timestamp>." + body``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_signature(
    secret: str | bytes,
    timestamp: int | str,
    body: bytes,
    signature: str,
    *,
    now: float | None = None,
    tolerance: float = SIGNATURE_TOLERANCE,
) -> bool:
    """Whether a webhook request is genuine and fresh: for receivers.

    ``timestamp`` and ``signature`` are the ``X-Metering-Timestamp`` and
    ``X-Metering-Signature`` headers, ``body`` the raw request body (parsing and re-encoding
    the JSON would change it). False when the signature does not match, or the timestamp is
    more than ``tolerance`` seconds away from ``now`` (Unix seconds, default the clock), which
    stops a captured request being replayed later. The comparison takes constant time.
    """
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance:
        return False
    expected = sign(secret, sent_at, body)
    return hmac.compare_digest(expected.encode(), signature.strip().encode())


class WebhookChannel:
    """POSTs the alert as JSON, signed, to one URL.

    2xx is delivered. A redirect, or a 4xx other than 408 and 429, is the receiver refusing
    this request for good (a wrong URL or secret): not retried. 5xx, 408, 429, a connection
    that fails and a timeout are retried.
    """

    def __init__(self, url: str, secret: str, timeout: timedelta) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"webhook URL must be http(s)://host/...: {url!r}")
        if not secret:
            raise ValueError("the webhook needs a secret to sign with")
        self.url = url
        self._secret = secret
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"WebhookChannel({self.url!r})"  # never the secret

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    def send(self, message: AlertMessage) -> str:
        body = message.to_json()
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Metering-Delivery": str(message.delivery_id),
            "X-Metering-Timestamp": str(timestamp),
            "X-Metering-Signature": sign(self._secret, timestamp, body),
        }
        started = time.perf_counter()
        try:
            response = httpx.post(
                self.url, content=body, headers=headers, timeout=self._timeout.total_seconds()
            )
        except httpx.TimeoutException as exc:
            raise DeliveryError(
                f"timed out after {_ms(started)} ms ({type(exc).__name__})", retryable=True
            ) from exc
        except httpx.UnsupportedProtocol as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}", retryable=False) from exc
        except httpx.TransportError as exc:
            # Refused or reset connections, DNS failures, a broken response: the network's or
            # the receiver's state, which can change.
            raise DeliveryError(f"{type(exc).__name__}: {exc}", retryable=True) from exc
        took = f"HTTP {response.status_code} in {_ms(started)} ms"
        if response.is_success:
            return took
        retryable = response.status_code in (408, 429) or response.status_code >= 500
        excerpt = " ".join(response.text[:200].split())
        if response.is_redirect:
            excerpt = f"redirect to {response.headers.get('location', '?')} not followed"
        raise DeliveryError(f"{took}: {excerpt}" if excerpt else took, retryable=retryable)


class EmailChannel:
    """Sends the alert as a plain-text e-mail by SMTP.

    A 4xx reply or a connection that fails is retried; a 5xx reply (a refused sender or
    recipient, failed authentication) is not.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        recipients: Sequence[str],
        *,
        starttls: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: timedelta,
    ) -> None:
        if not recipients:
            raise ValueError("the e-mail channel needs at least one recipient")
        self.host = host
        self.port = port
        self.sender = sender
        self.recipients = tuple(recipients)
        self.starttls = starttls
        self.username = username
        self._password = password
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"EmailChannel({self.host!r}, {self.port}, to={list(self.recipients)!r})"

    @property
    def timeout(self) -> timedelta:
        return self._timeout

    def compose(self, message: AlertMessage) -> EmailMessage:
        email = EmailMessage()
        email["Subject"] = message.subject()
        email["From"] = self.sender
        email["To"] = ", ".join(self.recipients)
        email["Date"] = formatdate(usegmt=True)
        email["Message-ID"] = message.message_id
        # RFC 3834: no vacation auto-replies to a robot.
        email["Auto-Submitted"] = "auto-generated"
        email["X-Metering-Delivery"] = str(message.delivery_id)
        email.set_content(message.body())
        return email

    def send(self, message: AlertMessage) -> str:
        email = self.compose(message)
        started = time.perf_counter()
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self._timeout.total_seconds()) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self._password or "")
                refused = smtp.send_message(
                    email, from_addr=self.sender, to_addrs=list(self.recipients)
                )
        except smtplib.SMTPRecipientsRefused as exc:
            # Every recipient refused: worth another try only if one refusal was temporary.
            codes = [code for code, _ in exc.recipients.values()]
            raise DeliveryError(
                f"SMTP refused every recipient: {_refusals(exc.recipients)}",
                retryable=any(400 <= code < 500 for code in codes),
            ) from exc
        except smtplib.SMTPResponseException as exc:
            reply = _text(exc.smtp_error)
            raise DeliveryError(
                f"SMTP {exc.smtp_code} {reply}".rstrip(), retryable=400 <= exc.smtp_code < 500
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            # The server offers no STARTTLS or AUTH: a configuration to fix, not a moment to wait.
            raise DeliveryError(f"SMTP: {exc}", retryable=False) from exc
        except (smtplib.SMTPException, OSError) as exc:
            # Disconnects, refused connections, timeouts, TLS failures.
            raise DeliveryError(f"SMTP {type(exc).__name__}: {exc}", retryable=True) from exc
        detail = (
            f"SMTP accepted for {len(self.recipients) - len(refused)} of "
            f"{len(self.recipients)} recipients in {_ms(started)} ms"
        )
        # Some recipients were accepted: sending again would repeat it to them, so this counts
        # as delivered and the log keeps who was refused.
        return f"{detail}; refused {_refusals(refused)}" if refused else detail


def _refusals(refused: dict[str, tuple[int, bytes]]) -> str:
    return ", ".join(f"{rcpt} ({code} {_text(text)})" for rcpt, (code, text) in refused.items())


def _text(reply: bytes | str) -> str:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())


def _ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def channels_from(settings: Settings) -> dict[str, Channel]:
    """The channels the settings configure, by name ("webhook", "email"); none may be."""
    channels: dict[str, Channel] = {}
    if settings.alert_webhook_url:
        if not settings.alert_webhook_secret:  # Settings refuses this; kept for the type
            raise ValueError("alert_webhook_url needs alert_webhook_secret")
        channels["webhook"] = WebhookChannel(
            settings.alert_webhook_url,
            settings.alert_webhook_secret,
            settings.alert_webhook_timeout,
        )
    if settings.smtp_host and settings.alert_email_to:
        channels["email"] = EmailChannel(
            settings.smtp_host,
            settings.smtp_port,
            settings.alert_email_from,
            settings.alert_email_to,
            starttls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=settings.smtp_password,
            timeout=settings.smtp_timeout,
        )
    return channels
