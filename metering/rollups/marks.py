"""Counter marks: per frontend incarnation, the cumulative totals already applied.

A frontend reports absolute totals per incarnation and app (DESIGN.md invariant 3); the
aggregator applies only what a total holds beyond its mark, and moves the mark in the same
transaction as the rollups, so a total is applied once however often it is read.

Column-wise: an incarnation's marks are its app ids, sorted, and a matrix of their totals in
``FRONTEND_COUNTERS`` order. Stored in ``usage_marks.packed`` as nine little-endian int64
columns (the ids, then each total: migration 0007 made them nine), as their byte planes
(every value's first byte, then every value's second, ...: migration 0017), which Postgres
compresses with lz4: the ids ascend and most totals are far below 2**63, so most planes are
runs of zeros or repeats. At 15 000 apps an incarnation's marks are 1.08 MB as words and
about 0.2 MB compressed.
"""

from __future__ import annotations

import numpy as np

from metering.rollups.fold import Ints, Mask
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
        pos, known = self._find(apps)
        if not known.all():  # (rarely: once an app is marked, it stays)
            self._add(apps[~known])
            pos, _ = self._find(apps)
        held = self.totals[pos]
        self.totals[pos] = np.maximum(held, totals)
        beyond: Ints = np.maximum(totals - held, 0)
        return beyond

    def _find(self, apps: Ints) -> tuple[Ints, Mask]:
        """Where each of ``apps`` is or would go in the marks, and whether it is there."""
        pos = np.searchsorted(self.apps, apps)
        known = pos < len(self.apps)
        known[known] = self.apps[pos[known]] == apps[known]
        return pos, known

    def _add(self, new: Ints) -> None:
        """Marks of zero for ``new`` apps (not marked yet, distinct)."""
        every = np.concatenate([self.apps, new])
        order = np.argsort(every, kind="stable")
        self.apps = every[order]
        self.totals = np.concatenate([self.totals, np.zeros((len(new), WIDTH), np.int64)])[order]

    def pack(self) -> bytes:
        columns = np.vstack([self.apps, self.totals.T]).astype(_PACKED)  # (columns, apps)
        return np.ascontiguousarray(columns.reshape(-1).view(np.uint8).reshape(-1, 8).T).tobytes()

    @classmethod
    def unpack(cls, data: bytes) -> Marks:
        """The marks ``pack`` stored; an error for bytes that are not (marks of another
        version: the ids must ascend and the totals be counts), never misread."""
        raw = np.frombuffer(data, dtype=np.uint8)
        if len(raw) % (8 * (WIDTH + 1)):
            raise _malformed(f"{len(raw)} bytes are not {WIDTH + 1} columns of int64")
        values = np.ascontiguousarray(raw.reshape(8, -1).T).view(_PACKED).reshape(WIDTH + 1, -1)
        apps = values[0].astype(np.int64)
        totals = np.ascontiguousarray(values[1:].T, dtype=np.int64)
        if (np.diff(apps) <= 0).any() or (totals < 0).any():
            raise _malformed("the app ids do not ascend, or a total is negative")
        return cls(apps, totals)


def _malformed(why: str) -> ValueError:
    return ValueError(
        f"usage_marks holds a value that is not counter marks ({why}): the database and the "
        "code are at different migrations (run `metering db upgrade`)"
    )
