"""Tick time against the number of active apps, beside a raw pipelined read of the same data.

20 frontends each report about 15 % of the apps. For each size the script measures:
- the raw baseline: one pipelined HGETALL of every frontend's hash plus summing it in Python
  (what a tick that reads everything would at least cost);
- the first tick (everything is new: the worst case, once after a start or a resync);
- steady ticks where 1 % and 10 % of the apps changed since the last one.

    python bench/tick.py [--apps 10000 100000]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import redis

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import REDIS_URL, row, scratch_prefix
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore

FRONTENDS = 20
SHARE = 0.15


def populate(dc: DatacenterStore, apps: int, rng: random.Random) -> dict[str, dict[str, int]]:
    state: dict[str, dict[str, int]] = {}
    per_frontend = int(apps * SHARE)
    for f in range(FRONTENDS):
        inc = f"fe-{f}#bench"
        fields = {f"{a}|w": rng.randint(1, 50) for a in rng.sample(range(apps), per_frontend)}
        state[inc] = fields
        dc.flush(
            inc, full=True, timeout=3600, epoch="e", conns=fields.items(), channels=[], counters=[]
        )
    return state


def raw_read(client: redis.Redis, dc: DatacenterStore) -> float:
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for f in range(FRONTENDS):
        pipe.hgetall(dc.key(f"fe:fe-{f}#bench:conns"))
    totals: dict[bytes, int] = {}
    for fields in pipe.execute():
        for k, v in fields.items():
            totals[k] = totals.get(k, 0) + int(v)
    return time.perf_counter() - started


def churn(
    dc: DatacenterStore,
    state: dict[str, dict[str, int]],
    apps: int,
    share: float,
    rng: random.Random,
) -> None:
    """Change ``share`` of the apps, spread over the frontends that report them."""
    changed = rng.sample(range(apps), int(apps * share))
    per_frontend: dict[str, list[tuple[str, int]]] = {}
    for a in changed:
        inc = f"fe-{rng.randrange(FRONTENDS)}#bench"
        field = f"{a}|w"
        state[inc][field] = state[inc].get(field, 0) + 1
        per_frontend.setdefault(inc, []).append((field, state[inc][field]))
    for inc, fields in per_frontend.items():
        dc.flush(inc, full=False, timeout=3600, epoch="e", conns=fields, channels=[], counters=[])


def timed_tick(g: GlobalStore, dc: DatacenterStore, second: int) -> float:
    result = tick(g, {"dc1": dc}, liveness_timeout=3600, sample_retention=100, now=second)
    assert result.committed
    return result.duration


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    rng = random.Random(1)
    print(f"tick benchmark: {FRONTENDS} frontends, each reporting {SHARE:.0%} of the apps")
    print(f"Redis {REDIS_URL}")
    print(row("apps (fields)", "raw read", "tick", "tick/raw"))
    second = 1_000_000
    for apps in args.apps:
        with scratch_prefix(client) as prefix:
            dc = DatacenterStore(client, prefix, "dc1")
            g = GlobalStore(client, prefix)
            client.hset(g.key("apps"), mapping={str(a): str(a % 1000) for a in range(apps)})
            print(f"  populating {apps} apps ...", file=sys.stderr, flush=True)
            state = populate(dc, apps, rng)
            fields = sum(len(v) for v in state.values())
            raw = statistics.median(raw_read(client, dc) for _ in range(args.repeat))

            second += 1
            first = timed_tick(g, dc, second)
            print(row(f"{apps} ({fields})", f"{raw * 1000:.0f} ms", "", ""))
            print(row("  first tick (all new)", "", f"{first * 1000:.0f} ms", f"{first / raw:.2f}"))
            for share in (0.01, 0.10):
                times = []
                for _ in range(args.repeat):
                    churn(dc, state, apps, share, rng)
                    second += 1
                    times.append(timed_tick(g, dc, second))
                t = statistics.median(times)
                print(
                    row(
                        f"  steady, {share:.0%} changed", "", f"{t * 1000:.1f} ms", f"{t / raw:.2f}"
                    )
                )


if __name__ == "__main__":
    main()
