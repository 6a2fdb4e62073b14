"""Limit levels: pure arithmetic, no I/O.

DESIGN.md "Limits and enforcement": warning at 80 % of the quota, soft at the quota, hard at
the hard limit (default 2.5 x the quota). A level is reached when usage is at or over its
threshold and above zero (a quota of 0 includes nothing, but no usage reaches no level).
"""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import numpy as np
import numpy.typing as npt

from metering.accounts.models import METRICS

LEVELS = ("warning", "soft", "hard")
NONE, WARNING, SOFT, HARD = 0, 1, 2, 3  # level numbers: higher is more severe
WARNING_SHARE = Decimal("0.8")
DEFAULT_HARD_FACTOR = Decimal("2.5")
# The concurrent metrics, checked within the 1-second tick too; the others are monthly sums.
CONCURRENT = ("connections", "channels")
METRIC_INDEX = {m: i for i, m in enumerate(METRICS)}

Ints = npt.NDArray[np.int64]


def default_hard(quota: int) -> int:
    """The hard limit when a package gives none: 2.5 x the quota, rounded up."""
    return int((Decimal(quota) * DEFAULT_HARD_FACTOR).to_integral_value(ROUND_CEILING))


def warning_threshold(quota: Ints | int) -> Ints:
    """80 % of the quota, rounded up: usage at or over it is at the warning level."""
    q = np.asarray(quota, dtype=np.int64)
    return (q * 4 + 4) // 5  # ceil(0.8 * q) in integers, exact for every int64 quota / 5


def thresholds(quota: int, hard: int) -> tuple[int, int, int]:
    """(warning, soft, hard) thresholds of one limit."""
    return int(warning_threshold(quota)), quota, hard


def level_of(usage: Ints, quota: Ints, hard: Ints) -> Ints:
    """The level each usage reached (``NONE`` .. ``HARD``), element-wise; a limit of -1 (the
    metric has none) reaches no level."""
    usage, quota, hard = (np.asarray(a, dtype=np.int64) for a in (usage, quota, hard))
    limited = (quota >= 0) & (usage > 0)
    level = np.zeros(np.broadcast(usage, quota).shape, dtype=np.int64)
    level += limited & (usage >= warning_threshold(np.maximum(quota, 0)))
    level += limited & (usage >= quota)
    level += limited & (usage >= hard)
    return level
