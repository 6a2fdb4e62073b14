"""What staff do from the ``metering`` command: packages and their limits, an account's
package and override, alerts. Every change is recorded with who made it and mirrored to the
Redis copy gateways enforce from; every mistake is one clear line and writes nothing."""

from __future__ import annotations

import getpass
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from metering.accounts.models import PackageChange
from metering.core.database import get_engine, unit_of_work
from metering.limits import staff
from metering.limits.models import AlertDelivery, LimitAlert
from metering.limits.repository import AdmissionRow
from metering.limits.store import AdmissionStore
from tests.conftest import Env
from tests.factories import tenant
from tests.test_cli import run


def ok(env: Env, *args: str) -> str:
    result = run(env.child_env(), *args)
    assert result.returncode == 0, (args, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stdout


def ok_json(env: Env, *args: str) -> Any:
    return json.loads(ok(env, *args, "--json"))


def mirror(env: Env) -> dict[int, AdmissionRow]:
    return AdmissionStore(env.redis, env.prefix).read()


def snapshot(env: Env) -> tuple[Any, ...]:
    """Everything a staff command could write: its tables and the Redis copy."""
    tables = (
        "packages", "package_limits", "package_changes", "account_overrides",
        "account_admission", "limit_alerts",
    )  # fmt: skip
    with get_engine().connect() as conn:
        rows = tuple(
            tuple(map(tuple, conn.execute(text(f"SELECT * FROM {t} ORDER BY 1")).all()))
            for t in tables
        )
        accounts = tuple(
            map(tuple, conn.execute(text("SELECT id, package_id FROM accounts ORDER BY id")))
        )
    return rows, accounts, mirror(env)


# -- packages --------------------------------------------------------------------------------


def test_a_package_gets_its_limits_with_the_hard_limit_defaulting_to_2_5_times_the_quota(
    env: Env,
) -> None:
    pro = ok_json(
        env, "packages", "create", "pro",
        "--limit", "connections=100", "--limit", "channels=3", "--limit", "messages=1000:4000",
    )  # fmt: skip
    assert pro["name"] == "pro"
    assert pro["enforceHard"] is True
    assert pro["limits"] == {
        "connections": {"quota": 100, "hardLimit": 250},
        "channels": {"quota": 3, "hardLimit": 8},  # 7.5, rounded up
        "messages": {"quota": 1000, "hardLimit": 4000},
    }
    free = ok_json(env, "packages", "create", "free", "--limit", "data=0", "--notify-only")
    assert (free["enforceHard"], free["limits"]) == (
        False,
        {"data": {"quota": 0, "hardLimit": 0}},
    )

    listed = ok_json(env, "packages", "list")
    assert listed == [pro, free]
    heading, *rows, legend = ok(env, "packages", "list").splitlines()
    assert heading.split() == [
        "id", "name", "at", "hard", "connections", "channels", "messages", "data", "created",
    ]  # fmt: skip
    assert rows[0].split()[:9] == [
        str(pro["id"]),
        "pro",
        "reject",
        "100",
        "/",
        "250",
        "3",
        "/",
        "8",
    ]
    assert rows[1].split()[:7] == [str(free["id"]), "free", "notify", "-", "-", "-", "0"]
    assert legend == "(per metric: quota / hard limit)"


def test_creating_a_package_prints_its_limits(env: Env) -> None:
    out = ok(env, "packages", "create", "basic", "--limit", "connections=10:12")
    assert out.splitlines()[0].startswith("package ")
    assert "connections  quota 10, hard limit 12" in out
    assert "at the hard limit: reject and notify staff" in out
    assert ok(env, "packages", "list").strip() != "no packages"


def test_no_packages_says_so(env: Env) -> None:
    assert ok(env, "packages", "list").strip() == "no packages"
    assert ok_json(env, "packages", "list") == []


# -- mistakes ----------------------------------------------------------------------------------


def test_every_mistake_is_one_clear_line_and_writes_nothing(env: Env) -> None:
    t = tenant("platform")
    a = str(t.account_id)
    ok(env, "packages", "create", "pro", "--limit", "connections=10")
    ok(env, "accounts", "set-package", a, "pro", "--by", "alice")
    with unit_of_work() as session:
        session.add(alert(t.account_id))
    cases: list[tuple[tuple[str, ...], str]] = [
        (("packages", "create", "x", "--limit", "connections=10:5"),
         "connections: the hard limit (5) must not be below the quota (10)"),
        (("packages", "create", "x", "--limit", "connections=-1"),
         "connections: the quota must not be negative, got -1"),
        (("packages", "create", "x", "--limit", "channels=1:-2"),
         "channels: the hard limit (-2) must not be below the quota (1)"),
        (("packages", "create", "x", "--limit", "conns=10"),
         "unknown metric 'conns'; choose from connections, channels, messages, data"),
        (("packages", "create", "x", "--limit", "connections=ten"),
         "limit 'connections=ten': expected METRIC=QUOTA[:HARD], e.g. connections=100:250"),
        (("packages", "create", "x", "--limit", "connections"),
         "limit 'connections': expected METRIC=QUOTA[:HARD]"),
        (("packages", "create", "x", "--limit", "messages=1", "--limit", "messages=2"),
         "messages: given twice"),
        (("packages", "create", "x", "--limit", f"data={10**16}"),
         "data: the quota must be at most 1000000000000000"),
        # A good limit after a bad one is not written either.
        (("packages", "create", "x", "--limit", "data=1", "--limit", "data=2:1"),
         "data: the hard limit (1) must not be below the quota (2)"),
        (("packages", "create", "pro", "--limit", "connections=1"),
         "a package named 'pro' exists already"),
        (("packages", "create", "  ", "--limit", "connections=1"),
         "package name must be 1 to 100 characters"),
        (("accounts", "set-package", "999", "pro"), "account 999 does not exist"),
        (("accounts", "set-package", "99999999999", "pro"), "account 99999999999 does not exist"),
        (("accounts", "set-package", a, "gold"), "no package 'gold'"),
        (("accounts", "set-package", a, "99999999999"), "no package '99999999999'"),
        (("accounts", "set-package", a, "pro", "--by", " "), "--by must be 1 to 200 characters"),
        (("accounts", "set-package", a, "pro", "--by", "x" * 201),
         "--by must be 1 to 200 characters"),
        (("accounts", "override", "999", "--reason", "launch"), "account 999 does not exist"),
        (("accounts", "override", a, "--reason", " "),
         "an override needs a reason of 1 to 500 characters"),
        (("accounts", "override", a, "--reason", "launch", "--until", "2030-01-01T00:00"),
         "until must carry a time zone (e.g. 2026-12-01T00:00:00Z)"),
        (("accounts", "override", a, "--reason", "launch", "--until", "next week"),
         "--until must be an ISO 8601 time with a time zone (e.g. 2026-12-01T00:00:00Z), "
         "got 'next week'"),
        (("accounts", "override", a, "--reason", "launch", "--until", "2020-01-01T00:00Z"),
         "until must be in the future"),
        (("accounts", "clear-override", a), f"account {a} has no override"),
        (("accounts", "clear-override", "999"), "account 999 does not exist"),
        (("accounts", "admission", "999"), "account 999 does not exist"),
        (("alerts", "list", "--month", "2026-13"), "month must be YYYY-MM, got '2026-13'"),
        (("alerts", "list", "--month", "April"), "month must be YYYY-MM, got 'April'"),
        (("alerts", "list", "--account", "999"), "account 999 does not exist"),
        (("alerts", "list", "--limit", "0"), "limit must be between 1 and 1000, got 0"),
        (("alerts", "ack", "999"), "alert 999 does not exist"),
        (("alerts", "ack", "99999999999"), "alert 99999999999 does not exist"),
    ]  # fmt: skip
    before = snapshot(env)
    for args, message in cases:
        result = run(env.child_env(), *args)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith(f"error: {message}"), (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert result.stdout == "", args
        assert snapshot(env) == before, args
    # Typer checks that a limit is given at all: a usage error (exit 2), no traceback.
    result = run(env.child_env(), "packages", "create", "x")
    assert result.returncode == 2
    assert "--limit" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(env) == before


# -- an account's package ----------------------------------------------------------------------


def package_changes(account_id: int) -> list[tuple[int | None, str]]:
    with unit_of_work() as session:
        rows = session.scalars(
            select(PackageChange)
            .where(PackageChange.account_id == account_id)
            .order_by(PackageChange.id)
        )
        return [(r.package_id, r.changed_by) for r in rows]


def test_set_package_records_the_change_and_mirrors_what_gateways_enforce(env: Env) -> None:
    t = tenant("platform")
    a = str(t.account_id)
    pro = ok_json(
        env, "packages", "create", "pro", "--limit", "connections=100", "--limit", "channels=4:9"
    )
    ok_json(env, "packages", "create", "lenient", "--limit", "connections=5", "--notify-only")

    out = ok(env, "accounts", "set-package", a, "pro", "--by", "alice")
    assert out.strip() == f"account {a} is on package pro (id {pro['id']}) now"
    assert package_changes(t.account_id) == [(pro["id"], "alice")]
    assert mirror(env) == {t.account_id: AdmissionRow(connections_hard=250, channels_hard=9)}
    assert ok_json(env, "accounts", "admission", a) == {
        "accountId": t.account_id,
        "connectionsHard": 250,
        "channelsHard": 9,
        "publishBlockedMonth": None,
        "publishBlockedBy": None,
        "override": None,
    }
    assert ok(env, "accounts", "admission", a).splitlines() == [
        f"account {a}",
        "  connections  new ones refused at 250 live",
        "  channels     new ones refused at 9 active",
        "  publishing   allowed",
        "  override     none",
    ]

    # By id, and without --by: the OS user is recorded.
    changed = ok_json(env, "accounts", "set-package", a, str(pro["id"]))
    assert (changed["accountId"], changed["package"], changed["packageId"]) == (
        t.account_id,
        "pro",
        pro["id"],
    )
    assert package_changes(t.account_id)[-1] == (pro["id"], getpass.getuser())

    # A package that only notifies enforces nothing: the account leaves the copy.
    ok(env, "accounts", "set-package", a, "lenient", "--by", "bob")
    assert mirror(env) == {}

    ok(env, "accounts", "set-package", a, "pro", "--by", "alice")
    assert t.account_id in mirror(env)
    out = ok(env, "accounts", "set-package", a, "none", "--by", "carol")
    assert out.strip() == f"account {a} is on no package now"
    assert package_changes(t.account_id)[-1] == (None, "carol")
    assert mirror(env) == {}
    assert ok(env, "accounts", "admission", a).splitlines()[1:3] == [
        "  connections  not limited",
        "  channels     not limited",
    ]


def test_override_empties_what_is_enforced_and_clearing_it_restores_it(env: Env) -> None:
    t = tenant("platform")
    a = str(t.account_id)
    ok(env, "packages", "create", "pro", "--limit", "connections=100")
    ok(env, "accounts", "set-package", a, "pro")
    assert mirror(env) == {t.account_id: AdmissionRow(connections_hard=250)}

    until = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    override = ok_json(
        env, "accounts", "override", a, "--reason", "launch week", "--until",
        until.isoformat().replace("+00:00", "Z"), "--by", "dana",
    )  # fmt: skip
    assert override["accountId"] == t.account_id
    assert (override["reason"], override["createdBy"]) == ("launch week", "dana")
    assert datetime.fromisoformat(override["until"]) == until
    assert mirror(env) == {}
    admission = ok_json(env, "accounts", "admission", a)
    assert admission["connectionsHard"] is None
    assert admission["override"]["createdBy"] == "dana"
    assert ok(env, "accounts", "admission", a).splitlines()[-1] == (
        f"  override     nothing rejected until {until:%Y-%m-%d %H:%M:%S}Z (by dana: launch week)"
    )

    # Overriding again replaces the override (no end: until cleared).
    text_out = ok(env, "accounts", "override", a, "--reason", "partner", "--by", "erin")
    assert text_out.strip() == f"account {a}: nothing is rejected until cleared (by erin: partner)"
    assert ok_json(env, "accounts", "admission", a)["override"]["until"] is None

    assert ok(env, "accounts", "clear-override", a).strip() == f"account {a}: override removed"
    assert mirror(env) == {t.account_id: AdmissionRow(connections_hard=250)}
    assert ok_json(env, "accounts", "admission", a)["override"] is None


def test_a_change_commits_and_warns_when_redis_is_away(env: Env) -> None:
    t = tenant("platform")
    pro = ok_json(env, "packages", "create", "pro", "--limit", "connections=100")
    away = env.child_env(METERING_REDIS_URL="redis://127.0.0.1:1/0")
    result = run(away, "accounts", "set-package", str(t.account_id), "pro", "--by", "alice")
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: Redis unavailable")
    assert "the admission sync will mirror the change within 30 s" in result.stderr
    assert package_changes(t.account_id) == [(pro["id"], "alice")]


def test_the_embedded_engine_syncs_the_copy_itself(env: Env) -> None:
    # Its Redis lives in the engine's process: the command cannot reach it, and need not.
    t = tenant("platform")
    embedded = env.child_env()
    del embedded["METERING_REDIS_URL"]
    assert run(embedded, "packages", "create", "pro", "--limit", "connections=1").returncode == 0
    result = run(embedded, "accounts", "set-package", str(t.account_id), "pro", "--by", "x")
    assert (result.returncode, result.stderr) == (0, "")
    assert mirror(env) == {}


# -- alerts ------------------------------------------------------------------------------------


def alert(account_id: int, **fields: Any) -> LimitAlert:
    values: dict[str, Any] = {
        "account_id": account_id,
        "month": "2026-04",
        "metric": "connections",
        "level": "soft",
        "usage": 120,
        "threshold": 100,
        "quota": 100,
        "hard_limit": 250,
        "rejects": False,
        "detected_at": datetime(2026, 4, 2, 10, 0, 3, tzinfo=UTC),
    }
    values.update(fields)
    return LimitAlert(**values)


def test_alerts_are_listed_newest_first_with_their_deliveries_and_acknowledged(
    env: Env,
) -> None:
    t = tenant("platform")
    other = tenant("platform", name="other")
    with unit_of_work() as session:
        soft = alert(t.account_id)
        hard = alert(
            t.account_id, level="hard", usage=260, threshold=250, rejects=True,
            detected_at=datetime(2026, 4, 9, 8, 30, tzinfo=UTC),
        )  # fmt: skip
        march = alert(
            other.account_id, month="2026-03", metric="messages", level="warning",
            usage=800, threshold=800, detected_at=datetime(2026, 3, 30, tzinfo=UTC),
        )  # fmt: skip
        session.add_all([soft, hard, march])
        session.flush()
        session.add_all(
            [
                AlertDelivery(alert_id=hard.id, channel="webhook", status="sent"),
                AlertDelivery(alert_id=hard.id, channel="email", status="failed"),
                AlertDelivery(alert_id=soft.id, channel="webhook", status="pending"),
            ]
        )
        ids = soft.id, hard.id, march.id

    listed = ok_json(env, "alerts", "list")
    assert [a["id"] for a in listed] == [ids[1], ids[0], ids[2]]
    assert listed[0]["deliveries"] == {"webhook": "sent", "email": "failed"}
    assert listed[1]["deliveries"] == {"webhook": "pending"}
    assert listed[2]["deliveries"] == {}
    assert (listed[0]["level"], listed[0]["rejects"], listed[0]["usage"]) == ("hard", True, 260)

    heading, *rows = ok(env, "alerts", "list").splitlines()
    assert heading.split() == [
        "id", "account", "month", "metric", "level", "usage", "/", "threshold", "detected",
        "acknowledged", "deliveries",
    ]  # fmt: skip
    assert rows[0].split() == [
        str(ids[1]), str(t.account_id), "2026-04", "connections", "hard", "260", "/", "250",
        "2026-04-09", "08:30:00Z", "-", "email:failed", "webhook:sent",
    ]  # fmt: skip
    assert rows[2].split()[-2:] == ["-", "-"]

    assert [a["id"] for a in ok_json(env, "alerts", "list", "--account", str(t.account_id))] == [
        ids[1],
        ids[0],
    ]
    assert [a["id"] for a in ok_json(env, "alerts", "list", "--month", "2026-03")] == [ids[2]]
    assert [a["id"] for a in ok_json(env, "alerts", "list", "--limit", "1")] == [ids[1]]

    acked = ok_json(env, "alerts", "ack", str(ids[1]), "--by", "frank")
    assert acked["acknowledgedBy"] == "frank"
    assert acked["deliveries"] == {"webhook": "sent", "email": "failed"}
    # Acknowledged again: the first acknowledgement stays, and the command says so.
    again = ok(env, "alerts", "ack", str(ids[1]), "--by", "gina")
    assert again.startswith(f"alert {ids[1]} was acknowledged already")
    assert again.strip().endswith("by frank")
    assert ok_json(env, "alerts", "list")[0]["acknowledgedBy"] == "frank"
    first = ok(env, "alerts", "ack", str(ids[0]))
    assert first.strip().endswith(f"by {getpass.getuser()}")
    assert first.startswith(f"alert {ids[0]} acknowledged ")

    unacknowledged = ok_json(env, "alerts", "list", "--unacknowledged")
    assert [a["id"] for a in unacknowledged] == [ids[2]]
    row = ok(env, "alerts", "list").splitlines()[1]
    assert "by frank" in row
    assert ok(env, "alerts", "list", "--unacknowledged", "--month", "2026-04").strip() == (
        "no alerts"
    )


@pytest.mark.parametrize("args", [(), ("--json",)], ids=["text", "json"])
def test_no_alerts_is_not_an_error(env: Env, args: tuple[str, ...]) -> None:
    out = ok(env, "alerts", "list", *args)
    assert out.strip() == ("[]" if args else "no alerts")


def test_two_overrides_of_an_account_at_once_both_succeed_and_the_later_commit_stays(
    env: Env,
) -> None:
    """Two staff override an account that has none at the same moment: the second waits for
    the first's row, then replaces it (no unique violation, no 500)."""
    t = tenant("platform")
    engine = get_engine()
    first = Session(engine)
    staff.set_override(first, t.account_id, reason="launch", by="ann")  # not committed yet
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            with Session(engine) as session:
                outcome["change"] = staff.set_override(
                    session, t.account_id, reason="partner", by="bob"
                )
                session.commit()
        except Exception as exc:  # the test reports it
            outcome["error"] = exc

    thread = threading.Thread(target=second)
    thread.start()
    # The second writer is waiting for the first's uncommitted override row.
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while not conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar():
            assert time.monotonic() < deadline, "the second override never waited for the first"
            assert thread.is_alive(), outcome
            time.sleep(0.02)
            conn.rollback()
    first.commit()
    first.close()
    thread.join(10)
    assert "error" not in outcome, outcome["error"]
    assert outcome["change"].result.reason == "partner"
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT reason, created_by FROM account_overrides WHERE account_id = :a"),
            {"a": t.account_id},
        ).all()
    assert [tuple(r) for r in stored] == [("partner", "bob")]
