"""Sending staff alerts from the outbox: a claim, a send, a record; retries with backoff.

The alert check writes one ``AlertDelivery`` row per alert and channel in the transaction that
records the alert (DESIGN.md invariant 5); nothing here runs before that commits. Each
delivery is then sent in three steps, because the send is slow network I/O that must not
hold a transaction or a row lock open:

1. **claim**, in a short transaction: one conditional UPDATE counts the attempt and moves
   ``next_attempt_at`` a lease ahead (twice the channel's timeout). Only a pending, due row
   matches, so of two senders racing for it exactly one claims it; the other skips.
2. **send**, outside any transaction.
3. **record**, in a second short transaction: a ``DeliveryAttempt`` row for the log, then the
   delivery is sent, due again after a backoff, or failed.

A sender killed between 1 and 3 leaves the row pending with its lease: it is due again when
the lease ends and a sweep sends it then, so a delivery is never lost. It may be delivered
twice (the dead sender may have sent it before dying, or a send may outlast its lease):
receivers deduplicate on the delivery id, which the webhook carries in
``X-Metering-Delivery`` and the e-mail in its ``Message-ID``.

These functions take an ``Engine`` and own their transactions, unlike services, because the
send must happen between two commits. Every function takes ``now`` (aware UTC) for tests;
left out, the clock is read at each step, so backoff counts from the end of an attempt.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Connection, Engine, case, insert, literal, select, update

from metering.accounts.models import Account
from metering.core.database import UTCDateTime, utcnow
from metering.core.logging import get_logger
from metering.limits.channels import AlertMessage, Channel, DeliveryError
from metering.limits.models import AlertDelivery, DeliveryAttempt, LimitAlert

log = get_logger(__name__)

# A claim holds a delivery for this many times its channel's timeout: long enough for one send
# (connect, write, read) to finish, short enough that a dead sender's delivery soon goes out.
LEASE_FACTOR = 2
SWEEP_LIMIT = 100

Status = Literal["sent", "retry", "failed", "skipped"]

_UNCONFIGURED = {
    "webhook": (
        "the webhook channel is not configured on the sender (METERING_ALERT_WEBHOOK_URL and "
        "METERING_ALERT_WEBHOOK_SECRET are unset); set it back to pending to send it"
    ),
    "email": (
        "the email channel is not configured on the sender (METERING_SMTP_HOST or "
        "METERING_ALERT_EMAIL_TO is unset); set it back to pending to send it"
    ),
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``deliver`` call did.

    ``sent``: delivered. ``retry``: failed, due again at ``retry_at``. ``failed``: given up
    (not retryable, out of attempts, or its channel is not configured), and marked so.
    ``skipped``: nothing done (not due, already sent or failed, or another sender holds it).
    """

    delivery_id: int
    status: Status
    attempt: int | None = None  # the attempt this call made; None when it made none
    detail: str = ""
    retry_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SweepResult:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery this sender holds: the attempt it is making, and what to send."""

    channel: str
    attempt: int
    message: AlertMessage


@dataclass(frozen=True, slots=True)
class Abandoned:
    """A delivery failed without an attempt: its channel is not configured."""

    alert_id: int
    channel: str
    attempts: int
    error: str


class OutboxRepository:
    """All SQL of the outbox. The same statements run on Postgres and SQLite (>= 3.35, for
    UPDATE ... RETURNING)."""

    def __init__(self, conn: Connection) -> None:
        if conn.dialect.name == "sqlite" and sqlite3.sqlite_version_info < (3, 35):
            raise RuntimeError(
                f"the alert outbox needs SQLite 3.35 or later (RETURNING); this Python has "
                f"{sqlite3.sqlite_version}"
            )
        self.conn = conn

    def claim(
        self, delivery_id: int, now: datetime, leases: Mapping[str, timedelta]
    ) -> Claim | None:
        """Take the delivery if it is pending, due and for one of ``leases``' channels: count
        the attempt and hold it until now + its channel's lease. None if not taken."""
        if not leases:
            return None
        # The conditions and the write are one statement: on Postgres a second sender blocks
        # on the row lock, then re-checks the row as the first left it (no longer due); on
        # SQLite writers are serialised. Either way only one sender's UPDATE matches.
        lease_end = case(
            {name: literal(now + lease, UTCDateTime()) for name, lease in leases.items()},
            value=AlertDelivery.channel,
        )
        claimed = self.conn.execute(
            update(AlertDelivery)
            .where(
                AlertDelivery.id == delivery_id,
                AlertDelivery.status == "pending",
                AlertDelivery.next_attempt_at <= now,
                AlertDelivery.channel.in_(list(leases)),
            )
            .values(attempts=AlertDelivery.attempts + 1, next_attempt_at=lease_end)
            .returning(AlertDelivery.alert_id, AlertDelivery.channel, AlertDelivery.attempts)
        ).one_or_none()
        if claimed is None:
            return None
        alert = self.conn.execute(
            select(
                LimitAlert.account_id,
                Account.name,
                LimitAlert.month,
                LimitAlert.metric,
                LimitAlert.level,
                LimitAlert.usage,
                LimitAlert.threshold,
                LimitAlert.quota,
                LimitAlert.hard_limit,
                LimitAlert.rejects,
                LimitAlert.detected_at,
            )
            .join(Account, Account.id == LimitAlert.account_id)
            .where(LimitAlert.id == claimed.alert_id)
        ).one()
        message = AlertMessage(
            alert_id=claimed.alert_id,
            delivery_id=delivery_id,
            account_id=alert.account_id,
            account_name=alert.name,
            month=alert.month,
            metric=alert.metric,
            level=alert.level,
            usage=alert.usage,
            threshold=alert.threshold,
            quota=alert.quota,
            hard_limit=alert.hard_limit,
            rejects=alert.rejects,
            detected_at=alert.detected_at,
        )
        return Claim(channel=claimed.channel, attempt=claimed.attempts, message=message)

    def abandon_unconfigured(
        self, delivery_id: int, now: datetime, configured: Collection[str]
    ) -> Abandoned | None:
        """Mark the delivery failed if it is pending and due but its channel is not one of
        ``configured``: left pending, it would be swept up again for ever."""
        reason = case(_UNCONFIGURED, value=AlertDelivery.channel, else_="unknown channel")
        row = self.conn.execute(
            update(AlertDelivery)
            .where(
                AlertDelivery.id == delivery_id,
                AlertDelivery.status == "pending",
                AlertDelivery.next_attempt_at <= now,
                AlertDelivery.channel.not_in(list(configured)),
            )
            .values(status="failed", last_error=reason)
            .returning(
                AlertDelivery.alert_id,
                AlertDelivery.channel,
                AlertDelivery.attempts,
                AlertDelivery.last_error,
            )
        ).one_or_none()
        if row is None:
            return None
        return Abandoned(row.alert_id, row.channel, row.attempts, row.last_error)

    def state(self, delivery_id: int) -> Any | None:
        """The delivery's status and next_attempt_at (None if there is no such delivery)."""
        return self.conn.execute(
            select(AlertDelivery.status, AlertDelivery.next_attempt_at).where(
                AlertDelivery.id == delivery_id
            )
        ).one_or_none()

    def record_attempt(
        self,
        delivery_id: int,
        attempt: int,
        *,
        started_at: datetime,
        ok: bool,
        detail: str,
        duration_ms: int,
    ) -> None:
        self.conn.execute(
            insert(DeliveryAttempt).values(
                delivery_id=delivery_id,
                attempt=attempt,
                started_at=started_at,
                ok=ok,
                detail=detail,
                duration_ms=duration_ms,
            )
        )

    def mark_sent(self, delivery_id: int, at: datetime) -> bool:
        """Sent, unless it is no longer pending. Not fenced by the attempt: a send that
        outlived its lease still delivered, and that outranks whatever a later attempt did."""
        result = self.conn.execute(
            update(AlertDelivery)
            .where(AlertDelivery.id == delivery_id, AlertDelivery.status == "pending")
            .values(status="sent", sent_at=at)
        )
        return bool(result.rowcount)

    def schedule_retry(self, delivery_id: int, attempt: int, at: datetime, error: str) -> bool:
        """Due again at ``at``, if ``attempt`` is still the latest (no later sender claimed it
        after this one's lease ended: that sender's outcome stands)."""
        result = self.conn.execute(
            update(AlertDelivery)
            .where(
                AlertDelivery.id == delivery_id,
                AlertDelivery.status == "pending",
                AlertDelivery.attempts == attempt,
            )
            .values(next_attempt_at=at, last_error=error)
        )
        return bool(result.rowcount)

    def mark_failed(self, delivery_id: int, attempt: int, error: str) -> bool:
        """Given up, if ``attempt`` is still the latest (as ``schedule_retry``)."""
        result = self.conn.execute(
            update(AlertDelivery)
            .where(
                AlertDelivery.id == delivery_id,
                AlertDelivery.status == "pending",
                AlertDelivery.attempts == attempt,
            )
            .values(status="failed", last_error=error)
        )
        return bool(result.rowcount)

    def due(self, now: datetime, limit: int) -> list[int]:
        # (status, next_attempt_at) is indexed: this reads the due rows and no others.
        return list(
            self.conn.scalars(
                select(AlertDelivery.id)
                .where(AlertDelivery.status == "pending", AlertDelivery.next_attempt_at <= now)
                .order_by(AlertDelivery.next_attempt_at, AlertDelivery.id)
                .limit(limit)
            )
        )


