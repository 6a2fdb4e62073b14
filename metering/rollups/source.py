"""What the aggregator reads from Redis: the 1-second samples, a live snapshot, counters.

Key names come from ``metering.live.store`` (the one place that defines them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from metering.live.store import DatacenterStore, GlobalStore, LiveValue, Sample, _s, _unpack
from metering.rollups.models import FRONTEND_COUNTERS

_COUNTER_INDEX = {name: i for i, name in enumerate(FRONTEND_COUNTERS)}


def samples_after(store: GlobalStore, second: int | None, count: int) -> list[tuple[int, Sample]]:
    """Up to ``count`` samples after ``second`` (all of them from the start if None)."""
    start = 0 if second is None else second + 1
    return store.samples(start, count)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The global live values as of the tick ``second``, read in one MULTI."""

    second: int | None
    apps: dict[str, LiveValue]
    accounts: dict[str, LiveValue]


def live_snapshot(store: GlobalStore) -> Snapshot:
    pipe = store.client.pipeline(transaction=True)
    pipe.hget(store.key("tick"), "second")
    pipe.hgetall(store.key("live:apps"))
    pipe.hgetall(store.key("live:accounts"))
    second, apps, accounts = pipe.execute()
    return Snapshot(
        second=int(second) if second is not None else None,
        apps={_s(k): LiveValue(*_unpack(_s(v))) for k, v in apps.items()},
        accounts={_s(k): LiveValue(*_unpack(_s(v))) for k, v in accounts.items()},
    )


def trim_samples(store: GlobalStore, upto: int) -> None:
    """Drop the samples up to ``upto`` (a second): they are folded into Postgres."""
    store.client.xtrim(store.key("samples"), minid=f"{upto * 1000 + 1}", approximate=False)


@dataclass(frozen=True, slots=True)
class CounterChanges:
    epoch: str | None
    seq: int
    incarnations: list[str]  # whose counters changed after the cursor
    retired: set[str]  # reaped incarnations whose counters are still here


def counter_changes(store: DatacenterStore, after: int) -> CounterChanges:
    """Incarnations whose counters moved after the sequence ``after``, in one MULTI."""
    pipe = store.client.pipeline(transaction=True)
    pipe.get(store.key("epoch"))
    pipe.get(store.key("seq"))
    pipe.zrangebyscore(store.key("counter-changes"), f"({after}", "+inf")
    pipe.zrange(store.key("retired"), 0, -1)
    epoch, seq, changed, retired = pipe.execute()
    return CounterChanges(
        epoch=_s(epoch) if epoch is not None else None,
        seq=int(seq) if seq is not None else 0,
        incarnations=[_s(i) for i in changed],
        retired={_s(i) for i in retired},
    )


def counters(store: DatacenterStore, incarnations: list[str]) -> dict[str, dict[str, list[int]]]:
    """Each incarnation's cumulative counters: app -> totals in ``FRONTEND_COUNTERS`` order."""
    pipe = store.client.pipeline(transaction=False)
    for inc in incarnations:
        pipe.hgetall(store.key(f"fe:{inc}:counters"))
    out: dict[str, dict[str, list[int]]] = {}
    for inc, fields in zip(incarnations, pipe.execute(), strict=True):
        per_app: dict[str, list[int]] = {}
        for raw_field, raw_value in fields.items():
            app, _, name = _s(raw_field).rpartition("|")
            i = _COUNTER_INDEX.get(name)
            if i is None or not app:
                continue
            totals = per_app.get(app)
            if totals is None:
                totals = per_app[app] = [0] * len(FRONTEND_COUNTERS)
            totals[i] = int(raw_value)
        out[inc] = per_app
    return out


def forget_incarnations(store: DatacenterStore, incarnations: list[str]) -> None:
    """Delete reaped incarnations' counters once their final totals are in Postgres."""
    if not incarnations:
        return
    pipe: Any = store.client.pipeline(transaction=True)
    for inc in incarnations:
        pipe.delete(store.key(f"fe:{inc}:counters"))
    pipe.zrem(store.key("retired"), *incarnations)
    pipe.zrem(store.key("counter-changes"), *incarnations)
    pipe.execute()
