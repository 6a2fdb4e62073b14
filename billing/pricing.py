"""An invoice's lines from a month's usage and a package's prices. Pure: no I/O.

Per priced metric: usage up to ``included`` is in the base fee; the overage (the rest) costs
``unit_price`` per ``unit_size``, prorated (1 500 messages over, at 0.40 per 1 000, cost 0.60),
and the line's amount is rounded once, half-up, to the currency's minor unit. The total is the
sum of the rounded lines, so the lines always add up to it.
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from billing import money
from billing.models import BASE_FEE, PRICED_METRICS

# Wide enough that usage x price / size is exact before its one rounding (usage < 2^63 has 19
# digits, a price 28): the default context's 28 digits could round twice.
_EXACT = decimal.Context(prec=64, rounding=decimal.ROUND_HALF_UP)
_ZERO = Decimal(0)


@dataclass(frozen=True, slots=True)
class Price:
    included: int
    unit_price: Decimal
    unit_size: int


@dataclass(frozen=True, slots=True)
class Pricing:
    package_id: int
    package_name: str
    currency: str
    base_fee: Decimal
    prices: dict[str, Price]  # priced metrics only


@dataclass(frozen=True, slots=True)
class Peak:
    """When a peak metric's peak was reached, and the app with the highest peak of its own."""

    at: datetime
    resolution: str  # 'second', or 'hour': the start of the hour it was first reached in
    top_app_id: int | None = None
    top_app_peak: int | None = None


@dataclass(frozen=True, slots=True)
class Line:
    metric: str
    usage: int | None
    included: int | None
    overage: int | None
    unit_size: int | None
    unit_price: Decimal
    amount: Decimal
    peak: Peak | None = None


def lines(pricing: Pricing, usage: dict[str, int], peaks: dict[str, Peak]) -> list[Line]:
    """The base fee's line, then one line per metric in ``PRICED_METRICS`` order."""
    cur = pricing.currency
    nothing = money.round_amount(Decimal(0), cur)
    out = [Line(BASE_FEE, None, None, None, None, pricing.base_fee, pricing.base_fee)]
    for metric in PRICED_METRICS:
        used, price, peak = usage.get(metric, 0), pricing.prices.get(metric), peaks.get(metric)
        if price is None:  # not priced: in the base fee, whatever the usage
            out.append(Line(metric, used, None, 0, None, _ZERO, nothing, peak))
            continue
        over = used - price.included
        if over <= 0:
            amount, over = nothing, 0
        else:
            cost = _EXACT.divide(_EXACT.multiply(Decimal(over), price.unit_price), price.unit_size)
            amount = money.round_amount(cost, cur)
        size, unit = price.unit_size, price.unit_price
        out.append(Line(metric, used, price.included, over, size, unit, amount, peak))
    return out


def total(lines_: list[Line]) -> Decimal:
    return sum((line.amount for line in lines_), Decimal(0))
