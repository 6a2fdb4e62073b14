"""The embedded default, started as ``make run`` starts it, answers the admin endpoint and
counts a real WebSocket client of its own gateway."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from tests import processes
from tests.conftest import Admin

ROOT = Path(__file__).resolve().parents[2]


def test_make_run_serves_the_admin_endpoint_and_counts_its_gateway(tmp_path: Path) -> None:
    api_port, gw_port = processes.free_port(), processes.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    # Only the database file moves out of the work tree; everything else is the default.
    env["METERING_DATABASE_URL"] = f"sqlite:///{tmp_path / 'metering.db'}"
    proc = processes.Process(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "run",
            f"ARGS=--api-port {api_port} --gateway-port {gw_port}",
        ],
        env,
        ready="Ctrl-C stops it.",
        timeout=120,
    )
    try:
        curl = proc.wait_for("curl -H")
        key = re.search(r"IM-API-KEY: (mk_[\w-]+)", curl)
        assert key, proc.output
        assert f"http://127.0.0.1:{api_port}/admin/connection-count" in curl
        admin = Admin(api_port, key.group(1))
        assert admin.count() == 0

        app_id = re.search(r"/v1/realtime\?app=(\d+)", proc.output)
        assert app_id, proc.output

        async def one_client() -> None:
            async with connect(f"ws://127.0.0.1:{gw_port}/v1/realtime?app={app_id.group(1)}"):
                await asyncio.to_thread(admin.wait_for, 1, 5.0)
            await asyncio.to_thread(admin.wait_for, 0, 5.0)

        asyncio.run(one_client())
        bad = httpx.get(admin.url, headers={"IM-API-KEY": "mk_wrong"})
        assert bad.status_code == 401
        # The dashboard, with its charting library, is served by the embedded engine too.
        assert f"Dashboard http://127.0.0.1:{api_port}/dashboard" in proc.output
        base = f"http://127.0.0.1:{api_port}"
        assert "Usage dashboard" in httpx.get(f"{base}/dashboard").text
        assert httpx.get(f"{base}/dashboard/static/plotly.min.js").status_code == 200
        view = httpx.get(f"{base}/v1/dashboard/overview", headers={"IM-API-KEY": key.group(1)})
        assert view.json()["result"]["apps"][0]["id"] == int(app_id.group(1))
    finally:
        assert proc.stop(signal.SIGINT) in (0, 2, -2, 130), proc.output
