"""The ``metering`` command."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import redis
import typer
from pydantic import BaseModel
from pydantic import ValidationError as SettingsError

from metering.core.errors import MeteringError

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
    from sqlalchemy.exc import OperationalError  # noqa: PLC0415

    try:
        return fn()
    except MeteringError as exc:
        fail(exc.message)
    except OperationalError as exc:
        fail(f"database unavailable or not migrated ({exc.orig}); run `metering db upgrade`")
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
