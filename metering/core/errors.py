"""Domain errors. Each carries its HTTP status and a stable code, so none becomes a 500."""

from __future__ import annotations


class MeteringError(Exception):
    """Base of every expected failure."""

    status: int = 400
    code: str = "BAD_REQUEST"
    rm: str = "Bad Request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class NotFoundError(MeteringError):
    status = 404
    code = "NOT_FOUND"
    rm = "Not Found"


class ValidationError(MeteringError):
    status = 400
    code = "INVALID_REQUEST"
    rm = "Bad Request"


class AuthenticationError(MeteringError):
    status = 401
    code = "INVALID_API_KEY"
    rm = "Unauthorized"


class PermissionDeniedError(MeteringError):
    status = 403
    code = "PERMISSION_DENIED"
    rm = "Forbidden"


class UnavailableError(MeteringError):
    """What the request needs cannot be told now; the same request may succeed later."""

    status = 503
    code = "UNAVAILABLE"
    rm = "Service Unavailable"
