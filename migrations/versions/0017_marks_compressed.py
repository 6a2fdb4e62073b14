"""Counter marks stored as the byte planes of their columns, compressed with lz4.

Revision ID: 0017
Revises: 0016

An incarnation's marks (``usage_marks.packed``: per app its id and eight totals, little-endian
int64, app by app since migration 0007) are stored column by column (the ids, then each
total) as the byte planes of those values: every value's first byte, then every value's
second, and so on (``metering.rollups.marks.Marks.pack``). The ids ascend and most totals
are far below 2**63, so most planes are zeros or repeats, and on Postgres the column is
compressed with lz4 (``STORAGE EXTENDED``, ``COMPRESSION lz4``), as ``usage_state``'s blocks
are (migration 0015).

Every incarnation that counted is rewritten every cycle: at 100 000 apps on 20 frontends (15 000
apps each), 21.6 MB a cycle as words out of line (``STORAGE EXTERNAL``). Measured on this
kind of machine, eight rounds of 20 such marks in one ``executemany``: 88 to 96 ms (median)
as words uncompressed, 77 ms as words with lz4 (8.7 MB stored), 45 ms as the planes of the
words with lz4 (5.8 MB), 27 to 28 ms as the planes of the columns with lz4 (3.9 MB), for
17 ms of NumPy to build them.

A Postgres built without lz4 keeps the marks uncompressed (``STORAGE EXTERNAL``, as before):
in the new layout all the same. On SQLite only the bytes change.

Both ways in Python, every incarnation's marks kept value for value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# ``metering.rollups.marks``'s layouts as of this revision and the one before, copied: a
# migration keeps meaning what it meant when the code changes.
_COLUMNS = 9  # an app's id and its eight totals (migration 0007)
_WORD = np.dtype("<i8")


def _planes(packed: bytes) -> bytes:
    """App by app (0007) -> the byte planes of the columns."""
    if len(packed) % (8 * _COLUMNS):
        raise ValueError("a usage_marks value is not nine int64 per app: not at 0016")
    columns = np.frombuffer(packed, dtype=_WORD).reshape(-1, _COLUMNS).T
    flat = np.ascontiguousarray(columns).reshape(-1).view(np.uint8)
    return np.ascontiguousarray(flat.reshape(-1, 8).T).tobytes()


def _words(stored: bytes) -> bytes:
    """The byte planes of the columns -> app by app."""
    raw = np.frombuffer(stored, dtype=np.uint8)
    columns = np.ascontiguousarray(raw.reshape(8, -1).T).view(_WORD).reshape(_COLUMNS, -1)
    return np.ascontiguousarray(columns.T).tobytes()


def _rewrite(convert: Callable[[bytes], bytes]) -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT datacenter, incarnation, packed FROM usage_marks")).all()
    update = sa.text(
        "UPDATE usage_marks SET packed = :packed "
        "WHERE datacenter = :datacenter AND incarnation = :incarnation"
    )
    for dc, inc, packed in rows:  # (a few rows: one per frontend incarnation)
        conn.execute(update, {"datacenter": dc, "incarnation": inc, "packed": convert(packed)})


def _lz4() -> bool:
    """Whether this Postgres can compress with lz4 (built with it)."""
    found = op.get_bind().execute(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    )
    return "lz4" in (found.scalar() or [])


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql" and _lz4():
        # Before the rows are rewritten, so that each new value is compressed.
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET COMPRESSION lz4")
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET STORAGE EXTENDED")
    _rewrite(lambda p: _planes(bytes(p)))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET COMPRESSION DEFAULT")
        op.execute("ALTER TABLE usage_marks ALTER COLUMN packed SET STORAGE EXTERNAL")
    _rewrite(lambda p: _words(bytes(p)))
