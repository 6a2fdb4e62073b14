"""Counter marks: per frontend incarnation, the cumulative totals already applied.

A frontend reports absolute totals per incarnation and app (DESIGN.md invariant 3); the
aggregator applies only what a total holds beyond its mark, and moves the mark in the same
transaction as the rollups, so a total is applied once however often it is read.

Column-wise: an incarnation's marks are its app ids, sorted, and a matrix of their totals in
``FRONTEND_COUNTERS`` order. Stored in ``usage_marks.packed`` as little-endian int64, nine
per app (the id, then the eight totals; migration 0007 repacked the seven of before).
"""

from __future__ import annotations

import numpy as np

from metering.rollups.fold import Ints
from metering.rollups.models import FRONTEND_COUNTERS

WIDTH = len(FRONTEND_COUNTERS)
_PACKED = np.dtype("<i8")


class Marks:
    def __init__(self, apps: Ints | None = None, totals: Ints | None = None) -> None:
        self.apps: Ints = np.zeros(0, dtype=np.int64) if apps is None else apps
        self.totals: Ints = np.zeros((0, WIDTH), dtype=np.int64) if totals is None else totals

    def __len__(self) -> int:
        return len(self.apps)

    def apply(self, apps: Ints, totals: Ints) -> Ints:
        """Move the marks of ``apps`` (distinct) up to ``totals``; return what the totals held
        beyond them (a total below its mark, never for a cumulative counter, adds nothing)."""
        self._add(apps)
        pos = np.searchsorted(self.apps, apps)
        held = self.totals[pos]
        self.totals[pos] = np.maximum(held, totals)
        beyond: Ints = np.maximum(totals - held, 0)
        return beyond

    def _add(self, apps: Ints) -> None:
        """Marks of zero for the apps not marked yet."""
        pos = np.searchsorted(self.apps, apps)
        known = pos < len(self.apps)
        known[known] = self.apps[pos[known]] == apps[known]
        new = apps[~known]
        if not new.size:
            return
        every = np.concatenate([self.apps, new])
        order = np.argsort(every, kind="stable")
        self.apps = every[order]
        self.totals = np.concatenate([self.totals, np.zeros((len(new), WIDTH), np.int64)])[order]

    def pack(self) -> bytes:
        return np.column_stack([self.apps, self.totals]).astype(_PACKED).tobytes()

    @classmethod
    def unpack(cls, data: bytes) -> Marks:
        table = np.frombuffer(data, dtype=_PACKED).astype(np.int64).reshape(-1, WIDTH + 1)
        return cls(table[:, 0].copy(), table[:, 1:].copy())
