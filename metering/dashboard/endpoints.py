"""The dashboard: ``GET /dashboard`` (the page, no key needed to load it) and the JSON it reads
with the key the user entered (``platform`` permission), sent in the ``IM-API-KEY`` header,
never in a URL.

The charting library is Plotly.js, as the ``plotly`` Python package installs it
(``plotly/package_data/plotly.min.js``): nothing to build, nothing copied into this repository.
"""

from __future__ import annotations

import time
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from metering.api.auth import API_KEY_PARAMETER, key_with
from metering.api.envelope import ok, only_parameters
from metering.core.database import get_engine
from metering.core.errors import NotFoundError
from metering.dashboard import service
from metering.live.service import LiveCounts
from metering.live.store import Transport
from metering.rollups import query
from metering.rollups.fold import ACCOUNT, APP

router = APIRouter(tags=["dashboard"])
_STATIC: Final = resources.files("metering.dashboard") / "static"
_ASSETS: Final = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@cache
def _plotly() -> str:
    return str(resources.files("plotly") / "package_data" / "plotly.min.js")


_key = key_with("platform")


@router.get("/dashboard", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse((_STATIC / "index.html").read_text(encoding="utf-8"))


@router.get("/dashboard/static/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    if name == "plotly.min.js":
        return FileResponse(_plotly(), media_type="text/javascript")
    if name not in _ASSETS:
        raise NotFoundError(f"no such file: {name}")
    return Response((_STATIC / name).read_bytes(), media_type=_ASSETS[name])


@router.get(
    "/v1/dashboard/overview",
    summary="The dashboard's account view",
    description=(
        "The key's account and apps, its package's limits, the month so far against them "
        "(level per metric), its recent alerts and any rejection in force. Requires a key "
        "with the platform permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def overview(request: Request) -> dict[str, Any]:
    key = await _key(request)
    only_parameters(request, frozenset())

    def run() -> dict[str, Any]:
        with Session(get_engine()) as session:
            return service.overview(session, key.account_id)

    return ok(await run_in_threadpool(run))


@router.get(
    "/v1/dashboard/series",
    summary="A graph's periods",
    description=(
        "The key's account's (or, with `app`, one of its apps') periods of `unit` between "
        "`start` and `end` (ms since the epoch), oldest first, at most 1000. Requires a key "
        "with the platform permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def series(
    request: Request,
    unit: str,
    start: Annotated[int, Query(description="ms since the epoch, inclusive")],
    end: Annotated[int, Query(description="ms since the epoch, exclusive")],
    app: int | None = None,
) -> dict[str, Any]:
    key = await _key(request)
    only_parameters(request, frozenset({"unit", "start", "end", "app"}))
    q_unit = query.parse_unit(unit)
    lo, hi = query.parse_range(start, end)
    assert lo is not None  # both are required parameters
    assert hi is not None

    def run() -> list[dict[str, Any]]:
        with get_engine().connect() as conn:
            if app is None:
                return service.series(conn, ACCOUNT, key.account_id, unit=q_unit, start=lo, end=hi)
            service.check_app(conn, key.account_id, app)
            return service.series(conn, APP, app, unit=q_unit, start=lo, end=hi)

    return ok(await run_in_threadpool(run))


@router.get(
    "/v1/dashboard/live",
    summary="Live connections",
    description=(
        "Connections of the key's account (or, with `app`, of one of its apps) open now, per "
        "transport, read from the datacenter totals at the moment of the call. Requires a key "
        "with the platform permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def live(request: Request, app: int | None = None) -> dict[str, Any]:
    key = await _key(request)
    only_parameters(request, frozenset({"app"}))

    def apps() -> list[int]:
        with get_engine().connect() as conn:
            if app is not None:
                service.check_app(conn, key.account_id, app)
                return [app]
            return [a["id"] for a in service.apps_of(conn, key.account_id)]

    counts: LiveCounts = request.app.state.live_counts
    totals = dict.fromkeys(Transport, 0)
    for app_id in await run_in_threadpool(apps):
        for transport, n in (await counts.all_transports(str(app_id))).items():
            totals[transport] += n
    return ok(
        {
            "connections": sum(totals.values()),
            **{t.value: n for t, n in totals.items()},
            "at": int(time.time() * 1000),
        }
    )
