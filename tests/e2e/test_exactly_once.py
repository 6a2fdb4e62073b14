"""Exactly once (DESIGN.md invariants 3 and 4): a real Celery worker, SIGKILLed again and again
in the middle of aggregation cycles (inside the transaction, and between the commit and the
cleanup that follows it) under a steady stream of messages, loses and doubles nothing."""

from __future__ import annotations

import shutil
import threading
import time
from collections import defaultdict
from pathlib import Path

from metering.core import redis as redis_clients
from metering.core.database import get_engine
from metering.gateway.sdk import Meter
from metering.live.store import DatacenterStore
from metering.rollups import query
from metering.rollups.fold import ACCOUNT, APP
from metering.rollups.periods import Unit
from tests import processes
from tests.conftest import Env
from tests.factories import tenant

KILLS = ("before_commit", "after_commit") * 3


def _month_totals(scope: int, entity: int) -> dict[str, int]:
    with get_engine().connect() as conn:
        entries = query.periods(conn, query.Query(scope, entity, Unit.MONTH, limit=12))
    names = ("messages.published.count", "messages.published.data", "messages.delivered.count",
             "messages.delivered.data", "connections.all.opened")  # fmt: skip
    totals = dict.fromkeys(names, 0)
    for e in entries:
        for n in names:
            totals[n] += e[n]
    return totals


def test_killing_the_worker_mid_cycle_loses_and_doubles_nothing(env: Env, tmp_path: Path) -> None:
    a1 = tenant("stats", name="a")
    a2 = tenant("stats", account_id=a1.account_id, name="a")
    b1 = tenant("stats", name="b")
    apps = [a1, a2, b1]
    celery = shutil.which("celery", path=str(processes.BIN))
    assert celery
    child = env.child_env(METERING_AGGREGATE_INTERVAL="0.5", METERING_TEST_AGGREGATE_PAUSE="0.4")

    sent: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    meter = Meter(
        DatacenterStore(redis_clients.primary(), env.prefix, "dc1"), "fe-steady",
        liveness_timeout=3.0, flush_interval=0.1,
    )  # fmt: skip
    meter.start()
    stop = threading.Event()

    def publish() -> None:
        i = 0
        while not stop.is_set():
            t = apps[i % len(apps)]
            size = 10 + i % 300
            meter.message_published(str(t.app_id), "ch", size)
            meter.message_delivered(str(t.app_id), "ch", size, count=3)
            if i % 50 == 0:
                meter.connection_opened(str(t.app_id))
                sent[t.app_id][4] += 1
            s = sent[t.app_id]
            s[0] += 1
            s[1] += size
            s[2] += 3
            s[3] += 3 * size
            i += 1
            time.sleep(0.002)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    beat = processes.Process(
        [celery, "-A", "workers", "beat", "--loglevel", "INFO", "-s", str(tmp_path / "beat")],
        child, ready="beat: Starting", timeout=60,
    )  # fmt: skip
    worker_args = [celery, "-A", "workers", "worker", "--loglevel", "INFO", "--concurrency", "1",
                   "-n", f"w-{env.prefix}@%h"]  # fmt: skip
    worker: processes.Process | None = None
    try:
        for stage in KILLS:
            worker = processes.Process(worker_args, child, ready="ready.", timeout=60)
            _wait_line(worker, f"stage={stage}", timeout=30)
            worker.kill()  # in the middle of the pause: SIGKILL, no cleanup runs
            worker = None
        stop.set()
        publisher.join()
        meter.close()  # final counters, then its incarnation is reaped: final totals apply once

        worker = processes.Process(worker_args, child, ready="ready.", timeout=60)
        want = {("app", t.app_id): sent[t.app_id] for t in apps}
        want[("account", a1.account_id)] = [
            x + y for x, y in zip(sent[a1.app_id], sent[a2.app_id], strict=True)
        ]
        want[("account", b1.account_id)] = sent[b1.app_id]
        deadline = time.monotonic() + 60
        while True:
            got = {k: list(_month_totals(APP if k[0] == "app" else ACCOUNT, k[1]).values())
                   for k in want}  # fmt: skip
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got == want, worker.output[-4000:]
        assert sum(w[0] for k, w in want.items() if k[0] == "app") > 1000
        # More cycles change nothing, and the reaped incarnation's counters are gone.
        _wait_line(worker, "rollups.test_pause", timeout=10, after=len(worker.lines))
        time.sleep(1.5)
        assert {k: list(_month_totals(APP if k[0] == "app" else ACCOUNT, k[1]).values())
                for k in want} == want  # fmt: skip
        client = redis_clients.primary()
        assert not client.exists(f"{{{env.prefix}:dc1}}:fe:{meter.incarnation}:counters")
    finally:
        stop.set()
        if worker is not None:
            worker.stop(timeout=30)
        beat.stop()


def _wait_line(proc: processes.Process, text: str, *, timeout: float, after: int = 0) -> None:
    """Wait for a line containing ``text`` among those printed after line ``after``."""
    deadline = time.monotonic() + timeout
    while True:
        if any(text in line for line in proc.lines[after:]):
            return
        assert proc.proc.poll() is None, proc.output[-3000:]
        assert time.monotonic() < deadline, f"no {text!r}:\n{proc.output[-3000:]}"
        time.sleep(0.02)
