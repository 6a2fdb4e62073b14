"""A load generator of real WebSocket clients, for demos and soak runs (``metering simulate``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class _Stats:
    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.refused = 0
        self.published = 0
        self.received = 0


async def _client(url: str, channel: str, stats: _Stats, stop: asyncio.Event) -> None:
    try:
        ws = await connect(url, open_timeout=10)
    except Exception:
        stats.refused += 1
        return
    stats.opened += 1
    try:
        await ws.send(json.dumps({"action": "attach", "channel": channel}))
        reader = asyncio.create_task(_read(ws, stats))
        await stop.wait()
        reader.cancel()
    finally:
        await ws.close()
        stats.closed += 1


async def _read(ws: ClientConnection, stats: _Stats) -> None:
    with contextlib.suppress(Exception):
        async for raw in ws:
            if isinstance(raw, str) and json.loads(raw).get("action") == "message":
                stats.received += 1


async def _run(
    *,
    gateway_url: str,
    app_id: int,
    connections: int,
    duration: float,
    churn: float,
    channels: int,
    publish_rate: float,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    base = gateway_url.rstrip("/")
    if not base.startswith(("ws://", "wss://")):
        raise ValueError("the gateway URL must start with ws:// or wss://")
    url = f"{base}/v1/realtime?app={app_id}"
    stats = _Stats()
    rng = random.Random(0)  # noqa: S311 (load shape, not security)
    live: list[tuple[asyncio.Task[None], asyncio.Event]] = []

    def spawn() -> None:
        stop = asyncio.Event()
        channel = f"sim-{rng.randrange(channels)}"
        live.append((asyncio.create_task(_client(url, channel, stats, stop)), stop))

    for _ in range(connections):
        spawn()
    publisher = await connect(url, open_timeout=10)
    started = time.monotonic()
    next_report = started + 1
    carry = 0.0
    try:
        while (now := time.monotonic()) - started < duration:
            await asyncio.sleep(0.1)
            carry += publish_rate * 0.1
            while carry >= 1:
                carry -= 1
                msg = {
                    "action": "publish",
                    "channel": f"sim-{rng.randrange(channels)}",
                    "data": "x",
                }
                await publisher.send(json.dumps(msg))
                stats.published += 1
            if now >= next_report:
                next_report += 1
                for _ in range(int(len(live) * churn)):
                    _task, stop = live.pop(rng.randrange(len(live)))
                    stop.set()
                    spawn()
                open_now = stats.opened - stats.closed
                progress(
                    f"t={now - started:4.0f}s open={open_now} opened={stats.opened} "
                    f"closed={stats.closed} refused={stats.refused} "
                    f"published={stats.published} received={stats.received}"
                )
    finally:
        for _task, stop in live:
            stop.set()
        await asyncio.gather(*(task for task, _ in live), return_exceptions=True)
        await publisher.close()
    return {
        "opened": stats.opened,
        "closed": stats.closed,
        "refused": stats.refused,
        "published": stats.published,
        "received": stats.received,
    }


def simulate(**kwargs: Any) -> dict[str, Any]:
    return asyncio.run(_run(**kwargs))
