"""The gateway's admission decisions, from its copy of the admission state in a real Redis:
refused at the hard limit and let in again below it, a burst between two ticks counted
locally, publishing blocked for the month, a notice applied at once, and a copy that cannot be
refreshed failing open or closed as set."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from metering.gateway.admission import (
    CHANNELS_EXCEEDED,
    CONNECTIONS_EXCEEDED,
    MESSAGES_EXCEEDED,
    UNAVAILABLE,
    Admission,
)
from metering.limits.repository import AdmissionRow
from metering.limits.store import AdmissionStore
from tests.scratch import REDIS_URL, delete_keys

ACCOUNT = 7
THIS_MONTH = datetime.now(UTC).strftime("%Y-%m")


@pytest.fixture
def store() -> Iterator[AdmissionStore]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"adm{time.monotonic_ns()}"
    yield AdmissionStore(client, prefix)
    delete_keys(client, prefix)
    client.close()


def codes(decide, n: int) -> list[int | None]:  # type: ignore[no-untyped-def]
    return [None if (r := decide(ACCOUNT)) is None else r.code for _ in range(n)]


def test_connections_are_refused_at_the_hard_limit_and_let_in_below_it(
    store: AdmissionStore,
) -> None:
    store.write({ACCOUNT: AdmissionRow(connections_hard=10)})
    store.write_live({ACCOUNT: (8, 0)})
    adm = Admission(store)
    adm.refresh()
    # 8 open at the last tick: two more here, then refused until the next copy.
    assert codes(adm.admit_connection, 3) == [None, None, CONNECTIONS_EXCEEDED]
    adm.connection_closed(ACCOUNT)  # one closed here: room for one, not more
    assert codes(adm.admit_connection, 2) == [None, CONNECTIONS_EXCEEDED]
    store.write_live({ACCOUNT: (10, 0)})
    adm.refresh(rows=False)
    assert codes(adm.admit_connection, 1) == [CONNECTIONS_EXCEEDED]
    store.write_live({ACCOUNT: (9, 0)})  # one closed somewhere
    adm.refresh(rows=False)
    assert codes(adm.admit_connection, 2) == [None, CONNECTIONS_EXCEEDED]
    assert adm.admit_connection(ACCOUNT + 1) is None  # nothing enforced for another account


def test_an_account_not_listed_live_may_take_up_to_half_its_limit_before_the_next_tick(
    store: AdmissionStore,
) -> None:
    store.write({ACCOUNT: AdmissionRow(connections_hard=10, channels_hard=4)})
    adm = Admission(store)
    adm.refresh()
    # Not listed: the tick saw it below half (at most 4 of 10); a burst gets 5 more here.
    assert codes(adm.admit_connection, 7) == [None] * 6 + [CONNECTIONS_EXCEEDED]
    assert codes(adm.admit_channel, 4) == [None, None, None, CHANNELS_EXCEEDED]


def test_publishing_is_refused_for_the_rest_of_a_blocked_month(store: AdmissionStore) -> None:
    store.write(
        {ACCOUNT: AdmissionRow(publish_blocked_month=THIS_MONTH, publish_blocked_by="data")}
    )
    adm = Admission(store)
    adm.refresh()
    refusal = adm.admit_message(ACCOUNT)
    assert refusal is not None
    assert refusal.code == MESSAGES_EXCEEDED
    assert "data" in refusal.reason
    assert refusal.retry_after is not None
    assert 0 < refusal.retry_after <= 31 * 86400
    assert adm.admit_connection(ACCOUNT) is None  # connections are not limited here
    store.write({ACCOUNT: AdmissionRow(publish_blocked_month="2000-01", publish_blocked_by="data")})
    adm.refresh()
    assert adm.admit_message(ACCOUNT) is None  # a block of another month is no block


def test_a_notice_applies_a_change_at_once(store: AdmissionStore) -> None:
    adm = Admission(store, refresh_interval=60)  # only the notice can bring the change
    adm.start()
    try:
        assert adm.admit_connection(ACCOUNT) is None
        store.write({ACCOUNT: AdmissionRow(connections_hard=1)})
        store.write_live({ACCOUNT: (1, 0)})
        deadline = time.monotonic() + 2
        while adm.admit_connection(ACCOUNT) is None:
            assert time.monotonic() < deadline, "the notice was not applied"
            time.sleep(0.01)
        store.write({ACCOUNT: AdmissionRow()})  # lifted (a package change, an override)
        deadline = time.monotonic() + 2
        while adm.admit_connection(ACCOUNT) is not None:
            assert time.monotonic() < deadline, "the lift was not applied"
            time.sleep(0.01)
    finally:
        adm.close()


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_copy_that_cannot_be_refreshed_fails_open_or_closed(
    store: AdmissionStore, fail_open: bool
) -> None:
    now = [0.0]
    store.write({ACCOUNT: AdmissionRow(connections_hard=1)})
    store.write_live({ACCOUNT: (5, 0)})
    adm = Admission(store, fail_open=fail_open, stale_after=15, clock=lambda: now[0])
    adm.refresh()
    assert codes(adm.admit_connection, 1) == [CONNECTIONS_EXCEEDED]
    now[0] = 16.0  # no refresh for longer than stale_after: Redis unreachable
    expected = None if fail_open else UNAVAILABLE
    assert codes(adm.admit_connection, 1) == [expected]
    assert [None if (r := adm.admit_message(ACCOUNT + 1)) is None else r.code] == [expected]


def test_the_limits_are_read_whole_only_when_their_version_moved(store: AdmissionStore) -> None:
    store.write({ACCOUNT: AdmissionRow(connections_hard=3)})
    version, rows = store.read_if_changed(None)
    assert rows == {ACCOUNT: AdmissionRow(connections_hard=3)}
    assert store.read_if_changed(version) == (version, None)  # unchanged: not read again
    store.write({ACCOUNT: AdmissionRow()})
    assert store.read_if_changed(version) == (version + 1, {})
