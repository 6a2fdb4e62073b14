"""Ids of the engine's rows (accounts, apps, packages, alerts, invoices) are 32-bit integer
columns: a number outside them names nothing, and Postgres refuses to compare one with such a
column (an error, where the answer is "no such row")."""

from __future__ import annotations

MAX_ID = 2**31 - 1


def is_id(value: int) -> bool:
    """Whether ``value`` can be a row's id (so is worth looking up)."""
    return 0 < value <= MAX_ID
