"""``GET /v1/stats``: an app's or its account's rollups, period by period."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from metering.accounts.repository import AccountRepository
from metering.api.auth import API_KEY_PARAMETER, authorize
from metering.api.envelope import ok, only_parameters
from metering.core.database import get_engine
from metering.core.errors import PermissionDeniedError, ValidationError
from metering.rollups import query as rollups
from metering.rollups.fold import SCOPES

router = APIRouter(tags=["stats"])
_PARAMETERS = frozenset({"unit", "start", "end", "limit", "direction", "scope", "app"})


@router.get(
    "/v1/stats",
    summary="Usage statistics",
    description=(
        "Rollups of the key's app (or, with `scope=account`, of its account) per minute, hour, "
        "day or month (UTC): connections (peak, its time, min, time-weighted mean, opened, "
        "refused; the WebSocket peak), channels (peak, min, mean, opened, refused) and messages "
        "(published and delivered, count and bytes). The current period is `inProgress`. "
        "Requires a key with the stats permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def stats(
    request: Request,
    *,
    unit: str = "minute",
    start: Annotated[int | None, Query(description="ms since the epoch, inclusive")] = None,
    end: Annotated[int | None, Query(description="ms since the epoch, exclusive")] = None,
    limit: int = 100,
    direction: str = "backwards",
    scope: str = "app",
    app: Annotated[int | None, Query(description="an app of the key's account")] = None,
) -> dict[str, Any]:
    key = await authorize(request, request.headers.get("IM-API-KEY"), "stats")
    only_parameters(request, _PARAMETERS)
    if scope not in SCOPES:
        raise ValidationError(f"scope must be app or account, got {scope!r}")
    q_unit = rollups.parse_unit(unit)
    backwards = rollups.parse_direction(direction)
    q_start, q_end = rollups.parse_range(start, end)
    app_id = key.app_id if app is None else app

    def load() -> list[dict[str, Any]]:
        with get_engine().connect() as conn, Session(bind=conn) as session:
            if app_id != key.app_id:
                other = AccountRepository(session).app(app_id)
                if other is None or other.account_id != key.account_id:
                    raise PermissionDeniedError(f"app {app_id} is not an app of this key's account")
            entity = app_id if scope == "app" else key.account_id
            query = rollups.Query(
                SCOPES[scope], entity, q_unit, q_start, q_end, limit=limit, backwards=backwards
            )
            entries = rollups.periods(conn, query)
        id_field = ("appId", app_id) if scope == "app" else ("accountId", key.account_id)
        return [{**e, id_field[0]: id_field[1]} for e in entries]

    return ok(await run_in_threadpool(load))
