"""Delivering alerts from the outbox, on Postgres and SQLite, to real servers: each delivery is
sent once, retried with backoff while retrying can help, logged per attempt, and never lost
when its sender dies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from threading import Barrier
from typing import TypedDict

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.orm import Session
from structlog.testing import capture_logs

from metering.accounts.models import Account
from metering.core.database import make_engine
from metering.core.migrate import upgrade
from metering.limits.channels import Channel, WebhookChannel
from metering.limits.models import AlertDelivery, DeliveryAttempt, LimitAlert
from metering.limits.outbox import (
    LEASE_FACTOR,
    OutboxRepository,
    SweepResult,
    deliver,
    due,
    retry_delay,
    sweep,
)
from tests.limits.conftest import Receiver, SmtpServer
from tests.limits.test_channels import SECRET, TIMEOUT, mail_to
from tests.scratch import scratch_database

T0 = datetime(2026, 11, 14, 9, 30, tzinfo=UTC)
BASE, CAP = timedelta(seconds=10), timedelta(minutes=1)


class Policy(TypedDict):
    max_attempts: int
    retry_base: timedelta
    retry_max: timedelta


POLICY = Policy(max_attempts=5, retry_base=BASE, retry_max=CAP)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with scratch_database("limits") as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.db'}"
        upgrade(url)
        eng = make_engine(url)
        yield eng
        eng.dispose()
        return
    eng = make_engine(request.getfixturevalue("postgres_url"))
    yield eng
    with eng.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE alert_delivery_attempts, alert_deliveries, limit_alerts, accounts "
                "RESTART IDENTITY CASCADE"
            )
        )
    eng.dispose()


@pytest.fixture
def webhook(receiver: Receiver) -> dict[str, Channel]:
    return {"webhook": WebhookChannel(receiver.url, SECRET, TIMEOUT)}


def add_alert(
    engine: Engine, channels: Sequence[str] = ("webhook",), name: str = "Acme"
) -> list[int]:
    """An account with a hard connections alert, and a delivery due at T0 per channel."""
    with Session(engine) as session, session.begin():
        account = Account(name=name)
        session.add(account)
        session.flush()
        alert = LimitAlert(
            account_id=account.id,
            month="2026-11",
            metric="connections",
            level="hard",
            usage=2600,
            threshold=2500,
            quota=1000,
            hard_limit=2500,
            rejects=True,
            detected_at=T0 - timedelta(seconds=1),
        )
        session.add(alert)
        session.flush()
        deliveries = [
            AlertDelivery(alert_id=alert.id, channel=c, next_attempt_at=T0) for c in channels
        ]
        session.add_all(deliveries)
        session.flush()
        return [d.id for d in deliveries]


def row(engine: Engine, delivery_id: int) -> AlertDelivery:
    with Session(engine) as session:
        found = session.get(AlertDelivery, delivery_id)
        assert found is not None
        return found


def attempts(engine: Engine, delivery_id: int) -> list[DeliveryAttempt]:
    with Session(engine) as session:
        query = (
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.attempt)
        )
        return list(session.scalars(query))


def test_retry_delays_double_from_the_base_up_to_the_cap() -> None:
    delays = [retry_delay(n, BASE, CAP) for n in range(1, 6)]

    assert delays == [timedelta(seconds=s) for s in (10, 20, 40, 60, 60)]
    assert retry_delay(10_000, BASE, CAP) == CAP


def test_a_receiver_failing_twice_then_succeeding_gets_it_on_the_third_attempt(
    engine: Engine, receiver: Receiver, webhook: dict[str, Channel]
) -> None:
    [delivery_id] = add_alert(engine)
    receiver.fail(500, times=2)

    first = deliver(engine, delivery_id, webhook, now=T0, **POLICY)
    early = deliver(engine, delivery_id, webhook, now=T0 + BASE - timedelta(seconds=1), **POLICY)
    second = deliver(engine, delivery_id, webhook, now=T0 + BASE, **POLICY)
    third = deliver(engine, delivery_id, webhook, now=T0 + 3 * BASE, **POLICY)

    assert (first.status, first.retry_at) == ("retry", T0 + BASE)
    assert early.status == "skipped"
    assert (second.status, second.retry_at) == ("retry", T0 + BASE + 2 * BASE)
    assert (third.status, third.attempt) == ("sent", 3)
    log = attempts(engine, delivery_id)
    assert [(a.attempt, a.ok) for a in log] == [(1, False), (2, False), (3, True)]
    assert log[0].detail.startswith("HTTP 500")
    assert log[2].detail.startswith("HTTP 204")
    assert [a.started_at for a in log] == [T0, T0 + BASE, T0 + 3 * BASE]
    delivery = row(engine, delivery_id)
    assert (delivery.status, delivery.attempts, delivery.sent_at) == ("sent", 3, T0 + 3 * BASE)
    assert len(receiver.accepted) == 1
    assert {r.headers["x-metering-delivery"] for r in receiver.requests} == {str(delivery_id)}
    assert due(engine, T0 + timedelta(days=1)) == []


def test_a_refusal_that_retrying_cannot_fix_fails_after_one_attempt(
    engine: Engine, receiver: Receiver, webhook: dict[str, Channel]
) -> None:
    [delivery_id] = add_alert(engine)
    receiver.fail(400)

    with capture_logs() as logs:
        outcome = deliver(engine, delivery_id, webhook, now=T0, **POLICY)

    assert (outcome.status, outcome.attempt) == ("failed", 1)
    delivery = row(engine, delivery_id)
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.last_error is not None
    assert delivery.last_error.startswith("HTTP 400")
    assert [a.ok for a in attempts(engine, delivery_id)] == [False]
    [warning] = [e for e in logs if e["event"] == "limits.alert_delivery_failed"]
    assert warning["log_level"] == "warning"
    assert warning["delivery_id"] == delivery_id
    assert warning["channel"] == "webhook"
    assert due(engine, T0 + timedelta(days=1)) == []


def test_a_delivery_out_of_attempts_is_failed(
    engine: Engine, receiver: Receiver, webhook: dict[str, Channel]
) -> None:
    [delivery_id] = add_alert(engine)
    receiver.fail(503, times=10)

    now, statuses = T0, []
    for _ in range(3):
        outcome = deliver(
            engine,
            delivery_id,
            webhook,
            now=now,
            **Policy(max_attempts=3, retry_base=BASE, retry_max=CAP),
        )
        statuses.append(outcome.status)
        now = outcome.retry_at or now

    assert statuses == ["retry", "retry", "failed"]
    delivery = row(engine, delivery_id)
    assert (delivery.status, delivery.attempts) == ("failed", 3)
    assert len(attempts(engine, delivery_id)) == 3
    assert len(receiver.requests) == 3
    later = deliver(engine, delivery_id, webhook, now=T0 + timedelta(days=1), **POLICY)
    assert (later.status, later.detail) == ("skipped", "already failed")


def test_two_senders_racing_for_the_same_deliveries_send_each_once(
    engine: Engine, receiver: Receiver, webhook: dict[str, Channel]
) -> None:
    ids = [add_alert(engine, name=f"Account {i}")[0] for i in range(10)]
    start = Barrier(2)

    def sender() -> list[str]:
        start.wait()
        return [deliver(engine, i, webhook, now=T0, **POLICY).status for i in ids]

    with ThreadPoolExecutor(2) as pool:
        one, other = (f.result() for f in [pool.submit(sender), pool.submit(sender)])

    assert [Counter(pair) for pair in zip(one, other, strict=True)] == [
        Counter({"sent": 1, "skipped": 1})
    ] * len(ids)
    assert sorted(int(r.headers["x-metering-delivery"]) for r in receiver.requests) == ids
    assert {row(engine, i).attempts for i in ids} == {1}


def test_a_delivery_whose_sender_died_is_sent_once_its_lease_ends(
    engine: Engine, receiver: Receiver, webhook: dict[str, Channel]
) -> None:
    [delivery_id] = add_alert(engine)
    lease = TIMEOUT * LEASE_FACTOR
    # A sender claims the delivery, then dies before sending.
    with engine.begin() as conn:
        claim = OutboxRepository(conn).claim(delivery_id, T0, {"webhook": lease})
    assert claim is not None

    assert due(engine, T0) == []
    before = sweep(engine, webhook, now=T0 + lease - timedelta(microseconds=1), **POLICY)
    at_end = sweep(engine, webhook, now=T0 + lease, **POLICY)
    again = sweep(engine, webhook, now=T0 + lease + timedelta(hours=1), **POLICY)

    assert (before, at_end, again) == (SweepResult(), SweepResult(sent=1), SweepResult())
    assert len(receiver.requests) == 1
    delivery = row(engine, delivery_id)
    # The dead sender's attempt counts (it may have sent); the log has the one that reported.
    assert (delivery.status, delivery.attempts) == ("sent", 2)
    assert [(a.attempt, a.ok) for a in attempts(engine, delivery_id)] == [(2, True)]


def test_a_delivery_for_a_channel_not_configured_is_failed_with_a_clear_error(
    engine: Engine, receiver: Receiver, webhook: dict[str, Channel]
) -> None:
    webhook_id, email_id = add_alert(engine, channels=("webhook", "email"))

    result = sweep(engine, webhook, now=T0, **POLICY)

    assert result == SweepResult(sent=1, failed=1)
    email = row(engine, email_id)
    assert (email.status, email.attempts) == ("failed", 0)
    assert email.last_error is not None
    assert "email channel is not configured" in email.last_error
    assert attempts(engine, email_id) == []
    assert row(engine, webhook_id).status == "sent"
    assert len(receiver.requests) == 1


def test_a_sweep_sends_each_due_delivery_by_its_channel(
    engine: Engine, receiver: Receiver, smtp: SmtpServer
) -> None:
    webhook_id, email_id = add_alert(engine, channels=("webhook", "email"))
    channels: dict[str, Channel] = {
        "webhook": WebhookChannel(receiver.url, SECRET, TIMEOUT),
        "email": mail_to(smtp.port),
    }

    assert due(engine, T0 - timedelta(seconds=1)) == []
    assert sorted(due(engine, T0)) == [webhook_id, email_id]
    assert sweep(engine, channels, now=T0, **POLICY) == SweepResult(sent=2)

    [mail] = smtp.mailbox.mails
    alert_id = row(engine, email_id).alert_id
    assert mail.message["Message-ID"] == f"<metering-alert-{alert_id}-{email_id}@metering>"
    assert mail.message["Subject"].startswith("[metering] Acme (account ")
    [request] = receiver.requests
    assert request.headers["x-metering-delivery"] == str(webhook_id)


def test_due_lists_the_longest_waiting_first_and_at_most_the_limit(engine: Engine) -> None:
    ids = [add_alert(engine, name=f"Account {i}")[0] for i in range(3)]
    with engine.begin() as conn:
        for i, delivery_id in enumerate(ids):
            conn.execute(
                update(AlertDelivery)
                .where(AlertDelivery.id == delivery_id)
                .values(next_attempt_at=T0 - timedelta(minutes=i))
            )

    assert due(engine, T0) == list(reversed(ids))
    assert due(engine, T0, limit=2) == [ids[2], ids[1]]
    assert due(engine, T0 - timedelta(minutes=1)) == [ids[2], ids[1]]
