"""``metering run``: the embedded default, everything in one process.

SQLite, the in-process Redis stand-in, the API, an example gateway, and the beat schedule run
by threads here instead of Celery beat. A composition root, like ``workers`` and the API app.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy import select

from metering.accounts import service as accounts
from metering.accounts.models import Account, App
from metering.api.app import create_app
from metering.core.database import unit_of_work
from metering.core.logging import configure, get_logger
from metering.core.migrate import upgrade
from metering.core.settings import Settings
from metering.gateway.server import serve_gateway
from workers.jobs import JOBS
from workers.schedule import Periodic, periodic_tasks

log = get_logger(__name__)
DEMO_NAME = "demo"
# Local and cheap in the embedded default: new apps, and what a `metering` command changed in
# the limits (it cannot reach this process's in-process Redis), reach the gateway within seconds.
EMBEDDED_REGISTRY_SYNC = 2.0
EMBEDDED_SYNCS = ("metering.accounts.sync_registry", "metering.limits.sync_admission")


class Scheduler:
    """Runs each periodic job on a thread of its own, on the beat schedule's intervals."""

    def __init__(self, entries: list[Periodic], jobs: dict[str, Callable[[], Any]]) -> None:
        self.entries = entries
        self.jobs = jobs
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for entry in self.entries:
            thread = threading.Thread(
                target=self._loop, args=(entry,), name=entry.task, daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _loop(self, entry: Periodic) -> None:
        job = self.jobs[entry.task]
        # Start on a whole multiple of the interval (just after a second begins, for the tick).
        next_run = (time.time() // entry.every + 1) * entry.every + 0.005
        while not self._stop.wait(max(0.0, next_run - time.time())):
            try:
                job()
            except Exception as exc:
                log.warning("scheduler.job_failed", task=entry.task, error=repr(exc))
            # Skip runs that are already late rather than firing them back to back.
            next_run += entry.every * max(1, int((time.time() - next_run) // entry.every) + 1)


def _demo_key() -> tuple[int, int, str]:
    """The demo account and app (created once), and a fresh key (keys are shown only once)."""
    with unit_of_work() as session:
        account = session.scalars(select(Account).where(Account.name == DEMO_NAME)).first()
        account_id = account.id if account else accounts.create_account(session, DEMO_NAME).id
        app = session.scalars(
            select(App).where(App.account_id == account_id, App.name == DEMO_NAME)
        ).first()
        app_id = app.id if app else accounts.create_app(session, account_id, DEMO_NAME).id
        key = accounts.create_key(
            session, app_id, ["platform", "stats", "admission", "billing"], "make run demo"
        )
    return account_id, app_id, key.key


def _wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def run_embedded(settings: Settings, *, api_port: int, gateway_port: int) -> None:
    configure(settings.log_level, json=settings.log_json)
    print(f"==> migrating {settings.database_url}", flush=True)
    upgrade(settings.database_url)
    account_id, app_id, key = _demo_key()

    entries = [
        Periodic(e.task, min(e.every, EMBEDDED_REGISTRY_SYNC), e.options)
        if e.task in EMBEDDED_SYNCS
        else e
        for e in periodic_tasks(settings)
    ]
    JOBS["metering.accounts.sync_registry"]()  # before the gateway takes its first connection
    scheduler = Scheduler(entries, JOBS)
    scheduler.start()

    api_host, gw_host = settings.api_host, settings.gateway_host
    api = uvicorn.Server(
        uvicorn.Config(create_app(settings), host=api_host, port=api_port, log_level="warning")
    )

    async def main() -> None:
        gateway = asyncio.create_task(
            serve_gateway(
                settings,
                host=gw_host,
                port=gateway_port,
                frontend_id=settings.gateway_frontend_id,
                datacenter=settings.datacenter,
            )
        )
        api_task = asyncio.create_task(api.serve())
        await asyncio.to_thread(_wait_port, api_host, api_port)
        await asyncio.to_thread(_wait_port, gw_host, gateway_port)
        _banner(
            settings,
            api=f"{api_host}:{api_port}",
            gateway=f"{gw_host}:{gateway_port}",
            account_id=account_id,
            app_id=app_id,
            key=key,
        )
        done, _pending = await asyncio.wait(
            {gateway, api_task}, return_when=asyncio.FIRST_COMPLETED
        )
        api.should_exit = True
        for task in done:
            task.result()
        await asyncio.gather(gateway, api_task, return_exceptions=True)

    try:
        asyncio.run(main())
    finally:
        scheduler.stop()


def _command() -> str:
    """How to call ``metering`` from here (``make run`` does not put the venv on PATH)."""
    installed = Path(sys.executable).parent / "metering"
    if shutil.which("metering") == str(installed) or not installed.exists():
        return "metering"
    with contextlib.suppress(ValueError):
        return os.path.relpath(installed)
    return str(installed)


def _banner(
    settings: Settings, *, api: str, gateway: str, account_id: int, app_id: int, key: str
) -> None:
    redis_desc = "in-process Redis stand-in" if settings.embedded else settings.redis_url
    lines = [
        "",
        f"Metering engine running (database {settings.database_url}, {redis_desc})",
        f"  API       http://{api}   (OpenAPI: http://{api}/docs)",
        f"  Dashboard http://{api}/dashboard   (enter the key below)",
        f"  Gateway   ws://{gateway}/v1/realtime?app={app_id}",
        f"  Demo app  {app_id} in account {account_id}, key with every permission:",
        f"            {key}",
        "",
        "Try:",
        f'  curl -H "IM-API-KEY: {key}" http://{api}/admin/connection-count',
        f"  {_command()} simulate --app {app_id} --gateway ws://{gateway}",
        "",
        "Ctrl-C stops it.",
    ]
    print("\n".join(lines), flush=True)
    sys.stdout.flush()
