"""Money: ``Decimal`` end to end, never a float.

Amounts are rounded once per invoice line, to the currency's minor unit, half-up (0.005 USD is
0.01 USD; half-even would make it 0.00). A price may carry more decimals than the currency (a
unit price of 0.0025 USD per message); an amount never does.

On Postgres money is ``NUMERIC``; SQLite has no exact decimal type (SQLAlchemy would go
through a float there), so it keeps the decimal's text.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, Final

from sqlalchemy import Numeric, String
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

from metering.core.errors import ValidationError

# ISO 4217 currencies and their minor units (digits after the decimal point). The ones a
# platform like this bills in; add a line to bill in another.
MINOR_UNITS: Final[dict[str, int]] = {
    "AUD": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CNY": 2, "CZK": 2, "DKK": 2, "EUR": 2,
    "GBP": 2, "HKD": 2, "INR": 2, "JPY": 0, "KRW": 0, "KWD": 3, "MXN": 2, "NOK": 2, "NZD": 2,
    "PLN": 2, "SEK": 2, "SGD": 2, "USD": 2, "ZAR": 2,
}  # fmt: skip
# Digits kept for a unit price (NUMERIC(28, 12)) and for an amount (NUMERIC(24, 4)).
PRICE_PLACES: Final = 12
AMOUNT_PLACES: Final = 4
MAX_MONEY: Final = Decimal(10) ** 15  # a quadrillion: no price or bill is near it
# Quantizing needs the result's digits within the context's precision (28 by default).
_WIDE: Final = Context(prec=64)


def currency(code: str) -> str:
    """A known ISO 4217 code, upper case."""
    c = code.strip().upper()
    if c not in MINOR_UNITS:
        known = ", ".join(sorted(MINOR_UNITS))
        raise ValidationError(f"unknown currency {code!r} (one of {known})", code="BAD_CURRENCY")
    return c


def parse(value: str | int | Decimal, what: str, *, places: int) -> Decimal:
    """A non-negative decimal with at most ``places`` digits after the point. Text, an
    integer or a Decimal: never a float, which could not say 0.1 exactly."""
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValidationError(f"{what} must be a decimal number written as text, got {value!r}")
    try:
        d = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise ValidationError(f"{what} must be a decimal number, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValidationError(f"{what} must be a finite number >= 0, got {value!r}")
    if d >= MAX_MONEY:
        raise ValidationError(f"{what} is too large: {value!r}")
    exponent = d.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if -exponent > places:
        raise ValidationError(f"{what} has more than {places} decimal places: {value!r}")
    return d


def minor(code: str) -> Decimal:
    """The currency's smallest amount as a quantum: Decimal('0.01') for USD, '1' for JPY."""
    return Decimal(1).scaleb(-MINOR_UNITS[code])


def round_amount(value: Decimal, code: str) -> Decimal:
    """Rounded half-up to the currency's minor unit: the one rounding of a line."""
    return value.quantize(minor(code), rounding=ROUND_HALF_UP, context=_WIDE)


def text(value: Decimal, code: str) -> str:
    """An amount as finance writes it: every minor digit, no exponent ('49.00', '1200')."""
    return f"{round_amount(value, code):f}"


class Money(TypeDecorator[Decimal]):
    """An exact decimal column: ``NUMERIC(precision, scale)`` on Postgres, text on SQLite."""

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__(precision=precision, scale=scale, asdecimal=True)
        self.precision, self.scale = precision, scale

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(self.precision + 2))
        return dialect.type_descriptor(Numeric(self.precision, self.scale, asdecimal=True))

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if not isinstance(value, Decimal):
            raise TypeError(f"money must be a Decimal, got {type(value).__name__}")
        return f"{value:f}" if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value)
