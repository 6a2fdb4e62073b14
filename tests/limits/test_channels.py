"""The alert channels against real servers: a signed webhook a receiver can verify, an e-mail
staff can read, and which failures are worth trying again."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from metering.core.settings import Settings
from metering.limits.channels import (
    AlertMessage,
    DeliveryError,
    EmailChannel,
    WebhookChannel,
    channels_from,
    verify_signature,
)
from tests.limits.conftest import Receiver, SmtpServer
from tests.processes import free_port

SECRET = "whsec-test"
TIMEOUT = timedelta(seconds=2)

MESSAGE = AlertMessage(
    alert_id=7,
    delivery_id=31,
    account_id=12,
    account_name="Acme",
    month="2026-11",
    metric="connections",
    level="hard",
    usage=2600,
    threshold=2500,
    quota=1000,
    hard_limit=2500,
    rejects=True,
    detected_at=datetime(2026, 11, 14, 9, 30, 5, 250_000, tzinfo=UTC),
)


def webhook(receiver: Receiver, timeout: timedelta = TIMEOUT) -> WebhookChannel:
    return WebhookChannel(receiver.url, SECRET, timeout)


def mail_to(port: int, username: str | None = None, password: str | None = None) -> EmailChannel:
    return EmailChannel(
        "127.0.0.1",
        port,
        "metering@example.test",
        ["ops@example.test", "billing@example.test"],
        username=username,
        password=password,
        timeout=TIMEOUT,
    )


def test_the_json_body_is_compact_with_camel_case_keys_and_utc_time() -> None:
    body = MESSAGE.to_json()

    assert b" " not in body
    assert json.loads(body) == {
        "type": "limit.alert",
        "alertId": 7,
        "deliveryId": 31,
        "account": {"id": 12, "name": "Acme"},
        "month": "2026-11",
        "metric": "connections",
        "level": "hard",
        "usage": 2600,
        "threshold": 2500,
        "quota": 1000,
        "hardLimit": 2500,
        "rejects": True,
        "detectedAt": "2026-11-14T09:30:05.250Z",
    }


def test_the_subject_is_one_line_naming_account_metric_level_and_limit() -> None:
    soft = replace(MESSAGE, level="soft", usage=1100, threshold=1000)

    assert MESSAGE.subject() == (
        "[metering] Acme (account 12): connections at the hard level, "
        "2600 of hard limit 2500 (2026-11)"
    )
    assert soft.subject() == (
        "[metering] Acme (account 12): connections at the soft level, 1100 of quota 1000 (2026-11)"
    )
    assert "\n" not in replace(MESSAGE, account_name="Acme\r\nBcc: x@y").subject()


@pytest.mark.parametrize(
    ("level", "metric", "rejects", "says"),
    [
        ("warning", "messages", True, ["nearing its quota", "Nothing is refused"]),
        ("soft", "connections", True, ["over its quota", "Contact the customer"]),
        ("hard", "connections", True, ["New connections are being refused (code 40111)"]),
        ("hard", "messages", True, ["New messages are being refused (code 40112)"]),
        ("hard", "channels", False, ["Nothing is being refused", "only notifies"]),
    ],
)
def test_the_body_tells_staff_what_happened_and_what_to_do(
    level: str, metric: str, rejects: bool, says: list[str]
) -> None:
    body = replace(MESSAGE, level=level, metric=metric, rejects=rejects).body()

    for text in says:
        assert text in body
    assert "Acme (id 12)" in body
    assert "2026-11" in body


def test_a_webhook_arrives_signed_and_the_receiver_can_verify_it(receiver: Receiver) -> None:
    detail = webhook(receiver).send(MESSAGE)

    assert detail.startswith("HTTP 204 in ")
    [request] = receiver.requests
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["x-metering-delivery"] == "31"
    assert request.body == MESSAGE.to_json()
    timestamp, signature = headers["x-metering-timestamp"], headers["x-metering-signature"]
    assert abs(int(timestamp) - time.time()) < 60
    assert signature.startswith("v1=")

    assert verify_signature(SECRET, timestamp, request.body, signature)
    assert not verify_signature(SECRET, timestamp, request.body.replace(b"2600", b"26"), signature)
    assert not verify_signature("another secret", timestamp, request.body, signature)
    assert not verify_signature(SECRET, int(timestamp) - 1, request.body, signature)
    # A request captured and replayed later is refused, even with its signature intact.
    assert not verify_signature(
        SECRET, timestamp, request.body, signature, now=int(timestamp) + 301
    )
    assert verify_signature(SECRET, timestamp, request.body, signature, now=int(timestamp) + 300)
    assert not verify_signature(SECRET, "yesterday", request.body, signature)
    assert not verify_signature(SECRET, timestamp, request.body, "v1=00")


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(500, True), (503, True), (408, True), (429, True), (400, False), (404, False), (301, False)],
)
def test_webhook_failures_are_retried_only_when_trying_again_can_help(
    receiver: Receiver, status: int, retryable: bool
) -> None:
    receiver.fail(status)

    with pytest.raises(DeliveryError) as failure:
        webhook(receiver).send(MESSAGE)

    assert failure.value.retryable is retryable
    assert failure.value.detail.startswith(f"HTTP {status} in ")


def test_an_unreachable_or_slow_receiver_is_retried(receiver: Receiver) -> None:
    unreachable = WebhookChannel(f"http://127.0.0.1:{free_port()}/", SECRET, TIMEOUT)
    with pytest.raises(DeliveryError) as refused:
        unreachable.send(MESSAGE)
    assert refused.value.retryable
    assert "ConnectError" in refused.value.detail

    receiver.delay = 0.5
    with pytest.raises(DeliveryError) as slow:
        webhook(receiver, timeout=timedelta(seconds=0.1)).send(MESSAGE)
    assert slow.value.retryable
    assert slow.value.detail.startswith("timed out after ")


def test_an_email_arrives_with_the_subject_and_a_message_id_naming_the_delivery(
    smtp: SmtpServer,
) -> None:
    detail = mail_to(smtp.port).send(MESSAGE)

    assert detail.startswith("SMTP accepted for 2 of 2 recipients in ")
    [mail] = smtp.mailbox.mails
    assert mail.mail_from == "metering@example.test"
    assert mail.rcpt_tos == ["ops@example.test", "billing@example.test"]
    assert mail.message["Subject"] == MESSAGE.subject()
    assert mail.message["Message-ID"] == "<metering-alert-7-31@metering>"
    assert mail.message["To"] == "ops@example.test, billing@example.test"
    body = mail.message.get_body(("plain",))
    assert body is not None
    assert "New connections are being refused" in body.get_content()


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [("451 4.3.0 Try again later", True), ("554 5.7.1 Message rejected", False)],
)
def test_smtp_temporary_replies_are_retried_and_permanent_ones_are_not(
    smtp: SmtpServer, reply: str, retryable: bool
) -> None:
    smtp.mailbox.refuse(reply)

    with pytest.raises(DeliveryError) as failure:
        mail_to(smtp.port).send(MESSAGE)

    assert failure.value.retryable is retryable
    assert failure.value.detail == f"SMTP {reply}"
    assert smtp.mailbox.mails == []


def test_an_unreachable_smtp_server_is_retried() -> None:
    with pytest.raises(DeliveryError) as failure:
        mail_to(free_port()).send(MESSAGE)

    assert failure.value.retryable


# aiosmtpd warns about AUTH without TLS: the test has no certificate a client would trust.
@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_smtp_login_with_the_right_password_sends_and_a_wrong_one_is_not_retried(
    smtp_with_auth: SmtpServer,
) -> None:
    port = smtp_with_auth.port

    mail_to(port, username="alerts", password="s3cret").send(MESSAGE)
    with pytest.raises(DeliveryError) as failure:
        mail_to(port, username="alerts", password="wrong").send(MESSAGE)

    assert len(smtp_with_auth.mailbox.mails) == 1
    assert not failure.value.retryable
    assert failure.value.detail.startswith("SMTP 535")


def test_only_the_configured_channels_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("METERING_")]:
        if not name.startswith("METERING_TEST_"):
            monkeypatch.delenv(name)

    assert channels_from(Settings()) == {}
    both = channels_from(
        Settings(
            alert_webhook_url="https://hooks.example.test/metering",
            alert_webhook_secret=SECRET,
            smtp_host="mail.example.test",
            alert_email_to=["ops@example.test"],
        )
    )
    assert sorted(both) == ["email", "webhook"]
    assert isinstance(both["webhook"], WebhookChannel)
    assert both["webhook"].timeout == timedelta(seconds=5)
    # An SMTP server with nobody to write to is no channel.
    assert channels_from(Settings(smtp_host="mail.example.test")) == {}