def retry_delay(attempts: int, base: timedelta, cap: timedelta) -> timedelta:
    """How long after failed attempt number ``attempts`` (1, 2, ...) to try again:
    ``base`` doubled per attempt after the first, at most ``cap``."""
    if attempts < 1:
        raise ValueError("attempts starts at 1")
    delay = base
    # Doubling stops at the cap, so a large attempt count cannot overflow a timedelta.
    for _ in range(attempts - 1):
        if delay >= cap:
            break
        delay *= 2
    return min(delay, cap)


def due(engine: Engine, now: datetime, limit: int = SWEEP_LIMIT) -> list[int]:
    """Ids of the pending deliveries due at ``now``, the longest waiting first."""
    with engine.connect() as conn:
        return OutboxRepository(conn).due(now, limit)


def deliver(
    engine: Engine,
    delivery_id: int,
    channels: Mapping[str, Channel],
    *,
    max_attempts: int,
    retry_base: timedelta,
    retry_max: timedelta,
    now: datetime | None = None,
) -> Outcome:
    """Make one attempt at a delivery, if it is due and no other sender holds it.

    Safe to call twice, concurrently, or for a delivery already sent: only a sender that
    claims the row sends. A delivery whose channel is not in ``channels`` is marked failed
    with a ``last_error`` that says so. Sent at most ``max_attempts`` times in all; a failure
    that is not retryable (an HTTP 400, an SMTP 5xx) fails it at once. A delivery may be sent
    twice if its sender dies after sending (see the module's docstring): the delivery id
    travels with it for receivers to deduplicate on.
    """
    clock = _clock(now)
    started_at = clock()
    leases = {name: channel.timeout * LEASE_FACTOR for name, channel in channels.items()}
    with engine.begin() as conn:
        repo = OutboxRepository(conn)
        claim = repo.claim(delivery_id, started_at, leases)
        abandoned = None if claim else repo.abandon_unconfigured(delivery_id, started_at, channels)
        state = None if claim or abandoned else repo.state(delivery_id)
    if abandoned is not None:
        log.warning(
            "limits.alert_delivery_failed",
            delivery_id=delivery_id,
            alert_id=abandoned.alert_id,
            channel=abandoned.channel,
            attempts=abandoned.attempts,
            error=abandoned.error,
        )
        return Outcome(delivery_id, "failed", detail=abandoned.error)
    if claim is None:
        return Outcome(delivery_id, "skipped", detail=_why_skipped(state, started_at))

    ok, retryable, detail, duration_ms = _send(channels[claim.channel], claim)
    finished_at = clock()

    retry_at: datetime | None = None
    with engine.begin() as conn:
        repo = OutboxRepository(conn)
        repo.record_attempt(
            delivery_id,
            claim.attempt,
            started_at=started_at,
            ok=ok,
            detail=detail,
            duration_ms=duration_ms,
        )
        status: Status
        if ok:
            status, current = "sent", repo.mark_sent(delivery_id, finished_at)
        elif retryable and claim.attempt < max_attempts:
            status = "retry"
            retry_at = finished_at + retry_delay(claim.attempt, retry_base, retry_max)
            current = repo.schedule_retry(delivery_id, claim.attempt, retry_at, detail)
        else:
            status, current = "failed", repo.mark_failed(delivery_id, claim.attempt, detail)

    fields = {
        "delivery_id": delivery_id,
        "alert_id": claim.message.alert_id,
        "account_id": claim.message.account_id,
        "channel": claim.channel,
        "attempt": claim.attempt,
        "detail": detail,
    }
    if not current:
        # This send outlived its lease and another sender claimed the delivery (or already
        # finished it): the row is theirs to decide; this attempt stays in the log.
        log.warning("limits.alert_delivery_superseded", outcome=status, **fields)
        return Outcome(delivery_id, "sent" if ok else "skipped", claim.attempt, detail)
    if status == "sent":
        log.info("limits.alert_delivered", **fields)
    elif status == "retry":
        log.info("limits.alert_delivery_retry", retry_at=retry_at, **fields)
    else:
        log.warning(
            "limits.alert_delivery_failed",
            retryable=retryable,
            max_attempts=max_attempts,
            **fields,
        )
    return Outcome(delivery_id, status, claim.attempt, detail, retry_at)


