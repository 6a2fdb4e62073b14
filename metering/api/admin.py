"""``GET /admin/connection-count`` (seed 000): the key's app's WebSocket connections now."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from metering.api.auth import API_KEY_HEADER, API_KEY_PARAMETER, authorize
from metering.live.service import LiveCounts

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
    response_class=Response,
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
    responses={
        200: {"model": CountResponse, "content": {"application/json": {}}},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
    },
)
async def connection_count(request: Request) -> Response:
    # The header is read here, not declared as a parameter: FastAPI's parameter machinery is a
    # measurable share of this endpoint's cost. The OpenAPI document still lists it.
    key = await authorize(request, request.headers.get(API_KEY_HEADER), "platform")
    counts: LiveCounts = request.app.state.live_counts
    count = await counts.websocket(str(key.app_id))
    # Rendered by hand: this is the hottest read of the API, and the body is fixed.
    return Response(
        b'{"RC":0,"RM":"OK","result":{"count":%d}}' % count, media_type="application/json"
    )
