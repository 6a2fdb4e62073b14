"""The ``metering`` command."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import redis
import typer
from pydantic import BaseModel
from pydantic import ValidationError as SettingsError

from metering.core.errors import MeteringError, NotFoundError
from metering.core.ids import is_id

T = TypeVar("T")

app = typer.Typer(
    name="metering",
    help="Usage metering and billing-limit enforcement for a realtime messaging platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts.", no_args_is_help=True)
apps_app = typer.Typer(help="Apps (each belongs to one account).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (each belongs to one app).", no_args_is_help=True)
packages_app = typer.Typer(help="Packages (quotas and hard limits).", no_args_is_help=True)
alerts_app = typer.Typer(help="Limit alerts sent to staff.", no_args_is_help=True)
billing_app = typer.Typer(help="Monthly invoices: close, preview, export.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(accounts_app, name="accounts")
app.add_typer(apps_app, name="apps")
app.add_typer(keys_app, name="keys")
app.add_typer(packages_app, name="packages")
app.add_typer(alerts_app, name="alerts")
app.add_typer(billing_app, name="billing")


@app.callback()
def _root() -> None:
    # Every command needs valid settings: check them first, so a bad variable is one clear
    # line whichever command meets it.
    settings = _settings()
    # Logs go to stderr, never into what a command prints; a one-shot command logs only what
    # needs attention (the long-running ones set the configured level again).
    from metering.core.logging import configure  # noqa: PLC0415

    configure("WARNING", json=settings.log_json)


JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
ByOption = Annotated[
    str | None,
    typer.Option("--by", help="Who makes the change, as recorded (default: your OS user)."),
]


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Any:
    from metering.core.settings import get_settings  # noqa: PLC0415

    try:
        return get_settings()
    except SettingsError as exc:
        first = exc.errors()[0]
        if first["loc"]:
            field = "METERING_" + "_".join(str(p) for p in first["loc"]).upper()
            fail(f"invalid setting {field}: {first['msg']}")
        fail(f"invalid settings: {first['msg']}")
    raise AssertionError  # unreachable: fail() raises


def _guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; expected failures become one clear line, never a stack trace."""
    from sqlalchemy.exc import OperationalError, ProgrammingError  # noqa: PLC0415

    try:
        return fn()
    except MeteringError as exc:
        fail(exc.message)
    except OperationalError as exc:
        fail(f"database unavailable or not migrated ({exc.orig}); run `metering db upgrade`")
    except ProgrammingError as exc:
        # Postgres reports a missing table (undefined_table, 42P01) as a programming error.
        if getattr(exc.orig, "sqlstate", None) != "42P01":
            raise
        fail(f"database not migrated ({exc.orig}); run `metering db upgrade`")
    raise AssertionError


def _emit(obj: BaseModel, as_json: bool, text: str) -> None:
    if as_json:
        typer.echo(obj.model_dump_json(by_alias=True))
    else:
        typer.echo(text)


