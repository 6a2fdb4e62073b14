"""``GET /admin/connection-count`` (seed 000): the key's app's WebSocket connections now."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from metering.accounts.schemas import KeyInfo
from metering.api.auth import require
from metering.api.envelope import ok
from metering.live.service import websocket_count

router = APIRouter(tags=["admin"])


class CountResult(BaseModel):
    count: int


class CountResponse(BaseModel):
    RC: int
    RM: str
    result: CountResult


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    RC: int
    RM: str
    error: ErrorDetail


@router.get(
    "/admin/connection-count",
    summary="Get Current Connection Count",
    description=(
        "The current number of WebSocket connections of the API key's app, on all frontends "
        "of all datacenters, at the moment of the call. HTTP streaming transports and REST "
        "requests are not counted. Requires a key with the platform permission."
    ),
    response_model=CountResponse,
    responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
)
async def connection_count(
    request: Request, key: Annotated[KeyInfo, Depends(require("platform"))]
) -> dict[str, Any]:
    count = await websocket_count(
        request.app.state.readers,
        str(key.app_id),
        liveness_timeout=request.app.state.settings.liveness_timeout.total_seconds(),
    )
    return ok({"count": count})
