"""Staleness: from a WebSocket connect (or close) to ``/admin/connection-count`` showing it.

A real ``metering api`` and a real ``metering gateway`` run against a scratch Postgres database
and Redis key prefix. Each sample opens one WebSocket client at a random moment (uniform 0-300
ms after the previous sample, so every phase of the gateway's flush loop is hit), then polls
the admin endpoint on one keep-alive connection every ``--poll-interval`` until the count is up
by one; then, after another random pause, closes the client and polls until the count is back.

- connect: from the client's handshake completing (``connect`` returning: the connection
  exists) to the arrival of the first response that counts it;
- close: from the client's closing handshake completing (``close`` returning) to the first
  response that no longer counts it.

Both include up to one poll interval plus one request's round trip: the baseline row is that
round trip, the resolution floor, measured on every poll of the same run. Target: connect p99
<= 1 s.

    python bench/staleness.py [--samples 200 --poll-interval 0.005]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from contextlib import ExitStack

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import Scratch, exit_on_sigterm, percentile, row, scratch_engine, start
from tests import processes

TARGET = 1.0  # seconds, p99
TIMEOUT = 10.0  # a sample not seen within this is a miss
PAUSE = 0.3  # random pause before each connect and each close, uniform 0..PAUSE s
WIDTHS = (34, 11, 11, 11, 11, 8)


class Poller:
    """Reads the count on one keep-alive connection; keeps every request's round trip."""

    def __init__(self, client: httpx.AsyncClient, interval: float) -> None:
        self.client = client
        self.interval = interval
        self.round_trips: list[float] = []

    async def count(self) -> int:
        sent = time.perf_counter()
        response = await self.client.get("/admin/connection-count")
        self.round_trips.append(time.perf_counter() - sent)
        response.raise_for_status()
        value: int = response.json()["result"]["count"]
        return value

    async def until(self, expected: int, since: float) -> float:
        """Seconds from ``since`` to a response showing ``expected`` (inf after TIMEOUT)."""
        while (await self.count()) != expected:
            if time.perf_counter() - since > TIMEOUT:
                return float("inf")
            await asyncio.sleep(self.interval)
        return time.perf_counter() - since


async def measure(
    scratch: Scratch, api_port: int, gateway_port: int, *, samples: int, interval: float
) -> tuple[list[float], list[float], list[float]]:
    """Connect and close staleness per sample, and the round trip of every poll."""
    rng = random.Random(1)
    url = f"ws://127.0.0.1:{gateway_port}/v1/realtime?app={scratch.app_id}"
    opened: list[float] = []
    closed: list[float] = []
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{api_port}", headers={"IM-API-KEY": scratch.key}, timeout=5
    ) as client:
        poller = Poller(client, interval)
        base = await poller.count()
        if base != 0:
            raise RuntimeError(f"the count starts at {base}, expected 0")
        poller.round_trips.clear()  # the first one also connected and looked the key up
        for i in range(samples):
            await asyncio.sleep(rng.uniform(0, PAUSE))
            ws = await connect(url)
            opened.append(await poller.until(base + 1, time.perf_counter()))
            await asyncio.sleep(rng.uniform(0, PAUSE))
            await ws.close()
            closed.append(await poller.until(base, time.perf_counter()))
            if (i + 1) % 25 == 0 or i + 1 == samples:
                print(
                    f"  {i + 1}/{samples} samples: connect p50 "
                    f"{percentile(opened, 50) * 1000:.1f} ms, close p50 "
                    f"{percentile(closed, 50) * 1000:.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return opened, closed, poller.round_trips


def ms(seconds: float) -> str:
    return "timeout" if seconds == float("inf") else f"{seconds * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--poll-interval", type=float, default=0.005, help="seconds")
    args = parser.parse_args()
    exit_on_sigterm()

    with scratch_engine() as scratch, ExitStack() as stack:
        env = scratch.child_env()
        api_port, gateway_port = processes.free_port(), processes.free_port()
        print("  starting metering api and metering gateway ...", file=sys.stderr, flush=True)
        start(stack, processes.api(env, api_port))
        start(stack, processes.gateway(env, gateway_port, "bench-gw"))
        opened, closed, round_trips = asyncio.run(
            measure(
                scratch, api_port, gateway_port, samples=args.samples, interval=args.poll_interval
            )
        )

    print(
        f"Staleness of GET /admin/connection-count: {args.samples} samples, one WebSocket at a "
        f"time on a real gateway, polled every {args.poll_interval * 1000:g} ms"
    )
    print(row("", "p50", "p90", "p99", "max", "misses", widths=WIDTHS))
    rows = [
        ("admin round trip (baseline)", round_trips),
        ("connect -> counted", opened),
        ("close -> no longer counted", closed),
    ]
    for label, values in rows:
        cells = [ms(percentile(values, q)) for q in (50, 90, 99, 100)]
        misses = sum(v == float("inf") for v in values)
        print(row(label, *cells, misses if values is not round_trips else "", widths=WIDTHS))
    for label, values in rows[1:]:
        p99 = percentile(values, 99)
        verdict = "met" if p99 <= TARGET else "NOT met"
        print(f"target p99 <= {TARGET:g} s, {label.split()[0]}: {verdict} ({ms(p99)})")


if __name__ == "__main__":
    main()
