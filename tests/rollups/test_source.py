"""What the aggregator reads of the frontends' counters, against the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from metering.core.redis import _sync_client
from metering.core.settings import EMBEDDED_REDIS_URL
from metering.gateway.sdk import Meter
from metering.live.store import DatacenterStore
from metering.rollups import source
from metering.rollups.models import FRONTEND_COUNTERS
from tests.scratch import REDIS_URL, delete_keys


@pytest.fixture
def dc() -> Iterator[DatacenterStore]:
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    yield DatacenterStore(client, prefix, "dc1")
    delete_keys(client, prefix)
    client.close()


def flush(dc: DatacenterStore, inc: str, counters: dict[str, tuple[int, ...]]) -> int:
    """Flush ``counters`` (app -> eight totals) as ``inc``; the sequence the flush took."""
    status = dc.flush(
        inc, full=True, timeout=60, epoch="e", conns=[], channels=[], counters=counters.items()
    )
    assert status in ("ok", "replaced")
    return int(dc.client.get(dc.key("seq")))  # type: ignore[arg-type]


def as_dict(read: tuple[Any, Any]) -> dict[int, tuple[int, ...]]:
    ids, totals = read
    assert ids.dtype == np.int64
    assert totals.dtype == np.int64
    assert ids.shape == (len(ids),)
    assert totals.shape == (len(ids), len(FRONTEND_COUNTERS))
    return {int(a): tuple(int(x) for x in row) for a, row in zip(ids, totals, strict=True)}


def test_only_the_apps_changed_after_the_sequence_are_read_with_their_absolute_totals(
    dc: DatacenterStore,
) -> None:
    meter = Meter(dc, "fe-a")
    meter.connection_opened("1")
    meter.connection_opened("1", "streaming")
    meter.message_published("1", "c", 10)
    meter.message_delivered("1", "c", 10, count=3)
    meter.connection_refused("2")
    for app in ("3", "4", "5"):
        meter.message_published(app, "c", 7)
    meter.channel_refused("6")
    meter.message_refused("6", count=4)
    assert meter.flush() == "ok"
    inc = meter.incarnation
    first = source.counter_changes(dc, 0).seq

    meter.message_published("1", "c", 5)
    meter.connection_refused("2")  # apps 3, 4, 5 and 6 do not change
    assert meter.flush() == "ok"
    assert meter.flush() == "ok"  # a heartbeat sends no counters and logs no change
    second = source.counter_changes(dc, 0).seq
    assert second > first

    assert as_dict(source.changed_counters(dc, [inc], first)[inc]) == {
        1: (2, 0, 2, 15, 3, 30, 0, 0),
        2: (0, 2, 0, 0, 0, 0, 0, 0),
    }
    assert as_dict(source.changed_counters(dc, [inc], 0)[inc]) == {
        1: (2, 0, 2, 15, 3, 30, 0, 0),
        2: (0, 2, 0, 0, 0, 0, 0, 0),
        **dict.fromkeys((3, 4, 5), (0, 0, 1, 7, 0, 0, 0, 0)),
        6: (0, 0, 0, 0, 0, 0, 1, 4),
    }
    assert as_dict(source.changed_counters(dc, [inc], second)[inc]) == {}


def test_when_most_apps_changed_the_whole_hash_is_read_with_the_same_totals(
    dc: DatacenterStore,
) -> None:
    meter = Meter(dc, "fe-a")
    for app in ("1", "2", "3"):
        meter.message_published(app, "c", 10)
    assert meter.flush() == "ok"
    first = source.counter_changes(dc, 0).seq
    meter.message_published("1", "c", 5)
    meter.message_published("2", "c", 5)  # two of three moved: the whole hash is read
    assert meter.flush() == "ok"

    # App 3 comes too, with the absolute total its mark already holds (Marks.apply adds
    # nothing for it); the moved apps' totals are the same as a read of them alone.
    assert as_dict(source.changed_counters(dc, [meter.incarnation], first)[meter.incarnation]) == {
        1: (0, 0, 2, 15, 0, 0, 0, 0),
        2: (0, 0, 2, 15, 0, 0, 0, 0),
        3: (0, 0, 1, 10, 0, 0, 0, 0),
    }


def test_a_repeated_flush_never_adds_anything(dc: DatacenterStore) -> None:
    totals = {"7": (1, 2, 3, 4, 5, 6, 7, 8)}
    first = flush(dc, "fe-a#1", totals)
    again = flush(dc, "fe-a#1", totals)  # a retried write: the same absolute totals
    assert again > first
    assert as_dict(source.changed_counters(dc, ["fe-a#1"], first)["fe-a#1"]) == {
        7: (1, 2, 3, 4, 5, 6, 7, 8)
    }


def test_every_app_of_a_large_flush_is_logged_with_the_flushs_sequence(
    dc: DatacenterStore,
) -> None:
    # More apps than one HSET / ZADD chunk of flush.lua (500) takes.
    totals = {str(a): (a, 0, 2 * a, 3 * a, 4 * a, 10**12 + a, a % 3, a) for a in range(1, 1235)}
    seq = flush(dc, "fe-a#1", totals)
    logged = dc.client.zrange(dc.key("fe:fe-a#1:counter-apps"), 0, -1, withscores=True)
    assert len(logged) == 1234
    assert {score for _, score in logged} == {seq}
    read = as_dict(source.changed_counters(dc, ["fe-a#1"], 0)["fe-a#1"])
    assert read == {int(a): t for a, t in totals.items()}
    assert as_dict(source.changed_counters(dc, ["fe-a#1"], seq)["fe-a#1"]) == {}


def test_several_incarnations_in_two_round_trips(
    dc: DatacenterStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    flush(dc, "fe-a#1", {"1": (1, 0, 0, 0, 0, 0, 0, 0)})
    flush(dc, "fe-b#1", {"1": (2, 0, 0, 0, 0, 0, 0, 0), "2": (3, 0, 0, 0, 0, 0, 0, 1)})
    pipelines: list[Any] = []
    real = dc.client.pipeline

    def counted(*args: Any, **kwargs: Any) -> Any:
        pipelines.append(real(*args, **kwargs))
        return pipelines[-1]

    sent: list[int] = []

    class Sent(source._Sent):
        def __init__(self, client: Any, commands: Any) -> None:
            sent.append(len(commands))
            super().__init__(client, commands)

    monkeypatch.setattr(dc.client, "pipeline", counted)
    monkeypatch.setattr(source, "_Sent", Sent)
    read = source.changed_counters(dc, ["fe-a#1", "fe-b#1", "fe-never#1"], 0)
    assert (len(pipelines), sent) == (1, [3])  # how much moved, then the three hashes
    assert {inc: as_dict(r) for inc, r in read.items()} == {
        "fe-a#1": {1: (1, 0, 0, 0, 0, 0, 0, 0)},
        "fe-b#1": {1: (2, 0, 0, 0, 0, 0, 0, 0), 2: (3, 0, 0, 0, 0, 0, 0, 1)},
        "fe-never#1": {},
    }
    assert source.changed_counters(dc, [], 0) == {}


def test_values_that_are_gone_or_unreadable_are_skipped(dc: DatacenterStore) -> None:
    flush(dc, "fe-a#1", {"1": (1,) * 8, "2": (2,) * 8})
    flush(dc, "fe-b#1", {"5": (5,) * 8})
    flush(dc, "fe-c#1", {str(a): (a, 0, 0, 0, 0, 0, 0, 0) for a in range(7, 14)})
    dc.client.hdel(dc.key("fe:fe-a#1:counters"), "1")
    dc.client.delete(dc.key("fe:fe-b#1:counters"))  # the hash deleted, the log still there
    # A gateway's bug: a value that is neither eight integers nor an older gateway's six
    # costs that app only, even where the numbers of two such values add up to 2 x 8, and a
    # number past int64 too (the largest int64 is read as it is).
    for app, value in (
        ("8", "8 0 0 0 0"),
        ("10", "10 0 0 0 0 0 0 0 0 0 0"),
        ("11", "7 0 0 0 0 0 x 0"),
        ("12", "12 0 0 0 0 0 0 99999999999999999999"),
        ("13", f"13 0 0 0 0 0 0 {2**63 - 1}"),
    ):
        dc.client.hset(dc.key("fe:fe-c#1:counters"), app, value)
    read = source.changed_counters(dc, ["fe-a#1", "fe-b#1", "fe-c#1"], 0)
    assert {inc: as_dict(r) for inc, r in read.items()} == {
        "fe-a#1": {2: (2,) * 8},
        "fe-b#1": {},
        "fe-c#1": {
            7: (7, 0, 0, 0, 0, 0, 0, 0),
            9: (9, 0, 0, 0, 0, 0, 0, 0),
            13: (13, 0, 0, 0, 0, 0, 0, 2**63 - 1),
        },
    }


def test_an_older_gateways_six_totals_are_read_with_no_refusals_beside_eight(
    dc: DatacenterStore,
) -> None:
    # An older gateway (or a Redis written before the upgrade) holds six totals per app: read
    # with 0 channel attaches and messages refused, in the same hash as eight-total values.
    flush(dc, "fe-a#1", {"1": (1, 2, 3, 4, 5, 6, 7, 8), "2": (0,) * 8, "3": (0,) * 8})
    dc.client.hset(dc.key("fe:fe-a#1:counters"), mapping={"2": "9 0 3 30 6 60", "3": "1 1 1 1 1 1"})
    old = {2: (9, 0, 3, 30, 6, 60, 0, 0), 3: (1, 1, 1, 1, 1, 1, 0, 0)}
    both = {1: (1, 2, 3, 4, 5, 6, 7, 8), **old}
    assert as_dict(source.changed_counters(dc, ["fe-a#1"], 0)["fe-a#1"]) == both
    # Only old values, and old values read one by one beside a malformed one.
    flush(dc, "fe-b#1", {"4": (0,) * 8, "5": (0,) * 8})
    dc.client.hset(dc.key("fe:fe-b#1:counters"), mapping={"4": "4 0 0 0 0 0", "5": "5 x"})
    assert as_dict(source.changed_counters(dc, ["fe-b#1"], 0)["fe-b#1"]) == {
        4: (4, 0, 0, 0, 0, 0, 0, 0)
    }


def test_forgetting_an_incarnation_removes_its_counters_and_their_log(
    dc: DatacenterStore,
) -> None:
    meter = Meter(dc, "fe-a")
    meter.message_published("1", "c", 3)
    assert meter.flush() == "ok"
    assert dc.deregister(meter.incarnation)  # reaped: its counters stay for the aggregator
    inc = meter.incarnation
    keys = [dc.key(f"fe:{inc}:counters"), dc.key(f"fe:{inc}:counter-apps")]
    assert dc.client.exists(*keys) == 2
    changes = source.counter_changes(dc, 0)
    assert (changes.incarnations, changes.retired) == ([inc], {inc})
    assert as_dict(source.changed_counters(dc, [inc], 0)[inc]) == {1: (0, 0, 1, 3, 0, 0, 0, 0)}

    source.forget_incarnations(dc, [inc])
    assert dc.client.exists(*keys) == 0
    changes = source.counter_changes(dc, 0)
    assert (changes.incarnations, changes.retired) == ([], set())
    assert as_dict(source.changed_counters(dc, [inc], 0)[inc]) == {}


def test_a_flush_without_eight_totals_is_refused_before_redis(dc: DatacenterStore) -> None:
    # The six of an older gateway are read, never written: this one writes all eight.
    for totals in ((1, 2, 3), (1, 2, 3, 4, 5, 6)):
        with pytest.raises(ValueError, match="8 counter totals"):
            flush(dc, "fe-a#1", {"1": totals})


# The engine's own clients (its factory, with their production options): the real Redis over
# each protocol, and the embedded stand-in.
_QUERY = "&" if "?" in REDIS_URL else "?"
CLIENTS = {
    "resp2": lambda: _sync_client(f"{REDIS_URL}{_QUERY}protocol=2"),
    "resp3": lambda: _sync_client(f"{REDIS_URL}{_QUERY}protocol=3"),
    "embedded": lambda: _sync_client(EMBEDDED_REDIS_URL),
}


@pytest.mark.parametrize("make_client", CLIENTS.values(), ids=CLIENTS.keys())
def test_counters_asked_for_early_are_read_later_and_a_request_left_unread_leaks_nothing(
    make_client: Any,
) -> None:
    # The aggregator asks for the counters before it folds the samples and reads them after
    # (Redis prepares the replies meanwhile), on a connection of its own; the hash's replies
    # come raw: a flat list of fields and values (RESP2) or a map (RESP3).
    client = make_client()
    prefix = f"t{uuid.uuid4().hex[:12]}"
    dc = DatacenterStore(client, prefix, "dc1")
    try:
        flush(dc, "fe-b#1", {"1": (5,) * 8, "2": (6,) * 8, "3": (7,) * 8})
        first = flush(dc, "fe-a#1", {str(a): (0,) * 8 for a in range(1, 40)})
        totals = {str(a): (a, 0, a, 10 * a, 0, 0, 0, 1) for a in range(1, 40)}
        flush(dc, "fe-a#1", totals)  # all moved: the whole hash is read
        flush(dc, "fe-b#1", {"2": (8,) * 8})  # one of three moved: only it is read
        expected = {
            "fe-a#1": {int(a): t for a, t in totals.items()},
            "fe-b#1": {2: (8,) * 8},
        }
        with source.request_counters(dc, ["fe-a#1", "fe-b#1"], first) as pending:
            client.set(dc.key("probe"), "meanwhile")  # the client is free meanwhile
            read = pending.result()
        assert {inc: as_dict(r) for inc, r in read.items()} == expected

        # Asked for and never read (the cycle failed in between): the connection holding the
        # replies is dropped, not handed back for the next command to read them as its own.
        with source.request_counters(dc, ["fe-a#1", "fe-b#1"], first):
            pass
        assert client.get(dc.key("probe")) == b"meanwhile"
        read = source.changed_counters(dc, ["fe-a#1", "fe-b#1"], first)
        assert {inc: as_dict(r) for inc, r in read.items()} == expected
    finally:
        delete_keys(client, prefix)
        client.close()
