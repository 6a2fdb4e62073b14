"""The ``metering`` command."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import redis
import typer
from pydantic import BaseModel
from pydantic import ValidationError as SettingsError

from metering.core.errors import MeteringError, NotFoundError

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
app.add_typer(db_app, name="db")
app.add_typer(accounts_app, name="accounts")
app.add_typer(apps_app, name="apps")
app.add_typer(keys_app, name="keys")


@app.callback()
def _root() -> None:
    # Every command needs valid settings: check them first, so a bad variable is one clear
    # line whichever command meets it.
    _settings()


JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


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
            "--permission", "-p", help="platform, stats, admission or billing (repeatable)."
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
        str, typer.Option("--gateway", help="The gateway's base URL.")
    ] = "ws://127.0.0.1:8001",
    connections: Annotated[int, typer.Option(min=1, max=10_000)] = 20,
    duration: Annotated[float, typer.Option(min=0.5, help="Seconds.")] = 30.0,
    churn: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of clients replaced each second.")
    ] = 0.1,
    channels: Annotated[int, typer.Option(min=1, help="Channels the clients spread over.")] = 5,
    publish_rate: Annotated[
        float, typer.Option(min=0.0, help="Messages per second, over all clients.")
    ] = 5.0,
) -> None:
    """Drive a gateway with real WebSocket clients: connect, attach, publish, churn."""
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
    except (OSError, ValueError) as exc:
        fail(f"cannot drive {gateway_url}: {exc}")
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
        (("peak", "channels.peak"), ("min", "channels.min"), ("mean", "channels.mean")),
    ),
    (
        "published",
        (("msgs", "messages.published.count"), ("bytes", "messages.published.data")),
    ),
    (
        "delivered",
        (("msgs", "messages.delivered.count"), ("bytes", "messages.delivered.data")),
    ),
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
        first, until = _moment("--start", start), _moment("--end", end, end=True)
        if first is not None and until is not None and first >= until:
            raise MeteringError(f"--start ({start}) must be before --end ({end})")
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


def _moment(option: str, value: str | None, *, end: bool = False) -> int | None:
    """An option's time as whole seconds since the epoch (UTC).

    Periods start on whole seconds: a start rounds down, and an (exclusive) end rounds up, so
    that a period starting any time before the end is in the range.
    """
    if value is None:
        return None
    text = value.strip()
    if _MILLIS.fullmatch(text):
        return _seconds(option, int(text), end=end)
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
    return _seconds(option, (moment - _EPOCH) // timedelta(milliseconds=1), end=end)


def _seconds(option: str, millis: int, *, end: bool) -> int:
    from metering.rollups.query import parse_millis  # noqa: PLC0415

    seconds = parse_millis(option, millis, round_up=end)  # the API's range and rounding
    assert seconds is not None
    return seconds


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
