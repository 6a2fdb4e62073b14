"""Fixtures for end-to-end tests: an API process, gateway processes, a counting client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests import processes
from tests.conftest import Env


class Admin:
    """Reads ``/admin/connection-count`` like an operator's poller."""

    def __init__(self, port: int, key: str) -> None:
        self.url = f"http://127.0.0.1:{port}/admin/connection-count"
        self.key = key

    def count(self, *, unavailable_ok: bool = False) -> int | None:
        """The count; with ``unavailable_ok``, None for the 503 given while Redis is away."""
        response = httpx.get(self.url, headers={"IM-API-KEY": self.key}, timeout=5)
        if unavailable_ok and response.status_code == 503:
            assert response.json()["error"]["code"] == "UNAVAILABLE"
            return None
        assert response.status_code == 200, response.text
        value: int = response.json()["result"]["count"]
        return value

    def wait_for(
        self, expected: int, timeout: float = 5.0, *, unavailable_ok: bool = False
    ) -> float:
        """Seconds until the count equals ``expected``."""
        started = time.monotonic()
        seen = None
        while (elapsed := time.monotonic() - started) < timeout:
            seen = self.count(unavailable_ok=unavailable_ok)
            if seen == expected:
                return elapsed
            time.sleep(0.05)
        raise AssertionError(f"count stayed {seen}, expected {expected} within {timeout}s")


@pytest.fixture
def api_port(env: Env) -> Iterator[int]:
    port = processes.free_port()
    proc = processes.api(env.child_env(), port)
    yield port
    proc.stop()


@pytest.fixture
def start_gateway(env: Env) -> Iterator[Callable[..., processes.Process]]:
    started: list[processes.Process] = []

    def start(
        frontend_id: str = "gw-1", port: int | None = None, **extra: str
    ) -> processes.Process:
        proc = processes.gateway(env.child_env(**extra), port or processes.free_port(), frontend_id)
        proc.port = int(proc.wait_for("listening on").rsplit(":", 1)[1])  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
