"""Admission: how fast a gateway decides, and how soon a hard limit reached on one gateway is
enforced on another.

1. In-process decision (target p99 <= 5 µs). ``Admission.admit_connection`` on a gateway's
   copy holding 100 000 enforced accounts, for an account under its limit (accepted, and
   counted) and one at it (the copy cannot refuse: it answers CHECK), each call timed on its
   own with ``perf_counter_ns``; baseline: one plain ``dict.get`` timed the same way in the
   same loop (the clock's own cost is in both). 200 000 calls each, after a warm-up.
   Then the refusal path, timed whole: ``check_connection`` against another frontend (a real
   Meter, heartbeating) holding the account at its limit (refused: two reads one heartbeat
   apart), and below it (accepted on the first read).
2. Crossing to refusal (target p99 <= 1 s). Real processes on a scratch database and Redis
   prefix: Celery beat and a worker running the 1-second tick (``-Q live``), two gateways. An
   account on a package with a hard limit of --hard connections holds hard - 1 WebSocket
   connections on gateway 1. Each sample opens the connection that reaches the limit on
   gateway 1, then probes gateway 2 with a connect every --probe-interval until one is refused
   (an accepted probe is closed at once, which gives back its place); the figure is the time
   from the crossing connect's handshake to the refusal. Then the crossing connection closes,
   and the next sample waits until gateway 2 accepts again. Baseline: the round trip of one
   probe (the measurement's resolution); the tick interval, 1 s, bounds the delay from above.

3. Overshoot. --gateways N gateway processes and the engine's tick; an account with a hard
   limit of --burst-hard and nothing open; each gateway receives --burst-hard connects at once,
   all gateways at the same moment. Printed: how many were let in, against the bound of
   docs/limits.md (N x (H - b + ceil(b / 2)), b = floor((H - 1) / 2) for an account the tick
   had not listed), and
   how many were let in after one second (the tick and the checks have caught up: at most H).

    python bench/admission.py [--samples 40 --hard 5 --probe-interval 0.01] [--skip-crossing]
                              [--gateways 2,4 --burst-hard 20] [--skip-overshoot]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shutil
import sys
import time
from contextlib import ExitStack
from tempfile import TemporaryDirectory

import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import REDIS_URL, exit_on_sigterm, percentile, row, scratch_engine, start
from metering.core.database import unit_of_work
from metering.core.settings import get_settings
from metering.gateway.admission import Admission, Check, Evidence
from metering.gateway.sdk import Meter
from metering.limits import staff
from metering.limits.repository import AdmissionRow
from metering.limits.store import AdmissionStore
from metering.limits.wiring import admission_store
from metering.live.store import DatacenterStore, GlobalStore
from tests import processes
from tests.scratch import delete_keys

DECISION_TARGET_US = 5.0
CROSSING_TARGET = 1.0
WIDTHS = (40, 11, 11, 11, 11)


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# -- 1. the in-process decision ------------------------------------------------------------


def decision(calls: int, checks: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Nanoseconds per in-process call (the decisions, and the dict lookup baseline), and
    seconds per whole check (the refusal path)."""
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"benchadm{time.monotonic_ns()}"
    store = AdmissionStore(client, prefix)
    dc = DatacenterStore(client, prefix, "dc1")
    other = Meter(dc, "bench-other")
    try:
        n = 100_000
        progress(f"a copy of {n} enforced accounts")
        store.write({a: AdmissionRow(connections_hard=10**9 if a % 2 else 10) for a in range(n)})
        store.write_live(dict.fromkeys(range(0, n, 2), (10, 0)))  # the even ones at the limit
        under, at, below = 1, 2, 4
        apps = {at: ("2",), below: ("4",)}
        for _ in range(10):
            other.connection_opened("2")  # account 2 at its limit, on another frontend
        for _ in range(5):
            other.connection_opened("4")  # account 4 at half of it
        other.start()
        evidence = Evidence([dc], GlobalStore(client, prefix), lambda a: apps.get(a, ()))
        adm = Admission(store, evidence=evidence)
        adm.refresh()
        plain = {a: a for a in range(n)}
        assert adm.admit_connection(under) is None
        assert isinstance(adm.admit_connection(at), Check)
        out: dict[str, list[float]] = {"dict.get (baseline)": [], "accepted": [], "check": []}
        clock = time.perf_counter_ns
        gc.disable()
        try:
            for label, fn, arg in (
                ("dict.get (baseline)", plain.get, under),
                ("accepted", adm.admit_connection, under),
                ("check", adm.admit_connection, at),
            ):
                progress(f"{calls} calls: {label}")
                times = out[label]
                for _ in range(calls // 10):  # warm-up
                    fn(arg)
                for _ in range(calls):
                    t0 = clock()
                    fn(arg)
                    times.append(clock() - t0)
        finally:
            gc.enable()

        paths = _whole_checks(adm, checks, at=at, below=below)
        return out, paths
    finally:
        other.close()
        delete_keys(client, prefix)
        client.close()


def _whole_checks(adm: Admission, checks: int, *, at: int, below: int) -> dict[str, list[float]]:
    """Seconds per whole check of an account at its limit (refused), and one below it."""

    async def timed(account: int) -> float:
        t0 = time.perf_counter()
        refusal = await adm.check_connection(account)
        took = time.perf_counter() - t0
        assert (refusal is None) == (account == below), refusal
        adm.refresh()  # forget what the check let in: the next sample starts alike
        return took

    paths: dict[str, list[float]] = {"check -> refused": [], "check -> accepted": []}
    progress(f"{checks} whole checks each: refused, accepted")

    async def both() -> None:  # on one event loop, as in a gateway
        for _ in range(checks):
            paths["check -> refused"].append(await timed(at))
            paths["check -> accepted"].append(await timed(below))

    asyncio.run(both())
    return paths


# -- 2. crossing to refusal across gateways ------------------------------------------------


async def _open(port: int, app_id: int) -> ClientConnection | int:
    """An open WebSocket, or the refusal's error code."""
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime?app={app_id}")
    except InvalidStatus as exc:
        import json

        code: int = json.loads(exc.response.body or b"{}")["error"]["code"]
        return code
    await ws.recv()  # "connected"
    return ws


async def crossing(
    gw1: int, gw2: int, app_id: int, *, hard: int, samples: int, interval: float
) -> tuple[list[float], list[float]]:
    held: list[ClientConnection] = []
    deadline = time.perf_counter() + 30
    while len(held) < hard - 1:  # a burst is held back until the tick counts it: pace it
        ws = await _open(gw1, app_id)
        if isinstance(ws, int):
            assert time.perf_counter() < deadline, f"still refused while filling up: {ws}"
            await asyncio.sleep(0.3)
        else:
            held.append(ws)
    await asyncio.sleep(2.5)  # a tick or two: the account is listed at hard - 1
    delays: list[float] = []
    probes: list[float] = []
    for i in range(samples):
        crossing_ws = await _open(gw1, app_id)
        assert not isinstance(crossing_ws, int), f"the crossing connect was refused: {crossing_ws}"
        crossed = time.perf_counter()
        while True:
            sent = time.perf_counter()
            probe = await _open(gw2, app_id)
            probes.append(time.perf_counter() - sent)
            if isinstance(probe, int):
                assert probe == 40111, probe
                delays.append(time.perf_counter() - crossed)
                break
            await probe.close()
            if time.perf_counter() - crossed > 10:
                raise RuntimeError("no refusal within 10 s")
            await asyncio.sleep(interval)
        await crossing_ws.close()
        while True:  # below the limit again: gateway 2 accepts
            await asyncio.sleep(0.1)
            probe = await _open(gw2, app_id)
            if not isinstance(probe, int):
                await probe.close()
                break
        if (i + 1) % 10 == 0 or i + 1 == samples:
            progress(f"{i + 1}/{samples} samples: p50 {percentile(delays, 50) * 1000:.0f} ms")
        await asyncio.sleep(0.3 + (i % 7) * 0.1)  # spread the crossings over the tick's phase
    for ws in held:
        await ws.close()
    return delays, probes


def run_crossing(samples: int, hard: int, interval: float) -> tuple[list[float], list[float]]:
    celery = shutil.which("celery", path=str(processes.BIN))
    if celery is None:
        raise SystemExit("celery is not installed in this virtualenv")
    with scratch_engine() as scratch, ExitStack() as stack, TemporaryDirectory() as tmp:
        with unit_of_work() as session:
            staff.create_package(session, "bench", {"connections": (hard, hard)})
            change = staff.set_package(session, _account_of(scratch.app_id), "bench", by="bench")
        admission_store(get_settings()).write(change.admission)
        env = scratch.child_env()
        progress("starting celery beat, a tick worker and two gateways ...")
        beat = [celery, "-A", "workers", "beat", "--loglevel", "INFO", "-s", f"{tmp}/beat"]
        start(stack, processes.Process(beat, env, ready="beat: Starting", timeout=60))
        worker = [celery, "-A", "workers", "worker", "--loglevel", "INFO", "-Q", "live",
                  "--concurrency", "1", "-n", f"bench-{scratch.prefix}@%h"]  # fmt: skip
        start(stack, processes.Process(worker, env, ready="ready.", timeout=60))
        ports = processes.free_port(), processes.free_port()
        start(stack, processes.gateway(env, ports[0], "bench-gw1"))
        start(stack, processes.gateway(env, ports[1], "bench-gw2"))
        return asyncio.run(
            crossing(*ports, scratch.app_id, hard=hard, samples=samples, interval=interval)
        )


# -- 3. overshoot: N gateways bursting at once ----------------------------------------------


def overshoot_bound(gateways: int, hard: int, base: int) -> int:
    """docs/limits.md: each gateway lets in the copy's room, then half of what is left."""
    return gateways * (hard - base + (base + 1) // 2)


async def _bursts(ports: list[int], app_id: int, each: int) -> tuple[int, int]:
    """Let in at once of ``each`` connects on every gateway; then of one more on each."""

    async def burst(n: int) -> list[ClientConnection]:
        got = await asyncio.gather(*(_open(port, app_id) for port in ports for _ in range(n)))
        return [ws for ws in got if not isinstance(ws, int)]

    opened = await burst(each)
    await asyncio.sleep(1.5)  # the tick counts them; every gateway hears of it
    more = await burst(1)
    await asyncio.gather(*(ws.close() for ws in [*opened, *more]))
    return len(opened), len(more)


def run_overshoot(counts: list[int], hard: int) -> list[tuple[int, int, int, int]]:
    """Per gateway count N: (N, let in at once, the bound, let in one second later)."""
    import threading

    from tests.factories import tenant
    from workers import jobs

    out = []
    with scratch_engine(), ExitStack() as stack:
        stop = threading.Event()

        def ticking() -> None:
            while not stop.wait(1.0 - time.time() % 1.0):
                jobs.tick()

        ticker = threading.Thread(target=ticking, daemon=True)
        ticker.start()
        stack.callback(ticker.join, 10)
        stack.callback(stop.set)
        with unit_of_work() as session:
            staff.create_package(session, "burst", {"connections": (hard, hard)})
        for n in counts:
            t = tenant("platform", name=f"burst{n}")
            with unit_of_work() as session:
                change = staff.set_package(session, t.account_id, "burst", by="bench")
            admission_store(get_settings()).write(change.admission)
            child = dict(os.environ)  # the scratch engine's settings
            progress(f"{n} gateways, a burst of {hard} connects on each at once")
            with ExitStack() as gateways:
                ports = [processes.free_port() for _ in range(n)]
                for i, port in enumerate(ports):
                    start(gateways, processes.gateway(child, port, f"burst{n}-{i}"))
                time.sleep(2.2)  # a tick or two: every gateway has a copy
                opened, later = asyncio.run(_bursts(ports, t.app_id, hard))
            bound = overshoot_bound(n, hard, (hard - 1) // 2)
            out.append((n, opened, bound, later))
    return out


def _account_of(app_id: int) -> int:
    from metering.accounts.repository import AccountRepository

    with unit_of_work() as session:
        app = AccountRepository(session).app(app_id)
        assert app is not None
        return app.account_id


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--hard", type=int, default=5)
    parser.add_argument("--probe-interval", type=float, default=0.01, help="seconds")
    parser.add_argument("--skip-crossing", action="store_true")
    parser.add_argument("--checks", type=int, default=50)
    parser.add_argument("--gateways", default="2,4", help="gateway counts, comma-separated")
    parser.add_argument("--burst-hard", type=int, default=20)
    parser.add_argument("--skip-overshoot", action="store_true")
    args = parser.parse_args()
    exit_on_sigterm()

    times, paths = decision(args.calls, args.checks)
    print(f"In-process admission decision: {args.calls} calls each, one timed at a time")
    print(row("", "p50", "p99", "p99.9", "max", widths=WIDTHS))
    for label, values in times.items():
        cells = [f"{percentile(values, q) / 1000:.2f} µs" for q in (50, 99, 99.9, 100)]
        print(row(label, *cells, widths=WIDTHS))
    worst = max(percentile(times[k], 99) for k in ("accepted", "check")) / 1000
    verdict = "met" if worst <= DECISION_TARGET_US else "NOT met"
    print(f"target p99 <= {DECISION_TARGET_US:g} µs: {verdict} ({worst:.2f} µs)")
    print(f"\nThe refusal path, whole (reads of real Redis): {args.checks} checks each")
    print(row("", "p50", "p99", "max", "", widths=WIDTHS))
    for label, values in paths.items():
        cells = [f"{percentile(values, q) * 1000:.2f} ms" for q in (50, 99, 100)]
        print(row(label, *cells, "", widths=WIDTHS))

    if not args.skip_overshoot:
        counts = [int(c) for c in args.gateways.split(",")]
        print(f"\nOvershoot: N gateways, {args.burst_hard} connects on each at once, hard limit "
              f"{args.burst_hard}, nothing open before")  # fmt: skip
        print(row("gateways", "let in", "bound", "past limit", "1 s later", widths=WIDTHS))
        for n, opened, bound, later in run_overshoot(counts, args.burst_hard):
            past = max(0, opened - args.burst_hard)
            print(row(str(n), str(opened), str(bound), str(past), str(later), widths=WIDTHS))

    if args.skip_crossing:
        return
    delays, probes = run_crossing(args.samples, args.hard, args.probe_interval)
    print(
        f"\nFrom the connect reaching the hard limit ({args.hard}) on gateway 1 to the first "
        f"refused connect on gateway 2: {args.samples} samples"
    )
    print(row("", "p50", "p90", "p99", "max", widths=WIDTHS))
    for label, values in (("probe round trip (baseline)", probes), ("crossing -> refused", delays)):
        cells = [f"{percentile(values, q) * 1000:.0f} ms" for q in (50, 90, 99, 100)]
        print(row(label, *cells, widths=WIDTHS))
    p99 = percentile(delays, 99)
    verdict = "met" if p99 <= CROSSING_TARGET else "NOT met"
    print(f"target p99 <= {CROSSING_TARGET:g} s: {verdict} ({p99 * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
