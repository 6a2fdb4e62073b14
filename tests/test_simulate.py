"""``metering simulate`` against real gateways: every client keeps reading what the gateway
sends, so a run outlasts the keepalive; whatever stops a run is one line and a non-zero exit."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable

import pytest

from metering.accounts.registry import sync_registry
from metering.accounts.store import RegistryStore
from metering.core import redis as redis_clients
from metering.core.database import unit_of_work
from metering.limits import staff
from metering.limits.store import AdmissionStore
from tests import processes
from tests.conftest import Env
from tests.factories import tenant

METERING = str(processes.BIN / "metering")
StartGateway = Callable[..., processes.Process]


def simulate(env: Env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERING, "simulate", *args],
        env=env.child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error a failed run ends with, checked to be a single line and no stack trace."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def test_a_run_outlasts_the_gateways_keepalive(env: Env, start_gateway: StartGateway) -> None:
    # The gateway pings every client often and drops one whose pong is late. A connection
    # that leaves its frames unread (the publisher's replies, once they fill the client's
    # receive queue) stops reading its socket, pongs included: it would be dropped within
    # seconds, as at the default keepalive it was after about forty.
    t = tenant("platform")
    gw = start_gateway(
        "gw-keepalive",
        METERING_GATEWAY_WS_PING_INTERVAL="0.3",
        METERING_GATEWAY_WS_PING_TIMEOUT="0.7",
    )
    result = simulate(
        env,
        "--app", str(t.app_id), "--gateway", f"ws://127.0.0.1:{gw.port}",
        "--connections", "5", "--duration", "6", "--churn", "0.2", "--publish-rate", "40",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["published"] >= 200  # far more replies than the receive queue holds
    assert summary["opened"] == summary["closed"] >= 5
    assert summary["refused"] == summary["rejected"] == 0
    assert summary["received"] > 0
    assert "t=   5s open=5" in result.stderr


def test_an_unreachable_gateway_is_one_line(env: Env) -> None:
    port = processes.free_port()  # nothing listens there
    result = simulate(env, "--app", "1", "--gateway", f"ws://127.0.0.1:{port}")
    line = one_error_line(result)
    assert line == f"error: cannot reach the gateway at ws://127.0.0.1:{port}: connection refused"
    assert result.stdout == ""


def test_an_unknown_app_is_one_line(env: Env, start_gateway: StartGateway) -> None:
    known = tenant("platform")
    # The mirror as the engine's periodic sync leaves it: whole, so a missing app is unknown.
    sync_registry(RegistryStore(redis_clients.primary(), env.prefix))
    gw = start_gateway("gw-unknown")
    unknown = str(known.app_id + 1000)
    result = simulate(env, "--app", unknown, "--gateway", f"ws://127.0.0.1:{gw.port}")
    line = one_error_line(result)
    assert line == (
        f"error: the gateway refused the connection: HTTP 404, code 40400: unknown app {unknown}"
    )
    assert result.returncode == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--connections", "0"), "--connections must be 1 to 10000, got 0"),
        (("--connections", "-3"), "--connections must be 1 to 10000, got -3"),
        (("--duration", "0"), "--duration must be at least 0.5 seconds, got 0.0"),
        (("--duration", "-1"), "--duration must be at least 0.5 seconds, got -1.0"),
        (("--duration", "inf"), "--duration must be at least 0.5 seconds, got inf"),
        (("--churn", "1.5"), "--churn must be a share from 0 to 1, got 1.5"),
        (("--channels", "0"), "--channels must be at least 1, got 0"),
        (
            ("--publish-rate", "nan"),
            "--publish-rate must be 0 or more messages per second, got nan",
        ),
        (("--app", "0"), "--app must be an app's id (a positive number), got 0"),
        (
            ("--gateway", "http://127.0.0.1:8001"),
            "--gateway must be a ws:// or wss:// URL, got 'http://127.0.0.1:8001'",
        ),
        (("--gateway", "ws://127.0.0.1:99999"), "--gateway is not a valid URL"),
    ],
)
def test_a_bad_argument_is_one_line(env: Env, args: tuple[str, ...], message: str) -> None:
    # Checked before anything is reached: no gateway listens at the default address here.
    result = simulate(env, "--app", "1", *args)
    assert one_error_line(result).startswith(f"error: {message}")
    assert result.returncode == 2


def test_connections_refused_by_the_limits_are_counted_and_the_run_goes_on(
    env: Env, start_gateway: StartGateway
) -> None:
    t = tenant("platform")
    with unit_of_work() as session:
        staff.create_package(session, "small", {"connections": (10, 20), "channels": (1, 1)})
        change = staff.set_package(session, t.account_id, "small", by="test")
    AdmissionStore(redis_clients.primary(), env.prefix).write(change.admission)
    gw = start_gateway("gw-limits")
    # More clients than the hard limit lets in: the gateway refuses the rest (403), and
    # rejects attaching any channel but the account's first (an error frame).
    result = simulate(
        env,
        "--app", str(t.app_id), "--gateway", f"ws://127.0.0.1:{gw.port}",
        "--connections", "25", "--channels", "5", "--duration", "2", "--churn", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["refused"] >= 25 + 1 - 20  # the publisher is one of those let in
    assert summary["opened"] + summary["refused"] == 25  # without churn, each client once
    assert summary["opened"] == summary["closed"]
    assert summary["rejected"] >= 1
    refused = [ln for ln in result.stderr.splitlines() if "refuses connections" in ln]
    assert refused == [
        "the gateway refuses connections (counted): HTTP 403, code 40111: "
        "account restricted (connection limits exceeded)"
    ]
    rejected = [ln for ln in result.stderr.splitlines() if "rejects requests" in ln]
    assert rejected == [
        "the gateway rejects requests (counted): code 40114: "
        "account restricted (channel limits exceeded)"
    ]


def test_a_gateway_going_away_ends_the_run_with_one_line(
    env: Env, start_gateway: StartGateway
) -> None:
    t = tenant("platform")
    gw = start_gateway("gw-leaving")
    sim = processes.Process(
        [METERING, "simulate", "--app", str(t.app_id), "--gateway", f"ws://127.0.0.1:{gw.port}",
         "--connections", "4", "--duration", "30"],
        env.child_env(), ready="t=   1s",
    )  # fmt: skip
    gw.stop()
    assert sim.proc.wait(timeout=15) == 1
    sim.stop()
    assert "Traceback" not in sim.output
    assert sim.lines[-1] == (
        "error: the gateway closed a connection: 1001 (going away) gateway shutting down"
    )


def test_ctrl_c_stops_the_run_with_its_summary(env: Env, start_gateway: StartGateway) -> None:
    t = tenant("platform")
    gw = start_gateway("gw-ctrl-c")
    sim = processes.Process(
        [METERING, "simulate", "--app", str(t.app_id), "--gateway", f"ws://127.0.0.1:{gw.port}",
         "--connections", "4", "--duration", "30"],
        env.child_env(), ready="t=   1s",
    )  # fmt: skip
    assert sim.stop(signal.SIGINT) == 130
    assert "Traceback" not in sim.output
    assert sim.lines[-1] == "interrupted (Ctrl-C)"
    summary = json.loads(sim.lines[-2])
    assert summary["opened"] == summary["closed"] >= 4
