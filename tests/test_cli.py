"""The ``metering`` command as an operator types it: create commands print JSON for scripts,
mistakes get one clear line and no stack trace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests import processes
from tests.conftest import Env

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
