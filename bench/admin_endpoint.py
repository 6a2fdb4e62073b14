"""Requests per second of ``GET /admin/connection-count``, beside a bare FastAPI JSON endpoint.

Both are served the same way: one uvicorn process each (1 worker, log level warning, uvicorn's
default loop and HTTP implementation): ``metering api`` for ours, and for the baseline the
``bare`` app below (``GET /bare`` returning the same envelope), both against a scratch Postgres
database and Redis key prefix. A separate load generator, ``wrk`` (or, when it is missing, a
plain asyncio client in a few processes, which may itself be the bottleneck), keeps N
keep-alive connections busy for D seconds after a warm-up; rounds alternate bare, admin, bare,
admin, ... and the table shows each side's median round. The count is non-zero (a frontend
in this process reports connections), and both bodies are checked before any load.
Target: admin >= 0.70 x bare requests/s.

    python bench/admin_endpoint.py [--connections 32 --duration 10 --warmup 2 --rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from bench._common import exit_on_sigterm, percentile, row, scratch_engine, start
from metering.core import redis as redis_clients
from metering.gateway.sdk import Meter
from metering.live.store import DatacenterStore
from tests import processes

ROOT = Path(__file__).resolve().parent.parent

TARGET = 0.70
CONNECTIONS_SHOWN = 7  # what the in-process frontend reports, so the count is non-zero
WIDTHS = (30, 12, 11, 11, 8)

bare = FastAPI()


@bare.get("/bare")
async def bare_endpoint() -> dict[str, Any]:
    return {"RC": 0, "RM": "OK", "result": {"count": 0}}


# -- load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    rps: float
    p50: float  # seconds
    p99: float
    errors: int


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _wrk(url: str, headers: dict[str, str], connections: int, seconds: int, threads: int) -> Load:
    args = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout

    def latency(q: str) -> float:
        match = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if match is None:
            raise RuntimeError(f"unexpected wrk output:\n{out}")
        return float(match[1]) * _UNITS[match[2]]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|timeout) (\d+)", out))
    return Load(float(rps[1]), latency("50"), latency("99"), errors)


def _client_process(
    port: int, request: bytes, connections: int, seconds: float
) -> tuple[list[float], int]:
    """One load-generator process: ``connections`` keep-alive loops for ``seconds``."""
    latencies: list[float] = []
    errors = 0

    async def loop(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (sent := time.perf_counter()) < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            latencies.append(time.perf_counter() - sent)
            errors += not head.startswith(b"HTTP/1.1 200")
        writer.close()

    async def run() -> None:
        deadline = time.perf_counter() + seconds
        await asyncio.gather(*(loop(deadline) for _ in range(connections)))

    asyncio.run(run())
    return latencies, errors


def _asyncio_load(
    url: str, headers: dict[str, str], connections: int, seconds: int, procs: int
) -> Load:
    parsed = httpx.URL(url)
    lines = [f"GET {parsed.raw_path.decode()} HTTP/1.1", f"Host: {parsed.host}:{parsed.port}"]
    request = "\r\n".join([*lines, *(f"{k}: {v}" for k, v in headers.items()), "", ""]).encode()
    shares = [connections // procs + (i < connections % procs) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(_client_process, parsed.port, request, n, seconds) for n in shares if n
        ]
        results = [f.result() for f in futures]
    latencies = [t for lat, _ in results for t in lat]
    return Load(
        len(latencies) / seconds,
        percentile(latencies, 50),
        percentile(latencies, 99),
        sum(e for _, e in results),
    )


def load(url: str, headers: dict[str, str], connections: int, seconds: int, threads: int) -> Load:
    if shutil.which("wrk"):
        return _wrk(url, headers, connections, seconds, threads)
    return _asyncio_load(url, headers, connections, seconds, threads)


# -- the benchmark ---------------------------------------------------------------------------


def check_body(url: str, headers: dict[str, str], count: int) -> None:
    expected = f'{{"RC":0,"RM":"OK","result":{{"count":{count}}}}}'.encode()
    body = httpx.get(url, headers=headers, timeout=5).content
    if body != expected:
        raise RuntimeError(f"{url} answered {body!r}, expected {expected!r}")


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def interleaved(
    targets: dict[str, tuple[str, dict[str, str]]], args: argparse.Namespace, threads: int
) -> dict[str, list[Load]]:
    """``args.rounds`` rounds of load on each target in turn (bare, ours, bare, ours, ...)."""
    results: dict[str, list[Load]] = {name: [] for name in targets}
    for r in range(args.rounds):
        for name, (url, headers) in targets.items():
            if args.warmup:
                load(url, headers, args.connections, args.warmup, threads)
            result = load(url, headers, args.connections, args.duration, threads)
            results[name].append(result)
            print(
                f"  round {r + 1}/{args.rounds} {name}: {result.rps:,.0f} req/s, "
                f"p50 {fmt_ms(result.p50)}, p99 {fmt_ms(result.p99)}, errors {result.errors}",
                file=sys.stderr,
                flush=True,
            )
    return results


def _median(rounds: list[Load]) -> Load:
    return Load(
        statistics.median(x.rps for x in rounds),
        statistics.median(x.p50 for x in rounds),
        statistics.median(x.p99 for x in rounds),
        sum(x.errors for x in rounds),
    )


def compare(
    results: dict[str, list[Load]], ours: str, label: str, args: argparse.Namespace
) -> None:
    """Print the medians beside the bare endpoint's, the ratio and the verdict; exit 1 if any
    request failed (the figures would not be valid)."""
    tool = "wrk" if shutil.which("wrk") else "asyncio client (wrk not found)"
    base, mine = _median(results["bare"]), _median(results[ours])
    ratio = mine.rps / base.rps
    print(
        f"{label} vs a bare FastAPI endpoint: {tool}, {args.connections} keep-alive "
        f"connections, {args.duration} s per round after {args.warmup} s warm-up, median of "
        f"{args.rounds} interleaved rounds, one 1-worker uvicorn each"
    )
    print(row("endpoint", "req/s", "p50", "p99", "errors", widths=WIDTHS))
    for name, x in [("GET /bare (baseline)", base), (label, mine)]:
        print(row(name, f"{x.rps:,.0f}", fmt_ms(x.p50), fmt_ms(x.p99), x.errors, widths=WIDTHS))
    print(f"ratio {ours} / bare: {ratio:.2f}")
    met = ratio >= TARGET and base.errors == mine.errors == 0
    print(f"target >= {TARGET:.2f}: {'met' if met else 'NOT met'}")
    if base.errors or mine.errors:
        print("(failed requests: the figures are not valid)")
        sys.exit(1)


def start_servers(stack: ExitStack, env: dict[str, str]) -> tuple[int, int]:
    """The bare uvicorn and ``metering api``, stopped with ``stack``: their ports."""
    bare_port, api_port = processes.free_port(), processes.free_port()
    print("  starting the bare uvicorn and metering api ...", file=sys.stderr, flush=True)
    uvicorn_args = [sys.executable, "-m", "uvicorn", "bench.admin_endpoint:bare"]
    uvicorn_args += ["--host", "127.0.0.1", "--port", str(bare_port), "--log-level", "warning"]
    start(stack, processes.Process(uvicorn_args, env, ready=None, cwd=str(ROOT)))
    processes.wait_http(f"http://127.0.0.1:{bare_port}/bare")
    start(stack, processes.api(env, api_port))
    return bare_port, api_port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per round")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, help="wrk threads (default 1), or client processes without wrk (2)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args()
    threads = args.threads or (1 if shutil.which("wrk") else 2)
    exit_on_sigterm()

    with scratch_engine() as scratch, ExitStack() as stack:
        env = scratch.child_env()
        bare_port, api_port = start_servers(stack, env)

        store = DatacenterStore(redis_clients.primary(), scratch.prefix, "dc1")
        meter = Meter(store, "bench-fe")
        for _ in range(CONNECTIONS_SHOWN):
            meter.connection_opened(str(scratch.app_id))
        meter.start()  # flushes now, then heartbeats so the counts stay live
        stack.callback(meter.close)

        targets = {
            "bare": (f"http://127.0.0.1:{bare_port}/bare", {}),
            "admin": (
                f"http://127.0.0.1:{api_port}/admin/connection-count",
                {"IM-API-KEY": scratch.key},
            ),
        }
        check_body(*targets["bare"], count=0)
        check_body(*targets["admin"], count=CONNECTIONS_SHOWN)

        results = interleaved(targets, args, threads)
        check_body(*targets["admin"], count=CONNECTIONS_SHOWN)

    compare(results, "admin", "GET /admin/connection-count", args)


if __name__ == "__main__":
    main()
