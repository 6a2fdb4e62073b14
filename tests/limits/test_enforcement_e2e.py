"""Package limits end to end, all real: Celery beat and a worker (ticks, aggregation, alert
delivery), two gateway processes, WebSocket clients, an SMTP server and a webhook receiver.

An account on a package with 2 connections included and a hard limit of 4: the warning, soft
and hard levels each alert exactly once, by e-mail and by webhook, although the worker is
SIGKILLed after the first alerts committed and before they were sent; at the hard limit the
next connection, on the other gateway, is refused with 403 / 40111 while the open ones stay;
after some close, connections are accepted again; a staff override lifts the rejection at
once; every refused connection is counted in the rollups."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from metering.core import redis as redis_clients
from metering.core.database import get_engine, unit_of_work
from metering.limits import staff
from metering.limits.channels import verify_signature
from metering.limits.models import AlertDelivery, LimitAlert
from metering.limits.store import AdmissionStore
from metering.rollups import query
from metering.rollups.fold import APP
from metering.rollups.periods import Unit
from tests import processes
from tests.conftest import Env
from tests.e2e.test_gateway_counting import Clients
from tests.factories import tenant
from tests.limits.conftest import Receiver, SmtpServer

SECRET = "e2e-secret"


def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - started


def levels_alerted(account_id: int) -> list[tuple[str, str]]:
    with get_engine().connect() as conn:
        rows = conn.execute(
            select(LimitAlert.metric, LimitAlert.level)
            .where(LimitAlert.account_id == account_id)
            .order_by(LimitAlert.id)
        ).all()
    return [(r[0], r[1]) for r in rows]


def statuses() -> list[str]:
    with get_engine().connect() as conn:
        return list(conn.scalars(select(AlertDelivery.status)))


def refused_in_rollups(app_id: int) -> int:
    with get_engine().connect() as conn:
        entries = query.periods(conn, query.Query(APP, app_id, Unit.MONTH, limit=1))
    return int(entries[0]["connections.all.refused"]) if entries else 0


@pytest.fixture
def clients() -> Clients:  # type: ignore[misc]
    c = Clients()
    yield c  # type: ignore[misc]
    c.shutdown()


def test_limits_alert_once_refuse_at_the_hard_limit_and_lift(  # noqa: PLR0917 (a script)
    env: Env,
    tmp_path: Path,
    receiver: Receiver,
    smtp: SmtpServer,
    clients: Clients,
    start_gateway: Callable[..., processes.Process],
) -> None:
    t = tenant("stats", name="limited")
    with unit_of_work() as session:
        staff.create_package(session, "tiny", {"connections": (2, 4)})
        change = staff.set_package(session, t.account_id, "tiny", by="e2e")
    store = AdmissionStore(redis_clients.primary(), env.prefix)
    store.write(change.admission)

    celery = shutil.which("celery", path=str(processes.BIN))
    assert celery
    common = {
        "METERING_AGGREGATE_INTERVAL": "1",
        "METERING_ALERT_SWEEP_INTERVAL": "1",
        "METERING_LIMITS_REFRESH_INTERVAL": "0.5",
        "METERING_ADMISSION_REFRESH_INTERVAL": "1",
        "METERING_ALERT_WEBHOOK_URL": receiver.url,
        "METERING_ALERT_WEBHOOK_SECRET": SECRET,
        "METERING_SMTP_HOST": "127.0.0.1",
        "METERING_SMTP_PORT": str(smtp.port),
        "METERING_ALERT_EMAIL_TO": "staff@example.com",
    }
    for name, value in common.items():
        env.vars[name] = value
    beat = processes.Process(
        [celery, "-A", "workers", "beat", "--loglevel", "INFO", "-s", str(tmp_path / "beat")],
        env.child_env(), ready="beat: Starting", timeout=60,
    )  # fmt: skip
    # As in production: the ticks and aggregation in a worker of their own, the rest (alert
    # deliveries among it) in another.
    counting = processes.Process(
        [celery, "-A", "workers", "worker", "--loglevel", "INFO", "-Q", "live,rollups",
         "--concurrency", "1", "-n", f"count-{env.prefix}@%h"],
        env.child_env(), ready="ready.", timeout=60,
    )  # fmt: skip
    worker_args = [celery, "-A", "workers", "worker", "--loglevel", "INFO", "-Q", "celery",
                   "--concurrency", "2", "-n", f"w-{env.prefix}@%h"]  # fmt: skip
    # The first one holds every delivery 30 s before sending it: it is killed meanwhile.
    worker = processes.Process(
        worker_args, env.child_env(METERING_TEST_DELIVERY_PAUSE="30"), ready="ready.", timeout=60
    )
    gw1, gw2 = start_gateway("gw-1"), start_gateway("gw-2")
    try:
        # 2 connections: the warning (80 % of 2) and soft (2) levels, caught by the tick.
        held = clients.connect(gw1.port, t.app_id, 2)
        until(lambda: len(levels_alerted(t.account_id)) == 2, "warning and soft alerts")
        assert levels_alerted(t.account_id) == [("connections", "warning"), ("connections", "soft")]
        until(lambda: "limits.test_pause" in worker.output, "a delivery to start")
        worker.kill()  # the alerts are committed, their deliveries not sent
        assert receiver.accepted == [] and smtp.mailbox.mails == []  # noqa: PT018
        worker = processes.Process(worker_args, env.child_env(), ready="ready.", timeout=60)
        until(lambda: len(receiver.accepted) == 2 and len(smtp.mailbox.mails) == 2, "the sweep")

        # 4 connections on the two gateways: the hard level. The next one is refused on gw2.
        held += clients.connect(gw2.port, t.app_id, 2)
        until(lambda: ("connections", "hard") in levels_alerted(t.account_id), "the hard alert")
        refused = 0  # every refusal the clients met, to find in the rollups

        def attempt(port: int, keep: list | None = None) -> int:  # type: ignore[type-arg]
            nonlocal refused
            status, body = _try_connect(clients, port, t.app_id, keep=keep)
            if status == 403:
                assert body["error"]["code"] == 40111
                refused += 1
            return status

        until(lambda: attempt(gw2.port) == 403, "a refused connection", timeout=5)
        # The open connections stay: each still answers.
        for ws in held:
            assert (
                clients.request(ws, json.dumps({"action": "attach", "channel": "c"}))["action"]
                == "attached"
            )
        assert attempt(gw1.port) == 403  # on the other gateway too

        # Two close: below the hard limit, connections are accepted again.
        clients.close(held[:2])
        held = held[2:]
        until(lambda: attempt(gw2.port, keep=held) == 101, "accepted again", timeout=5)

        # Back at the hard limit (4 open), then a staff override lifts the rejection at once.
        held += clients.connect(gw1.port, t.app_id, 4 - len(held))
        until(lambda: attempt(gw2.port) == 403, "refused again at the hard limit", timeout=5)
        with unit_of_work() as session:
            change = staff.set_override(session, t.account_id, reason="launch day", by="e2e")
        store.write(change.admission)
        lifted = until(lambda: attempt(gw2.port, keep=held) == 101, "the override", timeout=3)
        assert lifted < 1.5

        # Exactly once per level and channel, signed, with nothing left pending.
        until(lambda: len(receiver.accepted) == 3 and len(smtp.mailbox.mails) == 3, "hard sent")
        time.sleep(2)  # more ticks, cycles and sweeps add nothing
        assert levels_alerted(t.account_id) == [("connections", "warning"),
                                                ("connections", "soft"),
                                                ("connections", "hard")]  # fmt: skip
        assert len(receiver.accepted) == 3
        assert len(smtp.mailbox.mails) == 3
        assert statuses() == ["sent"] * 6
        levels = sorted(json.loads(r.body)["level"] for r in receiver.accepted)
        assert levels == ["hard", "soft", "warning"]
        for r in receiver.accepted:
            assert verify_signature(SECRET, r.headers["x-metering-timestamp"], r.body,
                                    r.headers["x-metering-signature"])  # fmt: skip
        subjects = sorted(str(m.message["Subject"]) for m in smtp.mailbox.mails)
        assert all("connections" in s for s in subjects)

        # Every refusal counted as refused in the rollups.
        until(lambda: refused_in_rollups(t.app_id) == refused, f"{refused} refusals counted")
    finally:
        worker.stop(timeout=30)
        counting.stop(timeout=30)
        beat.stop()


def _try_connect(
    clients: Clients,
    port: int,
    app_id: int,
    keep: list | None = None,  # type: ignore[type-arg]
) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Open a WebSocket: (101, {}) if accepted (closed at once unless ``keep``), or the
    refusal's (status, body)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def go() -> tuple[int, dict]:  # type: ignore[type-arg]
        try:
            ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?app={app_id}")
        except InvalidStatus as exc:
            return exc.response.status_code, json.loads(exc.response.body or b"{}")
        await ws.recv()  # connected
        if keep is None:
            await ws.close()
        else:
            keep.append(ws)
            clients.open.append(ws)
        return 101, {}

    return clients.run(go())  # type: ignore[no-any-return]
