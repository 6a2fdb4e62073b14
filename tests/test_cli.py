"""The ``metering`` command as an operator types it: create commands print JSON for scripts,
mistakes get one clear line and no stack trace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests import processes
from tests.conftest import Env
from tests.factories import Tenant, tenant

METERING = str(processes.BIN / "metering")


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [METERING, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_create_account_app_and_key_as_json(env: Env) -> None:
    child = env.child_env()
    account = json.loads(run(child, "accounts", "create", "Acme", "--json").stdout)
    assert account["name"] == "Acme"
    app = json.loads(
        run(child, "apps", "create", "--account", str(account["id"]), "chat", "--json").stdout
    )
    assert (app["accountId"], app["name"]) == (account["id"], "chat")
    key = json.loads(
        run(
            child,
            "keys",
            "create",
            "--app",
            str(app["id"]),
            "--permission",
            "platform",
            "--permission",
            "stats",
            "--json",
        ).stdout
    )
    assert key["permissions"] == ["platform", "stats"]
    assert key["key"].startswith("mk_")
    assert key["key"].startswith(key["keyPrefix"])
    # The app is in the registry the gateways read, at once.
    assert env.redis.hget(f"{{{env.prefix}}}:apps", str(app["id"])) == str(account["id"]).encode()


def test_the_key_is_printed_once_and_stored_only_as_a_digest(env: Env) -> None:
    child = env.child_env()
    account = json.loads(run(child, "accounts", "create", "A", "--json").stdout)
    app = json.loads(
        run(child, "apps", "create", "--account", str(account["id"]), "a", "--json").stdout
    )
    shown = run(child, "keys", "create", "--app", str(app["id"]), "--permission", "platform")
    assert shown.returncode == 0
    key = next(line for line in shown.stdout.splitlines() if line.startswith("mk_"))
    from sqlalchemy import text

    from metering.core.database import get_engine

    with get_engine().connect() as conn:
        stored = conn.execute(text("SELECT key_hash, key_prefix FROM api_keys")).one()
    assert key not in stored
    assert len(stored.key_hash) == 64


def test_mistakes_get_one_clear_line(env: Env) -> None:
    child = env.child_env()
    cases = [
        (("apps", "create", "--account", "999", "x"), "account 999 does not exist"),
        (("keys", "create", "--app", "999", "--permission", "platform"), "app 999 does not exist"),
        # Past the 32-bit id columns: no such row either (not a database error).
        (("apps", "create", "--account", "99999999999", "x"), "account 99999999999 does not exist"),
        (
            ("keys", "create", "--app", "99999999999", "--permission", "stats"),
            "app 99999999999 does not exist",
        ),
        (("accounts", "create", "   "), "account name must be 1 to 200 characters"),
    ]
    account = json.loads(run(child, "accounts", "create", "A", "--json").stdout)
    app = json.loads(
        run(child, "apps", "create", "--account", str(account["id"]), "a", "--json").stdout
    )
    cases.append(
        (
            ("keys", "create", "--app", str(app["id"]), "--permission", "root"),
            "unknown permission root",
        )
    )
    for args, message in cases:
        result = run(child, *args)
        assert result.returncode == 1, args
        assert result.stderr.strip() == f"error: {message}" or message in result.stderr, (
            result.stderr
        )
        assert "Traceback" not in result.stderr + result.stdout


def test_a_bad_setting_is_named(env: Env) -> None:
    result = run(env.child_env(METERING_LIVENESS_TIMEOUT="soon"), "accounts", "create", "x")
    assert result.returncode == 1
    assert "METERING_LIVENESS_TIMEOUT" in result.stderr
    assert "Traceback" not in result.stderr
    typo = run(env.child_env(METERING_REDIS_PERFIX="x"), "accounts", "create", "x")
    assert "unknown setting METERING_REDIS_PERFIX" in typo.stderr


def test_db_upgrade_builds_a_fresh_sqlite_database(tmp_path: Path, env: Env) -> None:
    db = tmp_path / "fresh.db"
    result = run(env.child_env(METERING_DATABASE_URL=f"sqlite:///{db}"), "db", "upgrade")
    assert result.returncode == 0, result.stderr
    assert "database is up to date" in result.stderr
    assert db.exists()


def test_simulate_drives_a_gateway_with_real_clients_and_shows_progress(
    env: Env, start_gateway
) -> None:
    from tests.factories import tenant

    t = tenant("platform")
    gw = start_gateway("gw-sim")
    result = run(
        env.child_env(),
        "simulate",
        "--app",
        str(t.app_id),
        "--gateway",
        f"ws://127.0.0.1:{gw.port}",
        "--connections",
        "6",
        "--duration",
        "2.5",
        "--churn",
        "0.5",
        "--publish-rate",
        "20",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["opened"] >= 6 + 3  # half the clients replaced at least once
    assert summary["opened"] == summary["closed"]
    assert summary["refused"] == 0
    assert summary["published"] >= 30
    assert summary["received"] > 0
    assert "open=6" in result.stderr  # a progress line each second


def test_standalone_servers_refuse_the_in_process_redis(env: Env) -> None:
    # Alone, each would count only itself: the API would answer zero forever.
    child = env.child_env()
    del child["METERING_REDIS_URL"]
    for args in (("api",), ("gateway", "--port", "0")):
        result = run(child, *args)
        assert result.returncode == 1
        assert "METERING_REDIS_URL" in result.stderr
        assert "metering run" in result.stderr


def test_a_gateway_in_a_datacenter_the_engine_does_not_read_is_refused(env: Env) -> None:
    # Its counts would go where no tick and no API look: lost without a word.
    result = run(env.child_env(), "gateway", "--port", "0", "--datacenter", "nowhere")
    assert result.returncode == 1
    assert "datacenter 'nowhere' is not one the engine reads (dc1)" in result.stderr
    assert "Traceback" not in result.stderr


# -- metering stats -----------------------------------------------------------------------

STATS_T0 = 1_775_001_420  # 2026-03-31 23:57:00 UTC


def stats_scenario(env: Env) -> Tenant:
    """An app with 2, 3, 1 connections at 23:57:00-02 and 2 at 23:58:00 (UTC), one channel,
    one 100-byte message delivered twice; one aggregation after the last second counted, so
    the counters land in 23:58."""
    from metering.core.database import get_engine
    from metering.gateway.sdk import Meter
    from metering.live.service import tick
    from metering.live.store import DatacenterStore, GlobalStore
    from metering.rollups.service import Aggregator

    t = tenant("stats")
    app = str(t.app_id)
    g, dc = GlobalStore(env.redis, env.prefix), DatacenterStore(env.redis, env.prefix, "dc1")
    fe = Meter(dc, "fe-1", liveness_timeout=60)
    fe.channel_attached(app, "chat")
    fe.message_published(app, "chat", 100)
    fe.message_delivered(app, "chat", 100, count=2)
    current = 0
    for second, conns in ((0, 2), (1, 3), (2, 1), (60, 2)):
        for _ in range(conns - current):
            fe.connection_opened(app)
        for _ in range(current - conns):
            fe.connection_closed(app)
        current = conns
        fe.flush()
        now = STATS_T0 + second
        assert tick(g, {"dc1": dc}, liveness_timeout=60, sample_retention=1000, now=now).committed
    result = Aggregator(get_engine(), g, {"dc1": dc}).run()
    assert (result.committed, result.second) == (True, STATS_T0 + 60)
    return t


def test_stats_prints_a_table_newest_first(env: Env) -> None:
    t = stats_scenario(env)
    result = run(env.child_env(), "stats", "--app", str(t.app_id))
    assert result.returncode == 0, result.stderr
    groups, heads, *rows, legend = result.stdout.splitlines()
    assert groups.split() == ["connections", "channels", "published", "delivered", "refused"]
    assert heads.split() == [
        "interval", "peak", "peak", "at", "min", "mean", "opened", "refused", "ws", "peak",
        "peak", "min", "mean", "refused", "msgs", "bytes", "msgs", "bytes", "msgs",
    ]  # fmt: skip
    assert [row.split() for row in rows] == [
        # 23:58 is in progress (the watermark is its first second) and holds the counters.
        ["2026-03-31:23:58", "*", "2", "23:58:00", "2", "2.00", "4", "0", "2",
         "1", "1", "1.00", "0", "1", "100", "2", "200", "0"],
        ["2026-03-31:23:57", "3", "23:57:01", "1", "2.00", "0", "0", "3",
         "1", "1", "1.00", "0", "0", "0", "0", "0", "0"],
    ]  # fmt: skip
    assert legend.startswith("* in progress")
    # The columns line up: every value ends where its heading ends.
    assert len({len(line) for line in (heads, *rows)}) == 1
    assert heads.index("interval") == rows[0].index("2026") == 0


def test_stats_json_is_what_the_api_returns(env: Env) -> None:
    from fastapi.testclient import TestClient

    from metering.api.app import create_app

    t = stats_scenario(env)
    child = env.child_env()
    result = run(child, "stats", "--app", str(t.app_id), "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)
    with TestClient(create_app(env.settings)) as client:
        api = client.get("/v1/stats", headers={"IM-API-KEY": t.key}).json()["result"]
    assert entries == api
    assert [(e["intervalId"], e["appId"], e.get("inProgress", False)) for e in entries] == [
        ("2026-03-31:23:58", t.app_id, True),
        ("2026-03-31:23:57", t.app_id, False),
    ]
    assert entries[1]["connections.all.peak"] == 3
    assert entries[1]["connections.all.peakAt"] == (STATS_T0 + 1) * 1000

    def intervals(*args: str) -> list[str]:
        out = run(child, "stats", "--json", *args)
        assert out.returncode == 0, out.stderr
        return [e["intervalId"] for e in json.loads(out.stdout)]

    account = ("--account", str(t.account_id))
    assert intervals(*account, "--direction", "forwards") == [
        "2026-03-31:23:57",
        "2026-03-31:23:58",
    ]
    assert intervals(*account, "--limit", "1") == ["2026-03-31:23:58"]
    # ISO 8601 UTC (with or without Z) or milliseconds since the epoch; the end is exclusive.
    assert intervals(*account, "--start", "2026-03-31T23:58") == ["2026-03-31:23:58"]
    assert intervals(*account, "--end", str((STATS_T0 + 60) * 1000)) == ["2026-03-31:23:57"]
    # A period that starts before the end is in, even less than a second before.
    assert intervals(*account, "--end", str((STATS_T0 + 60) * 1000 + 1)) == [
        "2026-03-31:23:58",
        "2026-03-31:23:57",
    ]
    assert intervals(*account, "--end", "2026-03-31T23:58:00.001") == [
        "2026-03-31:23:58",
        "2026-03-31:23:57",
    ]
    assert intervals(
        *account, "--start", "2026-03-31T23:57:30Z", "--end", "2026-04-01T00:00:00+00:00"
    ) == ["2026-03-31:23:58", "2026-03-31:23:57"]
    assert intervals(*account, "--unit", "hour") == ["2026-03-31:23"]
    # Nothing in range is an empty array, not an error.
    assert intervals(*account, "--start", "2026-04-01T00:00") == []


def test_stats_of_an_app_without_usage_says_so(env: Env) -> None:
    t = tenant("stats")
    result = run(env.child_env(), "stats", "--app", str(t.app_id))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"no usage recorded for app {t.app_id} (per minute)"
    ranged = run(
        env.child_env(), "stats", "--account", str(t.account_id), "--unit", "day",
        "--start", "2026-03-31T23:57", "--end", str((STATS_T0 + 3600) * 1000),
    )  # fmt: skip
    assert ranged.returncode == 0, ranged.stderr
    assert ranged.stdout.strip() == (
        f"no usage recorded for account {t.account_id} "
        "(per day from 2026-03-31T23:57 before 2026-04-01T00:57:00Z)"
    )


def test_stats_mistakes_get_one_clear_line(env: Env) -> None:
    t = tenant("stats")
    app = ("--app", str(t.app_id))
    cases = [
        (("--app", "1", "--account", "1"), "give exactly one of --app ID or --account ID"),
        ((), "give exactly one of --app ID or --account ID"),
        ((*app, "--unit", "week"), "unknown unit 'week' (one of minute, hour, day, month)"),
        ((*app, "--direction", "up"), "direction must be backwards or forwards, got 'up'"),
        ((*app, "--limit", "0"), "limit must be between 1 and 1000, got 0"),
        ((*app, "--limit", "1001"), "limit must be between 1 and 1000, got 1001"),
        (
            (*app, "--start", "yesterday"),
            "--start must be an ISO 8601 UTC time (e.g. 2026-03-31T23:57) or milliseconds "
            "since the epoch, got 'yesterday'",
        ),
        ((*app, "--end", "2026-13-01"), "--end must be an ISO 8601 UTC time"),
        ((*app, "--start", "-5"), "--start must be milliseconds since the epoch, got -5"),
        (
            (*app, "--start", "2026-04-01", "--end", "2026-03-31T23:57"),
            "--start (2026-04-01) must be before --end (2026-03-31T23:57)",
        ),
        ((*app, "--start", "1000", "--end", "1000"), "--start (1000) must be before --end (1000)"),
        (
            (*app, "--start", "1000500", "--end", "1000200"),
            "--start (1000500) must be before --end (1000200)",
        ),
        (("--app", "999999"), "app 999999 does not exist"),
        (("--account", "999999"), "account 999999 does not exist"),
        (("--app", "99999999999"), "app 99999999999 does not exist"),
        (("--account", "99999999999"), "account 99999999999 does not exist"),
    ]
    for args, message in cases:
        result = run(env.child_env(), "stats", *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith(f"error: {message}"), (args, result.stderr)
        assert result.stdout == ""
        assert "Traceback" not in result.stderr, args
    # Typer checks the option types itself: a usage error (exit 2), still no traceback.
    result = run(env.child_env(), "stats", *app, "--limit", "many")
    assert result.returncode == 2
    assert "--limit" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
