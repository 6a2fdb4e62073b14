"""Counting across frontends and datacenters: absolute counts, incarnations, distinct channels,
the tick's per-account sums, and one tick per second."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from metering.gateway.sdk import Meter, ThreadSafeMeter
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore, LiveValue, Transport
from tests.conftest import Env
from tests.scratch import REDIS_URL, delete_keys


@pytest.fixture
def stores(env: Env) -> Iterator[tuple[GlobalStore, DatacenterStore]]:
    client = redis.Redis.from_url(REDIS_URL)
    g = GlobalStore(client, env.prefix)
    client.hset(g.key("apps"), mapping={"1": "100", "2": "100", "3": "200"})
    yield g, DatacenterStore(client, env.prefix, "dc1")
    client.close()


def run_tick(g: GlobalStore, dcs: dict[str, DatacenterStore], second: int, timeout: float = 3.0):
    return tick(g, dcs, liveness_timeout=timeout, sample_retention=1000, now=second)


def meter(dc: DatacenterStore, frontend_id: str, timeout: float = 3.0) -> Meter:
    return Meter(dc, frontend_id, liveness_timeout=timeout)


def test_counts_are_summed_per_app_and_transport_across_frontends(stores) -> None:
    g, dc = stores
    a, b = meter(dc, "fe-a"), meter(dc, "fe-b")
    for _ in range(3):
        a.connection_opened("1", Transport.WEBSOCKET)
    a.connection_opened("1", Transport.STREAMING)
    b.connection_opened("1", Transport.WEBSOCKET)
    b.connection_opened("1", Transport.LONG_POLL)
    b.connection_opened("2", Transport.WEBSOCKET)
    a.connection_closed("1", Transport.WEBSOCKET)
    a.flush()
    b.flush()

    assert run_tick(g, {"dc1": dc}, 1000).committed
    assert g.app_value("1") == LiveValue(websocket=3, streaming=1, long_poll=1, channels=0)
    assert g.app_value("2") == LiveValue(websocket=1, streaming=0, long_poll=0, channels=0)


def test_an_account_counts_the_sum_of_its_apps_at_each_tick(stores) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_opened("1")
    fe.connection_opened("2")
    fe.connection_opened("2")
    fe.connection_opened("3")
    fe.flush()
    run_tick(g, {"dc1": dc}, 1000)
    assert g.account_value("100").connections == 3
    assert g.account_value("200").connections == 1

    fe.connection_closed("2")
    fe.connection_opened("1")
    fe.flush()
    run_tick(g, {"dc1": dc}, 1001)
    assert g.account_value("100").connections == 3
    samples = dict(g.samples())
    assert samples[1000].accounts == {"100": LiveValue(3, 0, 0, 0), "200": LiveValue(1, 0, 0, 0)}
    # The second tick changed app 1 and 2 but the account's sum stayed: nothing to record.
    assert set(samples[1001].apps) == {"1", "2"}
    assert samples[1001].accounts == {}


def test_a_channel_attached_on_several_frontends_is_one_channel(stores) -> None:
    g, dc = stores
    fes = [meter(dc, f"fe-{i}") for i in range(3)]
    for fe in fes:
        fe.connection_opened("1")
        fe.channel_attached("1", "room:lobby")
        fe.channel_attached("1", "room:lobby")  # a second connection on the same frontend
        fe.flush()
    fes[0].channel_attached("1", "weird|name")
    fes[0].flush()
    run_tick(g, {"dc1": dc}, 1000)
    assert g.app_value("1").channels == 2
    assert g.account_value("100").channels == 2

    for fe in fes[:2]:
        fe.channel_detached("1", "room:lobby")
        fe.channel_detached("1", "room:lobby")
        fe.flush()
    run_tick(g, {"dc1": dc}, 1001)
    assert g.app_value("1").channels == 2  # still attached on the third frontend

    fes[2].channel_detached("1", "room:lobby")
    fes[2].flush()
    run_tick(g, {"dc1": dc}, 1002)
    assert g.app_value("1").channels == 2  # one connection there still has it

    fes[2].channel_detached("1", "room:lobby")
    fes[2].flush()
    run_tick(g, {"dc1": dc}, 1003)
    assert g.app_value("1").channels == 1  # only "weird|name" remains


def test_two_ticks_for_one_second_count_it_once(stores) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_opened("1")
    fe.flush()
    first = run_tick(g, {"dc1": dc}, 5000)
    fe.connection_opened("1")
    fe.flush()
    again = run_tick(g, {"dc1": dc}, 5000)
    earlier = run_tick(g, {"dc1": dc}, 4999)
    assert (first.committed, again.committed, earlier.committed) == (True, False, False)
    assert [second for second, _ in g.samples()] == [5000]
    # What the refused tick read is not lost: the next second picks it up.
    assert g.app_value("1").websocket == 1
    assert run_tick(g, {"dc1": dc}, 5001).committed
    assert g.app_value("1").websocket == 2


def test_concurrent_ticks_for_one_second_commit_exactly_once(stores) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_opened("1")
    fe.flush()
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def racer() -> None:
        client = redis.Redis.from_url(REDIS_URL)
        mine_g = GlobalStore(client, g.base[1:-1])
        mine_dc = DatacenterStore(client, g.base[1:-1], "dc1")
        barrier.wait()
        results.append(run_tick(mine_g, {"dc1": mine_dc}, 7000).committed)
        client.close()

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert len(g.samples()) == 1


def test_a_missed_tick_is_recorded_as_a_gap_not_invented(stores) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_opened("1")
    fe.flush()
    run_tick(g, {"dc1": dc}, 100)
    fe.connection_opened("1")
    fe.flush()
    result = run_tick(g, {"dc1": dc}, 104)
    assert result.gap == 4
    assert [(s, sample.gap) for s, sample in g.samples()] == [(100, 1), (104, 4)]


def test_a_silent_frontend_is_reaped_after_the_liveness_timeout(stores) -> None:
    g, dc = stores
    alive, dead = meter(dc, "alive", 0.6), meter(dc, "dead", 0.6)
    alive.connection_opened("1")
    dead.connection_opened("1")
    dead.connection_opened("1")
    dead.channel_attached("1", "c")
    alive.flush()
    dead.flush()
    run_tick(g, {"dc1": dc}, 100, timeout=0.6)
    assert g.app_value("1") == LiveValue(3, 0, 0, 1)

    # "dead" stops flushing (as a killed process would); "alive" keeps its heartbeat.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        alive.flush()
        time.sleep(0.1)
    run_tick(g, {"dc1": dc}, 101, timeout=0.6)
    assert g.app_value("1") == LiveValue(1, 0, 0, 0)
    assert set(dc.incarnations()) == {alive.incarnation}


def test_a_frontend_restarted_under_the_same_id_never_double_counts(stores) -> None:
    g, dc = stores
    old = meter(dc, "fe-a")
    for _ in range(5):
        old.connection_opened("1")
    old.channel_attached("1", "c")
    old.flush()
    run_tick(g, {"dc1": dc}, 100)
    assert g.app_value("1").websocket == 5

    # The process dies without a word and comes back at once; its clients reconnect.
    new = meter(dc, "fe-a")
    for _ in range(5):
        new.connection_opened("1")
    assert new.flush() == "replaced"
    run_tick(g, {"dc1": dc}, 101)
    assert g.app_value("1") == LiveValue(5, 0, 0, 0)

    # Should the old process still be running, it learns it no longer counts.
    old.connection_opened("1")
    assert old.flush() == "superseded"
    assert old.superseded
    run_tick(g, {"dc1": dc}, 102)
    assert g.app_value("1").websocket == 5


def test_a_repeated_or_lost_flush_heals_at_the_next_one(stores) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_opened("1")
    fe.flush()
    # Replay the same absolute write (a retried network call): nothing is added twice.
    dc.flush(
        fe.incarnation,
        full=False,
        timeout=3,
        epoch="x",
        conns=[("1|w", 1)],
        channels=[],
        counters=[],
    )
    fe.connection_opened("1")
    fe.connection_opened("1")
    fe.flush()
    run_tick(g, {"dc1": dc}, 100)
    assert g.app_value("1").websocket == 3


def test_counts_survive_redis_losing_everything(stores, env: Env) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    for _ in range(4):
        fe.connection_opened("1")
    fe.channel_attached("1", "c")
    fe.flush()
    run_tick(g, {"dc1": dc}, 100)
    gone = meter(dc, "fe-b")
    gone.connection_opened("2")
    gone.flush()
    run_tick(g, {"dc1": dc}, 101)

    # Redis restarts empty (only this test's keys, so other tests are untouched); the registry
    # comes back with the next sync. fe-b died with it and never reports again.
    delete_keys(env.redis, env.prefix)
    env.redis.hset(g.key("apps"), mapping={"1": "100", "2": "100"})
    fe.connection_opened("1")
    assert fe.flush() in ("ok", "replaced")
    result = run_tick(g, {"dc1": dc}, 102)
    assert result.resynced == ("dc1",)
    assert g.app_value("1") == LiveValue(5, 0, 0, 1)
    assert g.app_value("2") == LiveValue(0, 0, 0, 0)
    assert g.account_value("100").connections == 5


def test_a_datacenter_redis_that_restarts_is_resynced_without_losing_the_others(
    env: Env,
) -> None:
    # Two datacenters, each with a Redis of its own (database numbers stand for servers).
    primary = redis.Redis.from_url(REDIS_URL)
    dc2_client = redis.Redis.from_url(REDIS_URL.rsplit("/", 1)[0] + "/1")
    g = GlobalStore(primary, env.prefix)
    primary.hset(g.key("apps"), mapping={"1": "100"})
    dc1, dc2 = (
        DatacenterStore(primary, env.prefix, "dc1"),
        DatacenterStore(dc2_client, env.prefix, "dc2"),
    )
    dcs = {"dc1": dc1, "dc2": dc2}
    try:
        a, b = meter(dc1, "fe-a"), meter(dc2, "fe-b")
        for _ in range(2):
            a.connection_opened("1")
        for _ in range(3):
            b.connection_opened("1")
        a.channel_attached("1", "shared")
        b.channel_attached("1", "shared")
        b.channel_attached("1", "only-b")
        a.flush()
        b.flush()
        run_tick(g, dcs, 100)
        assert g.app_value("1") == LiveValue(5, 0, 0, 2)

        a.channel_detached("1", "shared")
        a.flush()
        run_tick(g, dcs, 101)
        assert g.app_value("1").channels == 2  # still attached in dc2

        delete_keys(dc2_client, env.prefix)
        b.connection_closed("1")
        b.flush()  # unknown to the emptied Redis: resyncs its whole state
        result = run_tick(g, dcs, 102)
        assert result.resynced == ("dc2",)
        assert g.app_value("1") == LiveValue(4, 0, 0, 2)
        assert g.account_value("100") == LiveValue(4, 0, 0, 2)
    finally:
        delete_keys(dc2_client, env.prefix)
        dc2_client.close()
        primary.close()


def test_message_and_open_counters_are_cumulative_per_incarnation(stores) -> None:
    _g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_opened("1")
    fe.connection_opened("1")
    fe.connection_closed("1")
    fe.message_published("1", "c", 10)
    fe.message_delivered("1", "c", 10, count=3)
    fe.flush()
    fe.message_published("1", "c", 5)
    fe.flush()
    fe.connection_refused("2")
    fe.channel_refused("2")
    fe.message_refused("1")
    fe.message_refused("1", count=4)  # a refused batch of four
    fe.flush()
    # One field per app: opened, refused, pub_n, pub_b, del_n, del_b, ch_refused,
    # msg_refused, all absolute.
    stored = dc.client.hgetall(dc.key(f"fe:{fe.incarnation}:counters"))
    assert {k.decode(): v.decode() for k, v in stored.items()} == {
        "1": "2 0 2 15 3 30 0 5",
        "2": "0 1 0 0 0 0 1 0",
    }
    fe.channel_refused("3")
    fe.flush()  # only the app that changed is sent
    stored = dc.client.hgetall(dc.key(f"fe:{fe.incarnation}:counters"))
    assert {k.decode(): v.decode() for k, v in stored.items()} == {
        "1": "2 0 2 15 3 30 0 5",
        "2": "0 1 0 0 0 0 1 0",
        "3": "0 0 0 0 0 0 1 0",
    }
    sent = dict(
        dc.client.zrange(dc.key(f"fe:{fe.incarnation}:counter-apps"), 0, -1, withscores=True)
    )
    assert sent[b"3"] > sent[b"1"] == sent[b"2"]


def test_refusals_counted_from_several_threads_are_all_counted(stores) -> None:
    _g, dc = stores
    fe = ThreadSafeMeter(dc, "fe-a")

    def refuse() -> None:
        for _ in range(2000):
            fe.channel_refused("1")
            fe.message_refused("1", count=2)
            fe.connection_refused("1")

    threads = [threading.Thread(target=refuse) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fe.flush()
    stored = dc.client.hget(dc.key(f"fe:{fe.incarnation}:counters"), "1")
    assert stored == b"0 8000 0 0 0 0 8000 16000"


def test_a_close_without_an_open_never_goes_negative(stores) -> None:
    g, dc = stores
    fe = meter(dc, "fe-a")
    fe.connection_closed("1")
    fe.channel_detached("1", "c")
    fe.connection_opened("1")
    fe.flush()
    run_tick(g, {"dc1": dc}, 100)
    assert g.app_value("1") == LiveValue(1, 0, 0, 0)
