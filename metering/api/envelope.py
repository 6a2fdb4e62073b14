"""The response envelope of seed 000: ``{"RC", "RM", "result"}`` or ``{"RC", "RM", "error"}``."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from metering.core.errors import MeteringError, ValidationError
from metering.core.logging import get_logger

log = get_logger(__name__)


def ok(result: Any) -> dict[str, Any]:
    return {"RC": 0, "RM": "OK", "result": result}


def only_parameters(request: Request, allowed: frozenset[str]) -> None:
    """A query parameter the endpoint does not know is an error, not silently ignored."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        known = f" (one of {', '.join(sorted(allowed))})" if allowed else ""
        raise ValidationError(f"unknown parameter {unknown[0]!r}{known}")


def error_body(status: int, rm: str, code: str, message: str) -> dict[str, Any]:
    return {"RC": status, "RM": rm, "error": {"code": code, "message": message}}


def error_response(status: int, rm: str, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, rm, code, message), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MeteringError)
    async def _domain(_request: Request, exc: MeteringError) -> JSONResponse:
        return error_response(exc.status, exc.rm, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg"))
        return error_response(400, "Bad Request", "INVALID_REQUEST", message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        names = {404: ("Not Found", "NOT_FOUND"), 405: ("Method Not Allowed", "METHOD_NOT_ALLOWED")}
        rm, code = names.get(exc.status_code, ("Error", "HTTP_ERROR"))
        return error_response(exc.status_code, rm, code, str(exc.detail))

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        # Live counts are in Redis: without it there is no honest answer, only a clear one.
        log.warning("api.redis_unavailable", path=request.url.path, error=repr(exc))
        return error_response(
            503, "Service Unavailable", "UNAVAILABLE", "live counts are unavailable; retry shortly"
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("api.unexpected_error", path=request.url.path, error=repr(exc))
        return error_response(500, "Internal Server Error", "INTERNAL", "internal error")