def _publish_registry(owners: dict[int, int]) -> None:
    """Mirror new apps to Redis now; the periodic sync does it anyway within its interval."""
    from metering.accounts.store import RegistryStore  # noqa: PLC0415
    from metering.core import redis as redis_clients  # noqa: PLC0415

    settings = _settings()
    if settings.embedded:
        return  # the running engine's in-process sync picks it up from the database
    try:
        RegistryStore(redis_clients.primary(), settings.redis_prefix).publish(owners)
    except redis.RedisError as exc:
        typer.echo(
            f"warning: Redis unavailable ({exc}); the registry sync will publish the app "
            f"within {settings.registry_refresh_interval.total_seconds():.0f} s",
            err=True,
        )


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the migrations up to REVISION (default: the latest)."""
    from metering.core.migrate import upgrade  # noqa: PLC0415

    url = _settings().database_url
    typer.echo(f"==> migrating {_redact(url)} to {revision}", err=True)
    try:
        upgrade(url, revision)
    except Exception as exc:
        fail(f"migration failed: {exc}")
    typer.echo("database is up to date", err=True)


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    return make_url(url).render_as_string(hide_password=True)


@accounts_app.command("create")
def accounts_create(name: str, as_json: JsonOption = False) -> None:
    """Create an account."""
    from metering.accounts import service  # noqa: PLC0415
    from metering.core.database import unit_of_work  # noqa: PLC0415

    def run() -> Any:
        with unit_of_work() as session:
            return service.create_account(session, name)

    account = _guard(run)
    _emit(account, as_json, f"account {account.id} created: {account.name}")


@apps_app.command("create")
def apps_create(
    name: str,
    account: Annotated[int, typer.Option("--account", help="The account that owns the app.")],
    as_json: JsonOption = False,
) -> None:
    """Create an app under an account."""
    from metering.accounts import service  # noqa: PLC0415
    from metering.core.database import unit_of_work  # noqa: PLC0415

    def run() -> Any:
        with unit_of_work() as session:
            return service.create_app(session, account, name)

    created = _guard(run)
    _publish_registry({created.id: created.account_id})
    _emit(
        created,
        as_json,
        f"app {created.id} created in account {created.account_id}: {created.name}",
    )


@keys_app.command("create")
def keys_create(
    app_id: Annotated[int, typer.Option("--app", help="The app the key belongs to.")],
    permission: Annotated[
        list[str],
        typer.Option(
            "--permission", "-p", help="platform, stats, admission, billing or staff (repeatable)."
        ),
    ],
    label: Annotated[str | None, typer.Option(help="A note to tell keys apart.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key. It is printed once: only its digest is stored."""
    from metering.accounts import service  # noqa: PLC0415
    from metering.core.database import unit_of_work  # noqa: PLC0415

    def run() -> Any:
        with unit_of_work() as session:
            return service.create_key(session, app_id, permission, label)

    key = _guard(run)
    _emit(
        key,
        as_json,
        f"key {key.id} for app {key.app_id} ({', '.join(key.permissions)}):\n{key.key}\n"
        "Store it now: it cannot be shown again.",
    )


def _by(by: str | None) -> str:
    """Who makes a change: ``--by``, else the OS user."""
    import getpass  # noqa: PLC0415

    if by is None:
        try:
            by = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a bare container)
            raise MeteringError("cannot tell who you are: give --by NAME") from None
    by = by.strip()
    if not by or len(by) > 200:
        raise MeteringError("--by must be 1 to 200 characters")
    return by


def _publish_admission(rows: Mapping[int, Any]) -> None:
    """Mirror a committed change's admission rows to Redis: gateways apply them at once."""
    from metering.core import redis as redis_clients  # noqa: PLC0415
    from metering.limits.store import AdmissionStore  # noqa: PLC0415

    settings = _settings()
    if settings.embedded or not rows:
        return  # the running engine's periodic admission sync picks it up from the database
    try:
        AdmissionStore(redis_clients.primary(), settings.redis_prefix).write(rows)
    except redis.RedisError as exc:
        typer.echo(
            f"warning: Redis unavailable ({exc}); the admission sync will mirror the change "
            f"within {settings.registry_refresh_interval.total_seconds():.0f} s",
            err=True,
        )


def _account_id(account_id: int) -> int:
    if not is_id(account_id):
        raise NotFoundError(f"account {account_id} does not exist", code="ACCOUNT_NOT_FOUND")
    return account_id


def _emit_list(items: list[Any], as_json: bool, text: str) -> None:
    if as_json:
        typer.echo(json.dumps([i.model_dump(mode="json", by_alias=True) for i in items]))
    else:
        typer.echo(text)


def _table(headings: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headings)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headings, *rows)
    )


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


# -- packages ------------------------------------------------------------------------------


