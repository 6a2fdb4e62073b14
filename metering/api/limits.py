"""Package limits over HTTP: what staff do (packages, an account's package and override,
alerts), and ``GET /v1/admission`` for gateways not written in Python.

A staff change commits, then its admission rows are mirrored to Redis, where gateways (and this
process's own copy) pick them up at once. A mirror that fails leaves the change committed: the
periodic admission sync writes it within its interval.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Annotated, Any, Final

import redis
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr
from pydantic.alias_generators import to_camel
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from metering.accounts.repository import AccountRepository
from metering.accounts.schemas import KeyInfo
from metering.api.auth import API_KEY_HEADER, API_KEY_PARAMETER, authorize, key_with
from metering.api.envelope import ok, only_parameters
from metering.core.database import unit_of_work
from metering.core.errors import NotFoundError, UnavailableError, ValidationError
from metering.core.ids import is_id
from metering.core.logging import get_logger
from metering.gateway.admission import Admission, Check, Refusal
from metering.gateway.registry import AppRegistry, RegistryUnavailable, valid_app_id
from metering.limits import staff
from metering.limits.repository import AdmissionRow

log = get_logger(__name__)
router = APIRouter(tags=["limits"])
# Its own router, so that the composition root can put it first: routes are matched in order,
# and at the end of the list the hot endpoint paid for matching a dozen others (a fifth of its
# time).
admission_router = APIRouter(tags=["admission"])

_NO_PARAMETERS: frozenset[str] = frozenset()


# -- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    # camelCase only, and nothing unknown: a misspelt field is an error, not a default.
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")


class LimitIn(_Body):
    quota: StrictInt
    hard_limit: StrictInt | None = None  # default: 2.5 x the quota, rounded up


class PackageIn(_Body):
    name: StrictStr
    enforce_hard: StrictBool = True  # False: the hard level only notifies staff
    limits: dict[str, LimitIn]


class AccountPackageIn(_Body):
    package: StrictStr | StrictInt | None  # a package's name or id; null: no package


class OverrideIn(_Body):
    reason: StrictStr
    until: datetime | None = None  # with a time zone; null: until removed


# -- helpers -----------------------------------------------------------------------------------


StaffKey = Annotated[KeyInfo, Depends(key_with("staff"))]


def _by(key: KeyInfo) -> str:
    return f"key:{key.key_id}"


def _account_id(account_id: int) -> int:
    if not is_id(account_id):
        raise NotFoundError(f"account {account_id} does not exist", code="ACCOUNT_NOT_FOUND")
    return account_id


def _dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)


def _mirror(request: Request, rows: Mapping[int, AdmissionRow]) -> None:
    """After the commit: gateways apply the change at once."""
    admission: Admission = request.app.state.admission
    try:
        admission.store.write(rows)
    except redis.RedisError as exc:
        log.warning("limits.admission_mirror_failed", accounts=sorted(rows), error=str(exc))


async def _change(request: Request, change: Callable[[Session], staff.Change]) -> Any:
    """Run a staff change in its own transaction, mirror it once committed; its result."""

    def run() -> Any:
        with unit_of_work() as session:
            done = change(session)
        _mirror(request, done.admission)
        return done.result

    return await run_in_threadpool(run)


# -- packages ----------------------------------------------------------------------------------


@router.post(
    "/v1/packages",
    status_code=201,
    summary="Create a package",
    description=(
        "A package with a quota and a hard limit per metric (connections, channels, messages, "
        "data); the hard limit defaults to 2.5 x the quota, rounded up. With `enforceHard` "
        "false the hard level only notifies staff. Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def create_package(request: Request, key: StaffKey, body: PackageIn) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)
    limits = {metric: (lim.quota, lim.hard_limit) for metric, lim in body.limits.items()}

    def run() -> dict[str, Any]:
        try:
            with unit_of_work() as session:
                package = staff.create_package(
                    session, body.name, limits, enforce_hard=body.enforce_hard
                )
        except IntegrityError:
            # Another request created the name between the service's check and this insert.
            raise ValidationError(
                f"a package named {body.name.strip()!r} exists already", code="PACKAGE_EXISTS"
            ) from None
        return _dump(package)

    return ok(await run_in_threadpool(run))


@router.get(
    "/v1/packages",
    summary="List packages",
    description="Every package and its limits. Requires a key with the staff permission.",
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def list_packages(request: Request, key: StaffKey) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)

    def run() -> list[dict[str, Any]]:
        with unit_of_work() as session:
            return [_dump(p) for p in staff.list_packages(session)]

    return ok(await run_in_threadpool(run))


# -- an account's package, override and admission ----------------------------------------------


@router.put(
    "/v1/accounts/{account_id}/package",
    summary="Put an account on a package",
    description=(
        "`package`: a package's name or id, or null for none. What gateways enforce for the "
        "account changes at once. Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def set_package(
    request: Request, key: StaffKey, account_id: int, body: AccountPackageIn
) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)
    _account_id(account_id)
    ref = None if body.package is None else str(body.package)

    def change(session: Session) -> staff.Change:
        try:
            return staff.set_package(session, account_id, ref, by=_by(key))
        except DataError:
            # An all-digit reference is tried as an id: one past the id column's range is no
            # package either.
            raise NotFoundError(f"no package {ref!r}", code="PACKAGE_NOT_FOUND") from None

    return ok(_dump(await _change(request, change)))


@router.get(
    "/v1/accounts/{account_id}/admission",
    summary="What gateways enforce for an account",
    description=(
        "The hard limits of new connections and channel attaches, a publishing block for the "
        "rest of the month, and a staff override. Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def get_admission(request: Request, key: StaffKey, account_id: int) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)
    _account_id(account_id)

    def run() -> dict[str, Any]:
        with unit_of_work() as session:
            return _dump(staff.admission(session, account_id))

    return ok(await run_in_threadpool(run))


@router.put(
    "/v1/accounts/{account_id}/override",
    summary="Override an account's limits",
    description=(
        "Nothing of the account is rejected (alerts still go to staff) until `until` (ISO 8601 "
        "with a time zone) or, without it, until removed. Requires a key with the staff "
        "permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def set_override(
    request: Request, key: StaffKey, account_id: int, body: OverrideIn
) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)
    _account_id(account_id)

    def change(session: Session) -> staff.Change:
        return staff.set_override(
            session, account_id, reason=body.reason, by=_by(key), until=body.until
        )

    return ok(_dump(await _change(request, change)))


@router.delete(
    "/v1/accounts/{account_id}/override",
    summary="Remove an account's override",
    description=(
        "The account's package limits apply again at once. The result is what gateways "
        "enforce for it now. Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def clear_override(request: Request, key: StaffKey, account_id: int) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)
    _account_id(account_id)

    def change(session: Session) -> staff.Change:
        cleared = staff.clear_override(session, account_id)
        return staff.Change(staff.admission(session, account_id), cleared.admission)

    return ok(_dump(await _change(request, change)))


# -- alerts ------------------------------------------------------------------------------------

_ALERT_PARAMETERS = frozenset({"account", "month", "unacknowledged", "limit"})


@router.get(
    "/v1/alerts",
    summary="Limit alerts",
    description=(
        "Newest first, each with its delivery status per channel (pending, sent, failed). "
        "Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def list_alerts(
    request: Request,
    key: StaffKey,
    *,
    account: Annotated[int | None, Query(description="only this account's")] = None,
    month: Annotated[str | None, Query(description="only this UTC month, YYYY-MM")] = None,
    unacknowledged: Annotated[bool, Query(description="only those not acknowledged")] = False,
    limit: Annotated[int, Query(description="at most this many, 1 to 1000")] = 100,
) -> dict[str, Any]:
    only_parameters(request, _ALERT_PARAMETERS)

    def run() -> list[dict[str, Any]]:
        with unit_of_work() as session:
            if (
                account is not None
                and AccountRepository(session).account(_account_id(account)) is None
            ):
                raise NotFoundError(f"account {account} does not exist", code="ACCOUNT_NOT_FOUND")
            alerts = staff.list_alerts(
                session,
                account_id=account,
                month=month,
                unacknowledged=unacknowledged,
                limit=limit,
            )
            return [_dump(a) for a in alerts]

    return ok(await run_in_threadpool(run))


@router.post(
    "/v1/alerts/{alert_id}/acknowledge",
    summary="Acknowledge an alert",
    description=(
        "Marks the alert seen by staff; an alert acknowledged already keeps its first "
        "acknowledgement. Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def acknowledge(request: Request, key: StaffKey, alert_id: int) -> dict[str, Any]:
    only_parameters(request, _NO_PARAMETERS)
    if not is_id(alert_id):
        raise NotFoundError(f"alert {alert_id} does not exist", code="ALERT_NOT_FOUND")

    def run() -> dict[str, Any]:
        with unit_of_work() as session:
            return _dump(staff.acknowledge(session, alert_id, by=_by(key)))

    return ok(await run_in_threadpool(run))


# -- admission for gateways --------------------------------------------------------------------

_ACTIONS: Final = {
    "connect": Admission.admit_connection,
    "attach": Admission.admit_channel,
    "publish": Admission.admit_message,
}
_ADMISSION_PARAMETERS: Final = frozenset({"app", "action"})
_ADMISSION_QUERY = [
    {
        "name": "app",
        "in": "query",
        "required": True,
        "description": "the app id the gateway serves the request for",
        "schema": {"type": "string"},
    },
    {
        "name": "action",
        "in": "query",
        "required": True,
        "description": "connect (a new connection), attach (a channel new on the gateway) "
        "or publish (a message)",
        "schema": {"type": "string", "enum": list(_ACTIONS)},
    },
]


async def _account(registry: AppRegistry, app: str) -> int:
    # Known apps from memory without a coroutine; a miss asks Redis (once, shared).
    account = registry.known(app)
    if account is None:
        try:
            account = await registry.resolve(app)
        except RegistryUnavailable as exc:
            raise UnavailableError(str(exc), code="REGISTRY_UNAVAILABLE") from None
    if account is None:
        raise NotFoundError(f"unknown app {app}", code="APP_NOT_FOUND")
    return account


@admission_router.get(
    "/v1/admission",
    summary="May an app connect, attach or publish now?",
    description=(
        "For gateways not written in Python: the account's limits as gateways enforce them, "
        "answered from this process's copy (no database or Redis round trip) unless the "
        "copy cannot rule a refusal in or out: then from a fresh read of the frontends' "
        "counts, so that nothing is refused below the hard limit. `allowed` "
        "false carries a stable `code` (40111 connections, 40114 channels, 40112 messages, "
        "50310 limits unreadable), a `reason` and, where the refusal has a known end, "
        "`retryAfter` in seconds. An allowed connect or attach is counted against the "
        "account until the next tick's live counts. Requires a key with the admission "
        "permission (any app's key: the gateway's)."
    ),
    response_class=Response,
    openapi_extra={"parameters": [API_KEY_PARAMETER, *_ADMISSION_QUERY]},
)
async def admission(request: Request) -> Response:
    # Gateways call this for every connect, attach and publish: the header and parameters are
    # read here, not through FastAPI's parameter machinery, and the body is written by hand.
    await authorize(request, request.headers.get(API_KEY_HEADER), "admission")
    params = request.query_params
    for name in params:
        if name not in _ADMISSION_PARAMETERS:
            raise ValidationError(f"unknown parameter {name!r} (one of action, app)")
    action = params.get("action", "")
    admit = _ACTIONS.get(action)
    if admit is None:
        raise ValidationError(f"action must be connect, attach or publish, got {action[:64]!r}")
    app = params.get("app", "")
    if not valid_app_id(app):
        raise ValidationError(f"app must be an app id (digits), got {app[:64]!r}")
    account = await _account(request.app.state.registry, app)
    gate: Admission = request.app.state.admission
    decision = admit(gate, account)
    refusal: Refusal | None
    if isinstance(decision, Check):  # the copy cannot tell: a fresh read, off the loop
        if action == "connect":
            refusal = await gate.check_connection(account)
        else:
            refusal = await gate.check_channel(account, app, None)
    else:
        refusal = decision
    if refusal is None:
        body = b'{"RC":0,"RM":"OK","result":{"appId":%d,"action":"%s","allowed":true}}' % (
            int(app),
            action.encode(),
        )
    else:
        retry = b"" if refusal.retry_after is None else b',"retryAfter":%d' % refusal.retry_after
        body = (
            b'{"RC":0,"RM":"OK","result":{"appId":%d,"action":"%s","allowed":false,'
            b'"code":%d,"reason":%s%s}}'
            % (int(app), action.encode(), refusal.code, json.dumps(refusal.reason).encode(), retry)
        )
    return Response(body, media_type="application/json")