def sweep(
    engine: Engine,
    channels: Mapping[str, Channel],
    *,
    max_attempts: int,
    retry_base: timedelta,
    retry_max: timedelta,
    now: datetime | None = None,
    limit: int = SWEEP_LIMIT,
) -> SweepResult:
    """Attempt every delivery due now, at most ``limit`` of them (the rest wait for the next
    sweep). The periodic task and the embedded runner call this; it also picks up deliveries
    whose sender died, once their lease ends."""
    ids = due(engine, now or utcnow(), limit)
    counts: Counter[Status] = Counter()
    for delivery_id in ids:
        outcome = deliver(
            engine,
            delivery_id,
            channels,
            max_attempts=max_attempts,
            retry_base=retry_base,
            retry_max=retry_max,
            now=now,
        )
        counts[outcome.status] += 1
    result = SweepResult(
        sent=counts["sent"],
        retried=counts["retry"],
        failed=counts["failed"],
        skipped=counts["skipped"],
    )
    if ids:
        log.info(
            "limits.alert_sweep",
            due=len(ids),
            sent=result.sent,
            retried=result.retried,
            failed=result.failed,
            skipped=result.skipped,
        )
    return result


def _send(channel: Channel, claim: Claim) -> tuple[bool, bool, str, int]:
    """(ok, retryable, detail, duration in ms) of one send."""
    started = time.perf_counter()
    try:
        detail = channel.send(claim.message)
    except DeliveryError as exc:
        ok, retryable, detail = False, exc.retryable, exc.detail
    except Exception as exc:
        # A channel's bug must not escape with the delivery claimed and nothing in the log: it
        # is recorded like any failure and retried until the attempts run out.
        log.exception(
            "limits.alert_channel_error",
            delivery_id=claim.message.delivery_id,
            channel=claim.channel,
        )
        ok, retryable, detail = False, True, f"{type(exc).__name__}: {exc}"
    else:
        ok, retryable = True, False
    return ok, retryable, detail, round((time.perf_counter() - started) * 1000)


def _why_skipped(state: Any | None, now: datetime) -> str:
    if state is None:
        return "no such delivery"
    if state.status != "pending":
        return f"already {state.status}"
    if state.next_attempt_at > now:
        return (
            f"not due until {state.next_attempt_at.isoformat()} "
            "(backing off, or held by another sender)"
        )
    return "claimed by another sender"


def _clock(now: datetime | None) -> Callable[[], datetime]:
    if now is None:
        return utcnow
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (UTC)")
    return lambda: now
