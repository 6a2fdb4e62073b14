"""Gateways of both languages as real processes, for the conformance drivers: the Python one
(``metering gateway``) and the Node.js one (``node sdk/node/examples/gateway.js``), started with
the same settings and flags, waited for on the same ready line."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from metering.accounts.registry import sync_registry
from metering.accounts.store import RegistryStore
from metering.core import redis as redis_clients
from metering.live.service import tick
from metering.live.store import READ, DatacenterStore, LiveValue
from metering.live.wiring import datacenter_stores, global_store
from tests import processes
from tests.conftest import Env
from tests.e2e.test_gateway_counting import Clients

ROOT = Path(__file__).resolve().parents[2]
NODE_SDK = ROOT / "sdk" / "node"
NODE_GATEWAY = NODE_SDK / "examples" / "gateway.js"
NODE = shutil.which("node")

# Which gateway each of the two frontends of a scenario runs; "mixed" puts one of each in the
# same account.
DRIVERS = {"python": ("python", "python"), "node": ("node", "node"), "mixed": ("python", "node")}


def node_available() -> str:
    # Not a skip: the Node.js SDK is part of the product, and make test installs it.
    assert NODE, "node (Node.js >= 20) is needed for tests/conformance: apt-get install nodejs npm"
    assert (NODE_SDK / "node_modules" / "ws").is_dir(), (
        "sdk/node's packages are not installed: run `make test` (npm ci in sdk/node)"
    )
    return NODE


def gateway_args(kind: str, port: int, frontend_id: str, datacenter: str) -> list[str]:
    flags = ["--port", str(port), "--frontend-id", frontend_id, "--datacenter", datacenter]
    if kind == "python":
        return [str(processes.BIN / "metering"), "gateway", *flags]
    return [node_available(), str(NODE_GATEWAY), *flags]


class Gateway:
    """One gateway process of either kind, once it listens."""

    def __init__(self, kind: str, proc: processes.Process, frontend_id: str) -> None:
        self.kind = kind
        self.proc = proc
        self.frontend_id = frontend_id
        self.port = 0

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def start_gateways(env: Env) -> Iterator[Callable[..., list[Gateway]]]:
    """Start gateways of the given kinds at once (in parallel), each ready when it returns."""
    started: list[Gateway] = []

    def start(
        kinds: tuple[str, ...] | list[str], ids: list[str] | None = None, datacenter: str = "dc1"
    ) -> list[Gateway]:
        ids = ids or [f"gw-{i}" for i in range(len(kinds))]
        batch = []
        for kind, frontend_id in zip(kinds, ids, strict=True):
            args = gateway_args(kind, processes.free_port(), frontend_id, datacenter)
            proc = processes.Process(args, env.child_env(), ready=None, cwd=str(ROOT))
            batch.append(Gateway(kind, proc, frontend_id))
        started.extend(batch)
        for gw in batch:
            gw.port = int(gw.proc.wait_for("listening on").rsplit(":", 1)[1])
        return batch

    yield start
    for gw in started:
        gw.proc.stop()


@pytest.fixture
def clients() -> Iterator[Clients]:
    c = Clients()
    yield c
    c.shutdown()


def publish_registry(env: Env) -> None:
    """A full sync of the registry from the database, as the engine's periodic task does: the
    mirror is complete, so an app missing from it is unknown (404) at once."""
    sync_registry(RegistryStore(redis_clients.primary(), env.prefix))


class Engine:
    """The engine's side, in process: the tick, and reads of what it counted."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.second = int(time.time())

    def tick(self) -> tuple[int, tuple]:  # type: ignore[type-arg]
        self.second += 1  # a new second each call: a second is counted only once
        result = tick(
            global_store(self.env.settings),
            datacenter_stores(self.env.settings),
            liveness_timeout=self.env.settings.liveness_timeout.total_seconds(),
            sample_retention=1000,
            now=self.second,
        )
        assert result.committed
        return result.second, result.accounts

    def app(self, app_id: int) -> LiveValue:
        return global_store(self.env.settings).app_value(str(app_id))

    def account(self, account_id: int) -> LiveValue:
        return global_store(self.env.settings).account_value(str(account_id))

    def values_after_tick(self, check: Callable[[], bool], what: str, timeout: float = 5) -> None:
        """Tick until ``check`` holds (the gateways flush within ~20 ms of a change)."""
        deadline = time.monotonic() + timeout
        while True:
            self.tick()
            if check():
                return
            assert time.monotonic() < deadline, f"not counted in time: {what}: {self.debug()}"
            time.sleep(0.05)

    def debug(self) -> str:
        """What the tick and the datacenters hold now (for a failure's message)."""
        gs = global_store(self.env.settings)
        stores = datacenter_stores(self.env.settings)
        held = {
            n: [s.client.hgetall(s.key(f"conns:{c}")) for c in "wsl"] for n, s in stores.items()
        }
        return f"global {gs.client.hgetall(gs.key('live:apps'))}, datacenters {held}"

    def store(self, datacenter: str = "dc1") -> DatacenterStore:
        return datacenter_stores(self.env.settings)[datacenter]

    def websockets_now(self, app_id: int, datacenter: str = "dc1") -> int:
        """The datacenter total at the moment of the call, as the API reads it (read.lua
        reaps dead frontends first)."""
        store = self.store(datacenter)
        timeout_ms = round(self.env.settings.liveness_timeout.total_seconds() * 1000)
        raw = READ(store.client, [store.base], [timeout_ms, 100, "w", str(app_id)])
        return int(raw[0]) if raw[0] else 0


@pytest.fixture
def engine(env: Env) -> Engine:
    return Engine(env)
