"""``celery -A workers worker`` and ``celery -A workers beat`` as written: the tick runs every
second, and with two beat processes each second is still counted once."""

from __future__ import annotations

import time
from pathlib import Path

from metering.core import redis as redis_clients
from metering.live.store import GlobalStore
from tests import processes
from tests.conftest import Env
from tests.e2e.test_gateway_counting import Clients, clients  # noqa: F401 (fixture)
from tests.factories import tenant


def test_worker_and_two_beats_tick_each_second_once(
    env: Env,
    tmp_path: Path,
    start_gateway,
    clients: Clients,  # noqa: F811
) -> None:
    t = tenant("platform")
    celery = str(processes.BIN / "celery")
    # The samples are read back below: no aggregation may fold (and trim) them meanwhile.
    child = env.child_env(METERING_AGGREGATE_INTERVAL="3600")
    worker = processes.Process(
        [
            celery,
            "-A",
            "workers",
            "worker",
            "--loglevel",
            "INFO",
            "--concurrency",
            "2",
            "-n",
            f"w-{env.prefix}@%h",
        ],
        child,
        ready="ready.",
        timeout=60,
    )
    beats = [
        processes.Process(
            [
                celery,
                "-A",
                "workers",
                "beat",
                "--loglevel",
                "INFO",
                "-s",
                str(tmp_path / f"beat-{i}"),
            ],
            child,
            ready="beat: Starting",
            timeout=60,
        )
        for i in range(2)
    ]
    try:
        gw = start_gateway("gw-celery")
        clients.connect(gw.port, t.app_id, 3)
        store = GlobalStore(redis_clients.primary(), env.prefix)
        deadline = time.monotonic() + 20
        while store.app_value(str(t.app_id)).websocket != 3:
            assert time.monotonic() < deadline, worker.output[-3000:]
            time.sleep(0.2)
        assert store.account_value(str(t.account_id)).websocket == 3

        time.sleep(6)
        samples = store.samples()
        seconds = [s for s, _ in samples]
        assert len(seconds) >= 4
        assert seconds == sorted(set(seconds)), "a second was counted twice"
        # The gaps add up to the time covered: no second is counted twice or invented.
        assert sum(sample.gap for _, sample in samples[1:]) == seconds[-1] - seconds[0]
        # Both beats sent ticks; the extra ones for an already counted second were refused.
        assert "live.tick_skipped" in worker.output
    finally:
        for beat in beats:
            beat.stop()
        worker.stop(timeout=30)
