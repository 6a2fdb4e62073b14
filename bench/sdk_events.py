"""The gateway SDK's cost per event, and how its Redis writes scale.

1. Per event, in process: connection opened+closed, channel attach+detach, message published
   and delivered, each beside a baseline measured in the same run: the same number of plain
   ``dict[key] += 1`` updates (the least any in-memory counter costs). Target: <= 1 us/event.
2. Redis writes: a frontend with a running flush thread receives events at two rates for a few
   seconds; the fields written per second depend on frontends x apps per flush, not on the
   event rate.

    python bench/sdk_events.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import sys
import time

import redis

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import REDIS_URL, row, scratch_prefix
from metering.gateway.sdk import Meter
from metering.live.store import DatacenterStore, Transport

APPS = [str(a) for a in range(100)]


def per_event(n: int) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    with scratch_prefix(client) as prefix:
        meter = Meter(DatacenterStore(client, prefix, "dc1"), "bench")  # not started: no thread
        counts: dict[str, int] = {}

        def baseline(ops: int) -> float:
            keys = [a + "|w" for a in APPS]
            started = time.perf_counter()
            for i in range(ops):
                k = keys[i % 100]
                counts[k] = counts.get(k, 0) + 1
            return (time.perf_counter() - started) / ops

        def opened_closed() -> float:
            started = time.perf_counter()
            for i in range(n // 2):
                app = APPS[i % 100]
                meter.connection_opened(app, Transport.WEBSOCKET)
                meter.connection_closed(app, Transport.WEBSOCKET)
            return (time.perf_counter() - started) / n

        def attach_detach() -> float:
            started = time.perf_counter()
            for i in range(n // 2):
                app = APPS[i % 100]
                meter.channel_attached(app, "room")
                meter.channel_detached(app, "room")
            return (time.perf_counter() - started) / n

        def messages() -> float:
            started = time.perf_counter()
            for i in range(n // 2):
                app = APPS[i % 100]
                meter.message_published(app, "room", 120)
                meter.message_delivered(app, "room", 120, 10)
            return (time.perf_counter() - started) / n

        base = min(baseline(n) for _ in range(3))
        print(f"SDK cost per event ({n} events each, best of 3)")
        print(row("event", "per event", "baseline", "ratio", widths=(34, 14, 14, 10)))
        print(row("dict[key] += 1 (baseline)", f"{base * 1e9:.0f} ns", "", ""))
        for name, fn in [
            ("connection opened / closed", opened_closed),
            ("channel attached / detached", attach_detach),
            ("message published / delivered", messages),
        ]:
            t = min(fn() for _ in range(3))
            print(row(name, f"{t * 1e9:.0f} ns", f"{base * 1e9:.0f} ns", f"{t / base:.1f}x"))


def writes(seconds: float) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    print(f"\nRedis writes with the flush thread running ({seconds:.0f} s per rate, 100 apps)")
    print(
        row(
            "events/s (target)", "events/s (real)", "flushes/s", "fields/s", widths=(22, 18, 12, 12)
        )
    )
    for rate in (10_000, 200_000):
        with scratch_prefix(client) as prefix:
            store = DatacenterStore(client, prefix, "dc1")
            fields = 0
            original = store.flush

            def counting_flush(*args, original=original, **kwargs):  # type: ignore[no-untyped-def]
                nonlocal fields
                conns = list(kwargs.pop("conns"))
                channels = list(kwargs.pop("channels"))
                counters = list(kwargs.pop("counters"))
                fields += len(conns) + len(channels) + len(counters)
                return original(*args, conns=conns, channels=channels, counters=counters, **kwargs)

            store.flush = counting_flush  # type: ignore[method-assign]
            meter = Meter(store, "bench-writes")
            meter.start()
            sent = 0
            started = time.perf_counter()
            flushes0 = meter.flushes
            while (elapsed := time.perf_counter() - started) < seconds:
                # Pace the events: bursts of 1000, then wait for the schedule.
                for i in range(1000):
                    app = APPS[(sent + i) % 100]
                    meter.connection_opened(app)
                    meter.connection_closed(app)
                sent += 2000
                ahead = sent / rate - elapsed
                if ahead > 0:
                    time.sleep(ahead)
            real = sent / (time.perf_counter() - started)
            flushes = (meter.flushes - flushes0) / seconds
            meter.close()
            print(
                row(
                    f"{rate:,}",
                    f"{real:,.0f}",
                    f"{flushes:.1f}",
                    f"{fields / seconds:,.0f}",
                    widths=(22, 18, 12, 12),
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    per_event(args.events)
    writes(args.seconds)


if __name__ == "__main__":
    main()
