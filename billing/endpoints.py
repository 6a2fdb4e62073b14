"""Invoices and prices over HTTP.

- ``GET /v1/invoices?month=YYYY-MM``, ``GET /v1/invoices/{id}``, ``GET /v1/invoices/preview?
  account=ID``: finance's read of every account's invoices (a key with the billing permission).
- ``PUT`` / ``GET /v1/packages/{package}/prices``: staff set and read a package's prices.

Money travels as decimal text ("49.00"); a JSON number is refused, so that no price ever goes
through a float.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr
from pydantic.alias_generators import to_camel
from starlette.concurrency import run_in_threadpool

from billing import jobs, service
from billing.models import PRICED_METRICS
from metering.accounts.schemas import KeyInfo
from metering.api.auth import API_KEY_PARAMETER, key_with
from metering.api.envelope import ok, only_parameters
from metering.core.database import get_engine
from metering.core.errors import ValidationError

router = APIRouter(tags=["billing"])
_NONE: Final[frozenset[str]] = frozenset()


BillingKey = Annotated[KeyInfo, Depends(key_with("billing"))]
StaffKey = Annotated[KeyInfo, Depends(key_with("staff"))]


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid")


class PriceIn(_Body):
    included: StrictInt
    unit_price: StrictStr  # decimal text, e.g. "0.40"
    unit_size: StrictInt = 1


class PricesIn(_Body):
    currency: StrictStr
    base_fee: StrictStr  # decimal text, e.g. "49.00"
    prices: dict[str, PriceIn] = {}


@router.get(
    "/v1/invoices",
    summary="A closed month's invoices",
    description=(
        "Every account's final invoice for `month` (YYYY-MM, UTC), with its lines: the base fee, "
        "then per metric the usage, what is included, the overage, the unit price and the "
        "amount (money as decimal text); for the peak metrics when the peak was reached and "
        "the app with the highest peak of its own. By account, `limit` at a time (1000 by "
        "default): a full page is followed by `after=<its last accountId>`. 404 "
        "`MONTH_NOT_CLOSED` before the month is closed. Requires a key with the billing "
        "permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def list_invoices(
    request: Request,
    key: BillingKey,
    month: Annotated[str, Query(description="YYYY-MM (UTC)")],
    after: Annotated[
        int | None, Query(description="only accounts after this id (the last one of a page)")
    ] = None,
    limit: Annotated[int, Query(description="at most this many, 1 to 10000")] = 1000,
) -> dict[str, Any]:
    only_parameters(request, frozenset({"month", "after", "limit"}))
    page = partial(jobs.invoices, get_engine(), month, after=after, limit=limit)
    return ok(await run_in_threadpool(page))


@router.get(
    "/v1/invoices/preview",
    summary="A draft of an account's invoice for the current month",
    description=(
        "The invoice the account would get if the month ended now (`status: draft`, nothing "
        "stored). Requires a key with the billing permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def preview(
    request: Request,
    key: BillingKey,
    account: Annotated[int, Query(description="the account's id")],
) -> dict[str, Any]:
    only_parameters(request, frozenset({"account"}))
    return ok(await run_in_threadpool(jobs.preview, get_engine(), account))


@router.get(
    "/v1/invoices/{invoice_id}",
    summary="One invoice",
    description="A final invoice and its lines. Requires a key with the billing permission.",
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def get_invoice(request: Request, key: BillingKey, invoice_id: int) -> dict[str, Any]:
    only_parameters(request, _NONE)
    return ok(await run_in_threadpool(jobs.invoice, get_engine(), invoice_id))


@router.put(
    "/v1/packages/{package}/prices",
    summary="Set a package's prices",
    description=(
        "A currency (ISO 4217), a monthly base fee, and per metric (connections, channels, "
        "messages, data) the quantity included and the price per `unitSize` beyond it; a "
        "metric left out is in the base fee. Replaces the package's prices; invoices issued "
        "keep theirs. Money as decimal text. Requires a key with the staff permission."
    ),
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def set_prices(
    request: Request, key: StaffKey, package: str, body: PricesIn
) -> dict[str, Any]:
    only_parameters(request, _NONE)
    unknown = sorted(set(body.prices) - set(PRICED_METRICS))
    if unknown:
        raise ValidationError(f"unknown metric {unknown[0]!r} (one of {', '.join(PRICED_METRICS)})")
    prices = {
        m: service.price(m, p.included, p.unit_price, p.unit_size) for m, p in body.prices.items()
    }

    def run() -> dict[str, Any]:
        with get_engine().begin() as conn:
            pricing = service.set_prices(
                conn, package, currency=body.currency, base_fee=body.base_fee, prices=prices,
                by=f"key:{key.key_id}",
            )  # fmt: skip
        return service.pricing_view(pricing)

    return ok(await run_in_threadpool(run))


@router.get(
    "/v1/packages/{package}/prices",
    summary="A package's prices",
    description="Requires a key with the staff permission.",
    openapi_extra={"parameters": [API_KEY_PARAMETER]},
)
async def get_prices(request: Request, key: StaffKey, package: str) -> dict[str, Any]:
    only_parameters(request, _NONE)

    def run() -> dict[str, Any]:
        with get_engine().connect() as conn:
            return service.pricing_view(service.prices_of(conn, package))

    return ok(await run_in_threadpool(run))