@packages_app.command("create")
def packages_create(
    name: str,
    limit: Annotated[
        list[str],
        typer.Option(
            "--limit",
            help="METRIC=QUOTA[:HARD], metric one of connections, channels, messages, data; "
            "HARD defaults to 2.5 x QUOTA, rounded up (repeatable).",
        ),
    ],
    notify_only: Annotated[
        bool,
        typer.Option("--notify-only", help="At the hard limit, only notify staff: never reject."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Create a package with a quota and a hard limit per metric."""
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    def run() -> Any:
        # Every limit is checked before the database is touched.
        limits: dict[str, tuple[int, int | None]] = {}
        for text in limit:
            metric, quota, hard = staff.parse_limit(text)
            if metric in limits:
                raise MeteringError(f"{metric}: given twice")
            limits[metric] = (quota, hard)
        with unit_of_work() as session:
            return staff.create_package(session, name, limits, enforce_hard=not notify_only)

    package = _guard(run)
    lines = [f"package {package.id} created: {package.name}"]
    lines += [
        f"  {metric:<12} quota {lim.quota}, hard limit {lim.hard_limit}"
        for metric, lim in package.limits.items()
    ]
    lines.append(f"  at the hard limit: {_hard_action(package.enforce_hard)}")
    _emit(package, as_json, "\n".join(lines))


def _hard_action(enforce_hard: bool) -> str:
    return "reject and notify staff" if enforce_hard else "notify staff only"


@packages_app.command("list")
def packages_list(as_json: JsonOption = False) -> None:
    """Every package and its limits (quota / hard limit per metric)."""
    from metering.accounts.models import METRICS  # noqa: PLC0415
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    def run() -> list[Any]:
        with unit_of_work() as session:
            return staff.list_packages(session)

    packages = _guard(run)
    if not packages:
        text = "no packages"
    else:
        rows = [
            [
                str(p.id),
                p.name,
                "reject" if p.enforce_hard else "notify",
                *(
                    f"{p.limits[m].quota} / {p.limits[m].hard_limit}" if m in p.limits else "-"
                    for m in METRICS
                ),
                _when(p.created_at),
            ]
            for p in packages
        ]
        headings = ["id", "name", "at hard", *METRICS, "created"]
        text = _table(headings, rows) + "\n(per metric: quota / hard limit)"
    _emit_list(packages, as_json, text)


# -- an account's package, override and admission ------------------------------------------


@accounts_app.command("set-package")
def accounts_set_package(
    account_id: int,
    package: Annotated[str, typer.Argument(help="A package's name or id; `none`: no package.")],
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Put an account on a package (or on none); what gateways enforce changes at once."""
    from sqlalchemy.exc import DataError  # noqa: PLC0415

    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    ref = None if package.strip().lower() == "none" else package

    def run() -> Any:
        who = _by(by)
        _account_id(account_id)
        try:
            with unit_of_work() as session:
                return staff.set_package(session, account_id, ref, by=who)
        except DataError:
            # find_package tries an all-digit reference as an id: one past the id column's
            # range is no package either.
            raise NotFoundError(f"no package {package!r}", code="PACKAGE_NOT_FOUND") from None

    change = _guard(run)
    _publish_admission(change.admission)
    out = change.result
    on = "no package" if out.package is None else f"package {out.package} (id {out.package_id})"
    _emit(out, as_json, f"account {account_id} is on {on} now")


@accounts_app.command("override")
def accounts_override(
    account_id: int,
    reason: Annotated[str, typer.Option(help="Why (recorded; shown to staff).")],
    until: Annotated[
        str | None,
        typer.Option(help="ISO 8601 with a time zone (2026-12-01T00:00Z); default: until cleared."),
    ] = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Lift every rejection of an account (alerts still go to staff)."""
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    def run() -> Any:
        who = _by(by)
        end = None
        if until is not None:
            try:
                end = datetime.fromisoformat(until.strip())
            except ValueError:
                raise MeteringError(
                    f"--until must be an ISO 8601 time with a time zone "
                    f"(e.g. 2026-12-01T00:00:00Z), got {until!r}"
                ) from None
        _account_id(account_id)
        with unit_of_work() as session:
            return staff.set_override(session, account_id, reason=reason, by=who, until=end)

    change = _guard(run)
    _publish_admission(change.admission)
    out = change.result
    held = "until cleared" if out.until is None else f"until {_when(out.until)}"
    _emit(
        out,
        as_json,
        f"account {account_id}: nothing is rejected {held} (by {out.created_by}: {out.reason})",
    )


@accounts_app.command("clear-override")
def accounts_clear_override(account_id: int) -> None:
    """Remove an account's override: its package's limits apply again at once."""
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    def run() -> Any:
        _account_id(account_id)
        with unit_of_work() as session:
            return staff.clear_override(session, account_id)

    change = _guard(run)
    _publish_admission(change.admission)
    typer.echo(f"account {account_id}: override removed")


@accounts_app.command("admission")
def accounts_admission(account_id: int, as_json: JsonOption = False) -> None:
    """What gateways enforce for an account now."""
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    def run() -> Any:
        _account_id(account_id)
        with unit_of_work() as session:
            return staff.admission(session, account_id)

    out = _guard(run)
    _emit(out, as_json, _admission_text(out))


def _admission_text(out: Any) -> str:
    if out.override is not None:
        o = out.override
        held = "until cleared" if o.until is None else f"until {_when(o.until)}"
        override = f"nothing rejected {held} (by {o.created_by}: {o.reason})"
    else:
        override = "none"
    lines = [
        (
            "connections",
            "not limited"
            if out.connections_hard is None
            else f"new ones refused at {out.connections_hard} live",
        ),
        (
            "channels",
            "not limited"
            if out.channels_hard is None
            else f"new ones refused at {out.channels_hard} active",
        ),
        (
            "publishing",
            "allowed"
            if out.publish_blocked_month is None
            else f"refused in {out.publish_blocked_month} "
            f"(monthly {out.publish_blocked_by} hard limit passed)",
        ),
        ("override", override),
    ]
    return "\n".join([f"account {out.account_id}"] + [f"  {k:<12} {v}" for k, v in lines])


# -- alerts --------------------------------------------------------------------------------


@alerts_app.command("list")
def alerts_list(
    account: Annotated[int | None, typer.Option(help="Only this account's alerts.")] = None,
    month: Annotated[str | None, typer.Option(help="Only this UTC month (YYYY-MM).")] = None,
    unacknowledged: Annotated[
        bool, typer.Option("--unacknowledged", help="Only alerts no one acknowledged yet.")
    ] = False,
    limit: Annotated[int, typer.Option(help="At most this many (1 to 1000).")] = 100,
    as_json: JsonOption = False,
) -> None:
    """Limit alerts, newest first, with each channel's delivery status."""
    from metering.accounts.repository import AccountRepository  # noqa: PLC0415
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    def run() -> list[Any]:
        with unit_of_work() as session:
            if (
                account is not None
                and AccountRepository(session).account(_account_id(account)) is None
            ):
                raise NotFoundError(f"account {account} does not exist", code="ACCOUNT_NOT_FOUND")
            return staff.list_alerts(
                session,
                account_id=account,
                month=month,
                unacknowledged=unacknowledged,
                limit=limit,
            )

    alerts = _guard(run)
    if not alerts:
        text = "no alerts"
    else:
        rows = [
            [
                str(a.id),
                str(a.account_id),
                a.month,
                a.metric,
                a.level,
                f"{a.usage} / {a.threshold}",
                _when(a.detected_at),
                "-"
                if a.acknowledged_at is None
                else f"{_when(a.acknowledged_at)} by {a.acknowledged_by}",
                " ".join(f"{c}:{s}" for c, s in sorted(a.deliveries.items())) or "-",
            ]
            for a in alerts
        ]
        headings = [
            "id", "account", "month", "metric", "level", "usage / threshold", "detected",
            "acknowledged", "deliveries",
        ]  # fmt: skip
        text = _table(headings, rows)
    _emit_list(alerts, as_json, text)


@alerts_app.command("ack")
def alerts_ack(alert_id: int, by: ByOption = None, as_json: JsonOption = False) -> None:
    """Acknowledge an alert (one acknowledged already keeps its first acknowledgement)."""
    from metering.core.database import unit_of_work  # noqa: PLC0415
    from metering.limits import staff  # noqa: PLC0415

    now = datetime.now(UTC)

    def run() -> Any:
        who = _by(by)
        if not is_id(alert_id):
            raise NotFoundError(f"alert {alert_id} does not exist", code="ALERT_NOT_FOUND")
        with unit_of_work() as session:
            return staff.acknowledge(session, alert_id, by=who, now=now)

    alert = _guard(run)
    when = f"{_when(alert.acknowledged_at)} by {alert.acknowledged_by}"
    fresh = alert.acknowledged_at == now
    _emit(
        alert,
        as_json,
        f"alert {alert.id} acknowledged {when}"
        if fresh
        else f"alert {alert.id} was acknowledged already, {when}",
    )


@app.command("api")
def api(
    host: Annotated[str | None, typer.Option(help="Default: METERING_API_HOST.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: METERING_API_PORT.")] = None,
) -> None:
    """Serve the HTTP API."""
    import uvicorn  # noqa: PLC0415

    from metering.api.app import create_app  # noqa: PLC0415
    from metering.core.logging import configure  # noqa: PLC0415

    settings = _settings()
    if settings.embedded:
        fail(
            "a standalone API needs the Redis its gateways and workers use: set "
            "METERING_REDIS_URL (or use `metering run`, which embeds everything)"
        )
    configure(settings.log_level, json=settings.log_json)
    host, port = host or settings.api_host, port or settings.api_port
    typer.echo(f"API listening on http://{host}:{port} (OpenAPI: /openapi.json)")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")


@app.command("gateway")
def gateway(
    port: Annotated[int | None, typer.Option(help="Default: METERING_GATEWAY_PORT.")] = None,
    frontend_id: Annotated[
        str | None, typer.Option(help="This frontend's id (default: METERING_GATEWAY_FRONTEND_ID).")
    ] = None,
    datacenter: Annotated[
        str | None, typer.Option(help="Its datacenter (default: METERING_DATACENTER).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Default: METERING_GATEWAY_HOST.")] = None,
) -> None:
    """Run the example realtime gateway (WebSocket, server-sent events, REST publish)."""
    from metering.core.logging import configure  # noqa: PLC0415
    from metering.gateway.server import run_gateway  # noqa: PLC0415

    settings = _settings()
    if settings.embedded:
        fail(
            "a standalone gateway needs a real Redis shared with the engine: set "
            "METERING_REDIS_URL (or use `metering run`, which embeds one)"
        )
    datacenter = datacenter or settings.datacenter
    try:
        settings.datacenter_url(datacenter)
    except ValueError as exc:
        fail(str(exc))
    configure(settings.log_level, json=settings.log_json)
    run_gateway(
        settings,
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        frontend_id=frontend_id or settings.gateway_frontend_id,
        datacenter=datacenter,
    )


@app.command("run")
def run(
    api_port: Annotated[int | None, typer.Option(help="Default: METERING_API_PORT.")] = None,
    gateway_port: Annotated[
        int | None, typer.Option(help="Default: METERING_GATEWAY_PORT.")
    ] = None,
) -> None:
    """Run everything in one process: migrations, API, example gateway and the beat schedule."""
    from metering.runner import run_embedded  # noqa: PLC0415

    settings = _settings()
    run_embedded(
        settings,
        api_port=api_port or settings.api_port,
        gateway_port=gateway_port or settings.gateway_port,
    )


@app.command("simulate")
def simulate(
    app_id: Annotated[int, typer.Option("--app", help="The app the clients connect to.")],
    gateway_url: Annotated[
        str, typer.Option("--gateway", help="The gateway's base URL (ws:// or wss://).")
    ] = "ws://127.0.0.1:8001",
    connections: Annotated[int, typer.Option(help="Clients open at once, 1 to 10000.")] = 20,
    duration: Annotated[float, typer.Option(help="Seconds, at least 0.5.")] = 30.0,
    churn: Annotated[
        float, typer.Option(help="Share of clients replaced each second, 0 to 1.")
    ] = 0.1,
    channels: Annotated[int, typer.Option(help="Channels the clients spread over.")] = 5,
    publish_rate: Annotated[
        float, typer.Option(help="Messages per second, over all clients.")
    ] = 5.0,
) -> None:
    """Drive a gateway with real WebSocket clients: connect, attach, publish, churn.

    Progress goes to stderr each second, the summary to stdout as JSON. Connections refused
    and requests rejected by the account's limits are counted, not errors; anything that
    stops the run early is one line on stderr and a non-zero exit (after Ctrl-C, with the
    summary so far on stdout)."""
    # The range checks are the simulator's own, so that a bad value is one line like any
    # other error, not a usage box.
    from metering.simulate import Interrupted, SimulationError  # noqa: PLC0415
    from metering.simulate import simulate as run_simulation  # noqa: PLC0415

    try:
        summary = run_simulation(
            gateway_url=gateway_url,
            app_id=app_id,
            connections=connections,
            duration=duration,
            churn=churn,
            channels=channels,
            publish_rate=publish_rate,
            progress=lambda line: typer.echo(line, err=True),
        )
    except Interrupted as exc:
        typer.echo(json.dumps(exc.summary))
        typer.echo(exc.message, err=True)  # asked for: not an error
        raise typer.Exit(exc.exit_code) from None
    except SimulationError as exc:
        fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:  # a Ctrl-C before the run took it, or while it shut down
        typer.echo("interrupted (Ctrl-C)", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # a failure no one foresaw: still one line, with its kind
        fail(f"the simulation failed: {type(exc).__name__}: {exc}")
    typer.echo(json.dumps(summary))


_MILLIS = re.compile(r"-?[0-9]+")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TIME_HELP = "ISO 8601 UTC (2026-03-31T23:57) or milliseconds since the epoch"
# Column groups of the stats table: (group, [(heading, entry field)]).
_STATS_COLUMNS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "connections",
        (
            ("peak", "connections.all.peak"),
            ("peak at", "connections.all.peakAt"),
            ("min", "connections.all.min"),
            ("mean", "connections.all.mean"),
            ("opened", "connections.all.opened"),
            ("refused", "connections.all.refused"),
            ("ws peak", "connections.websocket.peak"),
        ),
    ),
    (
        "channels",
        (
            ("peak", "channels.peak"),
            ("min", "channels.min"),
            ("mean", "channels.mean"),
            ("refused", "channels.refused"),
        ),
    ),
    (
        "published",
        (("msgs", "messages.published.count"), ("bytes", "messages.published.data")),
    ),
    (
        "delivered",
        (("msgs", "messages.delivered.count"), ("bytes", "messages.delivered.data")),
    ),
    ("refused", (("msgs", "messages.refused"),)),
)


@app.command("stats")
def stats(
    app_id: Annotated[
        int | None, typer.Option("--app", help="An app's stats (or give --account).")
    ] = None,
    account_id: Annotated[
        int | None, typer.Option("--account", help="An account's stats (the sum of its apps).")
    ] = None,
    unit: Annotated[str, typer.Option(help="minute, hour, day or month (UTC).")] = "minute",
    start: Annotated[
        str | None, typer.Option(help=f"The first period to show: {_TIME_HELP}.")
    ] = None,
    end: Annotated[
        str | None, typer.Option(help=f"Show periods that start before this: {_TIME_HELP}.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many periods (1 to 1000).")] = 100,
    direction: Annotated[
        str, typer.Option(help="backwards (newest first) or forwards (oldest first).")
    ] = "backwards",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the periods as a JSON array.")
    ] = False,
) -> None:
    """Usage of an app or an account, period by period: connections, channels, messages."""
    from sqlalchemy.orm import Session  # noqa: PLC0415

    from metering.accounts.repository import AccountRepository  # noqa: PLC0415
    from metering.core.database import get_engine  # noqa: PLC0415
    from metering.rollups import query as rollups  # noqa: PLC0415
    from metering.rollups.fold import ACCOUNT, APP  # noqa: PLC0415

    if (app_id is None) == (account_id is None):
        fail("give exactly one of --app ID or --account ID")
    scope, entity = ("app", app_id) if app_id is not None else ("account", account_id)
    assert entity is not None

    def run() -> list[dict[str, Any]]:
        # Check every option before touching the database: a typo is named, not a query run.
        first, until = rollups.parse_range(
            _millis("--start", start), _millis("--end", end), ("--start", "--end"),
            (str(start), str(end)),
        )  # fmt: skip
        query = rollups.Query(
            APP if scope == "app" else ACCOUNT,
            entity,
            rollups.parse_unit(unit),
            first,
            until,
            limit=limit,
            backwards=rollups.parse_direction(direction),
        )
        with get_engine().connect() as conn, Session(bind=conn) as session:
            repo = AccountRepository(session)
            found = repo.app(entity) if scope == "app" else repo.account(entity)
            if found is None:
                raise NotFoundError(f"{scope} {entity} does not exist")
            return rollups.periods(conn, query)

    entries = [{**e, f"{scope}Id": entity} for e in _guard(run)]
    if as_json:
        typer.echo(json.dumps(entries))
    elif not entries:
        window = "".join(
            f" {word} {_utc_text(value)}"
            for word, value in (("from", start), ("before", end))
            if value is not None
        )
        typer.echo(f"no usage recorded for {scope} {entity} (per {unit}{window})")
    else:
        typer.echo(_stats_table(entries, month=unit == "month"))


def _millis(option: str, value: str | None) -> int | None:
    """An option's time as milliseconds since the epoch (UTC); ``parse_range`` makes whole
    seconds of it as the API does (a start rounds down, an exclusive end up)."""
    if value is None:
        return None
    text = value.strip()
    if _MILLIS.fullmatch(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MeteringError(
            f"{option} must be an ISO 8601 UTC time (e.g. 2026-03-31T23:57) or milliseconds "
            f"since the epoch, got {value!r}"
        ) from None
    # A time without an offset is UTC, like every time this engine shows.
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment < _EPOCH:
        raise MeteringError(f"{option} must be after 1970-01-01, got {value!r}")
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _utc_text(value: str) -> str:
    """An option's time as the user gave it, ms shown as a UTC time."""
    text = value.strip()
    if _MILLIS.fullmatch(text):
        return datetime.fromtimestamp(int(text) // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return text


def _stats_table(entries: list[dict[str, Any]], *, month: bool) -> str:
    """Aligned columns under group headings; ``*`` marks a period still in progress."""
    # Within a month the peak's day matters; within a shorter period the interval names it.
    peak_at_format = "%m-%d %H:%M:%S" if month else "%H:%M:%S"

    def cell(field: str, entry: dict[str, Any]) -> str:
        value = entry[field]
        if field.endswith("peakAt"):
            return datetime.fromtimestamp(value / 1000, UTC).strftime(peak_at_format)
        if field.endswith("mean"):
            return f"{value:.2f}"
        return str(value)

    # (group heading over this column, column heading, cells, left-aligned)
    columns: list[tuple[str, str, list[str], bool]] = [
        ("", "interval", [e["intervalId"] for e in entries], True),
        ("", "", ["*" if e.get("inProgress") else "" for e in entries], True),
    ]
    for group, fields in _STATS_COLUMNS:
        for i, (heading, field) in enumerate(fields):
            cells = [cell(field, e) for e in entries]
            columns.append((group if i == 0 else "", heading, cells, False))
    widths = [max(len(heading), *map(len, cells)) for _, heading, cells, _ in columns]
    sep = "  "

    def line(parts: list[str]) -> str:
        return sep.join(
            text.ljust(width) if left else text.rjust(width)
            for text, width, (_, _, _, left) in zip(parts, widths, columns, strict=True)
        ).rstrip()

    groups, offset = "", 0
    for (group, _, _, _), width in zip(columns, widths, strict=True):
        if group:  # over its first column, running on over the rest of its group
            groups = groups.ljust(max(offset, len(groups) + 1 if groups else 0)) + group
        offset += width + len(sep)
    out = [groups, line([heading for _, heading, _, _ in columns])]
    out.extend(line([cells[r] for _, _, cells, _ in columns]) for r in range(len(entries)))
    if any(e.get("inProgress") for e in entries):
        out.append("* in progress: the figures so far")
    return "\n".join(out)


# -- billing -------------------------------------------------------------------------------
# ``billing`` imports ``metering``; this composition root is one of the places wiring both.


@packages_app.command("set-prices")
def packages_set_prices(
    package: Annotated[str, typer.Argument(help="A package's name or id.")],
    currency: Annotated[str, typer.Option("--currency", help="ISO 4217 code, e.g. USD.")],
    base_fee: Annotated[
        str, typer.Option("--base-fee", help="The monthly fee, e.g. 49.00 (in the currency).")
    ],
    price: Annotated[
        list[str] | None,
        typer.Option(
            "--price",
            help="METRIC=INCLUDED:UNIT_PRICE[:UNIT_SIZE] (repeatable; metrics: connections, "
            "channels, messages, data), e.g. messages=1000000:0.40:1000 (0.40 per 1 000 "
            "messages over the first million). A metric without a price is in the base fee.",
        ),
    ] = None,
    by: ByOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give a package its prices (replacing any it had; invoices issued keep theirs)."""
    from billing import service  # noqa: PLC0415
    from metering.core.database import get_engine  # noqa: PLC0415

    def run() -> Any:
        prices = dict(service.parse_price(p) for p in price or [])
        if len(prices) != len(price or []):
            raise MeteringError("each metric may be priced once")
        with get_engine().begin() as conn:
            return service.set_prices(
                conn, package, currency=currency, base_fee=base_fee, prices=prices, by=_by(by)
            )

    pricing = _guard(run)
    view = service.pricing_view(pricing)
    if as_json:
        typer.echo(json.dumps(view))
        return
    lines = [f"package {pricing.package_name}: {view['baseFee']} {view['currency']} a month"]
    for metric, p in view["prices"].items():
        lines.append(
            f"  {metric:<12} {p['included']} included, then {p['unitPrice']} per {p['unitSize']}"
        )
    typer.echo("\n".join(lines))


MonthOption = Annotated[str, typer.Option("--month", help="The month, YYYY-MM (UTC).")]


@billing_app.command("close")
def billing_close(month: MonthOption, by: ByOption = None, as_json: JsonOption = False) -> None:
    """Close a month: one final invoice per account on a package. Closing it again changes
    nothing and prints the same summary."""
    from billing import jobs  # noqa: PLC0415
    from metering.core.database import get_engine  # noqa: PLC0415

    bars: list[Any] = []
    lines = [0]  # not a terminal (a log, a cron job): a line per tenth done instead of a bar

    def progress(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            tenth = done * 10 // total
            if tenth > lines[0] or done == total:
                lines[0] = tenth
                typer.echo(f"pricing {month}: {done}/{total} accounts ({tenth * 10}%)", err=True)
        else:
            if not bars:
                bar = typer.progressbar(length=total, label=f"pricing {month}", file=sys.stderr)
                bars.append([bar.__enter__(), 0])
            bar, shown = bars[0]
            bar.update(done - shown)
            bars[0][1] = done
            if done == total:
                bar.render_finish()
        if done == total:
            typer.echo(f"writing {total} invoices", err=True)

    who = _guard(lambda: _by(by))
    typer.echo(f"==> closing {month}", err=True)
    result = _guard(lambda: jobs.close_month(get_engine(), month, by=who, progress=progress))
    out = {
        "month": result.month, "closedNow": result.closed_now, "invoices": result.invoices,
        "unbilledAccounts": result.unbilled, "totals": result.totals,
        "closedAt": None if result.closed_at is None else result.closed_at.isoformat(),
    }  # fmt: skip
    if as_json:
        typer.echo(json.dumps(out))
        return
    how = "closed" if result.closed_now else "was closed already (nothing changed)"
    totals = ", ".join(f"{v} {c}" for c, v in result.totals.items()) or "nothing"
    text = f"{month} {how}: {result.invoices} invoice(s), {totals}"
    if result.unbilled:
        text += f"; {result.unbilled} account(s) on no package, not billed"
    typer.echo(text)


@billing_app.command("preview")
def billing_preview(
    account: Annotated[int, typer.Option("--account", help="The account's id.")],
    as_json: JsonOption = False,
) -> None:
    """A draft of the account's invoice for the current month, as it stands now."""
    from billing import jobs  # noqa: PLC0415
    from metering.core.database import get_engine  # noqa: PLC0415

    draft = _guard(lambda: jobs.preview(get_engine(), account))
    typer.echo(json.dumps(draft) if as_json else _invoice_text(draft))


def _invoice_text(inv: dict[str, Any]) -> str:
    cur = inv["currency"]
    head = (
        f"{'DRAFT ' if inv['status'] == 'draft' else ''}invoice "
        f"{inv['id'] if inv['id'] is not None else ''}".rstrip()
        + f" - account {inv['accountId']}, {inv['month']}, package {inv['package']}"
    )
    rows = []
    for ln in inv["lines"]:
        peak = ""
        if ln.get("peakAt"):
            peak = ln["peakAt"] + ("" if ln["peakResolution"] == "second" else " (hour)")
            if ln.get("topAppId") is not None:
                peak += f", top app {ln['topAppId']} ({ln['topAppPeak']})"
        rows.append(
            [
                ln["metric"], _opt(ln["usage"]), _opt(ln["included"]), _opt(ln["overage"]),
                ln["unitPrice"] + ("" if ln["unitSize"] in {None, 1} else f"/{ln['unitSize']}"),
                ln["amount"], peak,
            ]
        )  # fmt: skip
    table = _table(["line", "usage", "included", "overage", "unit price", "amount", "peak"], rows)
    out = [head, table, f"total {inv['total']} {cur}"]
    for c in inv["packageChanges"]:
        out.append(f"package changed {c['at']}: {c['from'] or 'none'} -> {c['to'] or 'none'}")
    if inv["status"] == "draft":
        out.append(f"(as of {inv['asOf']}; the month is not over)")
    return "\n".join(out)


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


@billing_app.command("export")
def billing_export(
    month: MonthOption,
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (default: stdout).")
    ] = None,
) -> None:
    """A closed month's invoices for finance: CSV (one row per invoice line) or JSON."""
    from billing import export, jobs  # noqa: PLC0415
    from metering.core.database import get_engine  # noqa: PLC0415

    if fmt not in export.FORMATS:
        fail(f"--format must be csv or json, got {fmt!r}")
    invoices = _guard(lambda: jobs.invoices(get_engine(), month))
    text = export.to_csv(invoices) if fmt == "csv" else export.to_json(invoices)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    output.write_text(text, encoding="utf-8", newline="")
    lines = sum(len(i["lines"]) for i in invoices)
    typer.echo(f"{len(invoices)} invoice(s), {lines} line(s) written to {output}", err=True)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
