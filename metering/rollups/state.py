"""``usage_state``: what the aggregator knows of each entity, in blocks of 64, in two parts.

Per app and per account, ``FIELDS`` in order, each a big-endian int64 (320 bytes):

- the state: the value held now and since when, the running totals since the entity was first
  seen (``fold.S_*``);
- its latest minute row, whole (``fold.R_*``: its start, the values carried in and totals at
  its start, its extremes so far);
- where its latest hour, day and month rows start;
- ``lag``: the start of the minute whose row its closed hour, day and month rows (those of the
  periods that minute lies in) may lack in ``usage_rollups``, until the aggregator settles
  them, a share per cycle over the ten minutes after they close (-1: none; migration 0018);
- and, for a while after a minute ends for the entity, the minute row that closed
  (``HELD_ROW``, laid out as the minute row): 488 bytes instead of 320. The aggregator moves
  held rows to ``usage_rollups`` a share per cycle, so that a minute's first cycle, which
  closes every busy entity's minute row at once, does not also write them all there; a held
  row is the entity's, read with its other minute rows, until then.

``usage_state`` (migration 0014) holds the entities of one scope whose ids share all but their
low ``BLOCK_BITS`` bits (their ``block``: ``id >> BLOCK_BITS``) in two rows, one per part of
their values: ``NOW``, what changes whenever the entity does (its state and its minute row's
extremes, 21 fields), and ``ROWS``, what changes only when a row begins, a held row comes or
goes or closed rows are settled (its minute row's start and start values, its coarser rows'
starts and its lag, 19 fields, and the held row). Each row's ``packed`` is big-endian int64
words, stored as their byte planes (``planes``: every word's first byte, then every word's
second, and so on; migration 0015):

- ``n``, the entities in it (1 to ``BLOCK``);
- their ids, ascending;
- their widths (the part's fields, and with ``ROWS`` the held row's for one that holds one);
- the part's fields of each, in that order;
- then, in ``ROWS``, the ``HELD_ROW`` of each that holds one, in that order.

A busy entity's values change every cycle, and Postgres pays per row rewritten (an index
entry, a tuple header, a TOAST pointer) and per byte (its WAL): measured on 120 000 entities'
480 bytes, one row each took 0.8 to 1.3 s to rewrite (COPY into a staging table, then one
``UPDATE ... FROM``), 1 875 rows of 64 entities 0.45 to 0.7 s, in proportion to the bytes
whatever the rows' size (``docs/benchmarks.md``, the aggregation run of 2026-12-01). So a
cycle rewrites the ``NOW`` part of the blocks of the entities that changed (168 bytes an
entity), and the ``ROWS`` part only of the blocks where an entity's slow part changed (at a
minute's start, nearly all; in the cycles after, the blocks whose held rows move). A
block's value is 10 to 30 kB. Most values are far below 2**63: as byte planes the first
planes are mostly zeros and the others repeat, and Postgres compresses them with lz4 to
about 45 % (``COMPRESSION lz4``; pglz, its default, would take 7 to 9 s a cycle), which
halves what a cycle's writes cost (a part's blocks for 120 000 entities, alone: 219 to 567
ms as words uncompressed, 83 to 144 ms as lz4 byte planes). A block is always written whole,
from the aggregator's book, which holds every entity.

"No such row" is -1 in a start (``minute``, ``hour``, ``day``, ``month``) and in
``minute_peak`` (no counted second yet), as in the aggregator's book.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection

from metering.rollups import bulk
from metering.rollups.fold import Ints
from metering.rollups.models import COUNTERS

_ROW = (
    "conns0", "ws0", "channels0", "area0", "ch_area0", *(f"{c}0" for c in COUNTERS),
    "peak", "peak_at", "min", "ws_peak", "ch_peak", "ch_min",
)  # fmt: skip
STATE = ("conns", "ws", "channels", "since", "area", "ch_area", *COUNTERS)
MINUTE_ROW = ("minute", *(f"minute_{c}" for c in _ROW))
COARSER_STARTS = ("hour", "day", "month")
# The start of a minute whose row the entity's closed hour, day and month rows (those of the
# periods it lies in) may lack in usage_rollups: they are settled later (migration 0018).
LAG = "lag"
FIELDS = (*STATE, *MINUTE_ROW, *COARSER_STARTS, LAG)
HELD_ROW = ("held", *(f"held_{c}" for c in _ROW))
WIDTH = 8 * len(FIELDS)
HELD_WIDTH = WIDTH + 8 * len(HELD_ROW)  # a row that holds a closed minute row
DTYPE = np.dtype(">i8")
ALL = len(FIELDS) + len(HELD_ROW)
BLOCK_BITS = 6
BLOCK = 1 << BLOCK_BITS  # entities to a usage_state row, at most
_AT = {name: i for i, name in enumerate((*FIELDS, *HELD_ROW))}
# The two parts of an entity's value, each in rows of its own: what changes whenever the
# entity changes (its state, its minute row's extremes), and what changes only when a row
# begins or a held row comes or goes (its minute row's start and start values, its coarser
# rows' starts, the held row).
NOW, ROWS = 0, 1
PARTS = (NOW, ROWS)
_EXTREMES = tuple(f"minute_{c}" for c in _ROW[-6:])
_BASE = {
    NOW: np.array([_AT[c] for c in (*STATE, *_EXTREMES)]),
    ROWS: np.array([_AT[c] for c in FIELDS if c not in STATE and c not in _EXTREMES]),
}
_HELD_AT = np.arange(len(FIELDS), ALL)
ROWS_COLUMNS = np.concatenate([_BASE[ROWS], _HELD_AT])  # the slow part, in ALL columns
# Where each part lies in a packed matrix's columns.
STATE_COLUMNS = slice(0, len(STATE))
MINUTE_COLUMNS = slice(len(STATE), len(STATE) + len(MINUTE_ROW))
STARTS_COLUMNS = slice(
    len(STATE) + len(MINUTE_ROW), len(STATE) + len(MINUTE_ROW) + len(COARSER_STARTS)
)
LAG_COLUMN = len(FIELDS) - 1
HELD_COLUMNS = slice(len(FIELDS), len(FIELDS) + len(HELD_ROW))


def column(name: str) -> int:
    return _AT[name]


def block_of(ids: Ints) -> Ints:
    """The block each entity id lies in (``BLOCK`` ids to a block)."""
    return ids >> BLOCK_BITS


def encode(
    part: int, scopes: Ints, ids: Ints, values: npt.NDArray[np.int64]
) -> list[tuple[int, int, int, bytes]]:
    """The ``usage_state`` rows (scope, part, block, packed) of one part of the entities given:
    ``values`` per entity ``FIELDS`` then ``HELD_ROW`` (a held start of -1: no held row). A
    block is written whole: the entities must be every member of each block they touch (the
    aggregator's ``service._blocks_of``), each once.

    NumPy does the work: the entities sorted by (scope, id), the part's fields of all of them
    in one matrix and the held rows of those that hold one in another, so that each block's
    fields and held rows are consecutive rows of those; per block, Python only joins five
    slices."""
    if not len(ids):
        return []

    def ascending() -> bool:
        later = (scopes[1:] > scopes[:-1]) | ((scopes[1:] == scopes[:-1]) & (ids[1:] > ids[:-1]))
        return bool(later.all())

    if not ascending():
        order = np.lexsort((ids, scopes))
        scopes, ids, values = scopes[order], ids[order], values[order]
        if not ascending():
            raise ValueError("an entity is given twice: its block would hold it twice")
    base = len(_BASE[part])
    held = (values[:, len(FIELDS)] >= 0) if part == ROWS else np.zeros(len(ids), np.bool_)
    fields = values[:, _BASE[part]].astype(DTYPE)
    held_rows = values[held, len(FIELDS) :].astype(DTYPE)
    blocks = block_of(ids)
    edges = np.flatnonzero((np.diff(blocks) != 0) | (np.diff(scopes) != 0)) + 1
    first = np.concatenate([[0], edges])
    last = np.concatenate([edges, [len(ids)]])
    held_before = np.concatenate([[0], np.cumsum(held)])  # those holding a row before each
    counts = (last - first).astype(DTYPE).data
    widths = np.where(held, base + len(HELD_ROW), base).astype(DTYPE).data
    big_ids = ids.astype(DTYPE).data
    # (flat views: a slice of a 2-D memoryview cannot be joined)
    fields_of, held_of = fields.reshape(-1).data, held_rows.reshape(-1).data
    f, h = base, len(HELD_ROW)
    return [
        (s, part, k, planes(b"".join((counts[i : i + 1], big_ids[a:b], widths[a:b],
                                      fields_of[a * f : b * f], held_of[c * h : d * h]))))
        for i, (a, b, c, d, s, k) in enumerate(zip(
            first.tolist(), last.tolist(), held_before[first].tolist(),
            held_before[last].tolist(), scopes[first].tolist(), blocks[first].tolist(),
            strict=True,
        ))
    ]  # fmt: skip


def planes(packed: bytes) -> bytes:
    """Int64 words as their byte planes: every word's first byte, then every word's second,
    and so on (how ``usage_state`` stores a block: ``words`` undoes it)."""
    return b"".join(packed[k::8] for k in range(8))


def words(stored: bytes) -> bytes:
    """The int64 words whose byte planes (``planes``) ``stored`` is."""
    n = len(stored) // 8
    out = bytearray(len(stored))
    for k in range(8):
        out[k::8] = stored[k * n : (k + 1) * n]
    return bytes(out)


def write(
    conn: Connection,
    scopes: Ints,
    ids: Ints,
    values: npt.NDArray[np.int64],
    parts: Sequence[int] = PARTS,
) -> int:
    """Write ``parts`` of the entities given as they now are, in the blocks that hold them
    (``encode``: every member of each block they touch), inserted or replaced, in one
    ``executemany``; the rows written."""
    rows = [row for part in parts for row in encode(part, scopes, ids, values)]
    return bulk.upsert(
        conn, "usage_state", columns=("scope", "part", "block", "packed"),
        keys=("scope", "part", "block"), rows=rows, merge={"packed": "excluded.packed"},
    )  # fmt: skip


def decode(
    rows: Sequence[tuple[int, int, int, bytes]],
) -> tuple[Ints, Ints, npt.NDArray[np.int64]]:
    """The entities of ``usage_state`` rows (scope, part, block, packed), both parts of each:
    scopes, ids and values as ``encode`` takes them (a held start of -1 where an entity holds
    no minute row), in (scope, id) order. A value of another shape, or an entity with one
    part and not the other, is an error, never misread."""
    got = [_decode_part(part, [r for r in rows if r[1] == part]) for part in PARTS]
    (scopes, ids, now), (scopes_rows, ids_rows, rest) = got
    if len(ids) != len(ids_rows) or (ids != ids_rows).any() or (scopes != scopes_rows).any():
        raise ValueError(
            "usage_state holds one part of an entity's value and not the other: the database "
            "and the code are at different migrations (run `metering db upgrade`)"
        )
    values = np.full((len(ids), ALL), -1, dtype=np.int64)
    values[:, _BASE[NOW]] = now[:, : len(_BASE[NOW])]
    values[:, _BASE[ROWS]] = rest[:, : len(_BASE[ROWS])]
    values[:, _HELD_AT] = rest[:, len(_BASE[ROWS]) :]
    return scopes, ids, values


def _decode_part(
    part: int, rows: Sequence[tuple[int, int, int, bytes]]
) -> tuple[Ints, Ints, npt.NDArray[np.int64]]:
    """One part's entities (``decode``): scopes, ids, and the part's fields then the held
    row's (-1 where none), in (scope, id) order.

    All rows at once: their values joined in one buffer, each field's place found by NumPy
    from the counts and widths (the aggregator's cold start reads 4 000 blocks)."""
    f, h = len(_BASE[part]), len(HELD_ROW) if part == ROWS else 0
    rows = sorted(rows, key=lambda r: (r[0], r[2]))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, f + h), np.int64)
    lengths = np.fromiter((len(r[3]) for r in rows), dtype=np.int64, count=len(rows))
    bad = (lengths % 8 != 0) | (lengths < 8)
    if bad.any():
        raise _malformed(rows, bad)
    lengths //= 8
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = np.frombuffer(b"".join(words(r[3]) for r in rows), dtype=DTYPE).astype(np.int64)
    n = flat[starts]
    bad = (n <= 0) | (n > BLOCK) | (lengths < 1 + 2 * n)
    if bad.any():
        raise _malformed(rows, bad)
    of = np.repeat(np.arange(len(rows)), n)  # each entity's row
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    rank = np.arange(len(of)) - first[of]  # its place in its row
    ids = flat[starts[of] + 1 + rank]
    widths = flat[starts[of] + 1 + n[of] + rank]
    wide = (widths == f + h) & (h > 0)
    blocks = np.array([r[2] for r in rows], dtype=np.int64)
    wrong = ((widths != f) & ~wide) | (block_of(ids) != blocks[of])
    wrong[1:] |= (of[1:] == of[:-1]) & (ids[1:] <= ids[:-1])  # ascending in its row
    bad = np.bincount(of[wrong], minlength=len(rows)) > 0
    bad |= lengths != 1 + (2 + f) * n + h * np.bincount(of[wide], minlength=len(rows))
    if bad.any():
        raise _malformed(rows, bad)
    # Each word's place in its row: count, ids, widths, fields (3), held rows (4); the fields
    # of all entities are then the words of place 3, in order, and so are the held rows.
    sizes = np.column_stack([np.ones_like(n), n, n, f * n, lengths - (1 + (2 + f) * n)])
    place = np.repeat(np.tile(np.arange(5, dtype=np.int8), len(rows)), sizes.ravel())
    values = np.full((len(of), f + h), -1, dtype=np.int64)
    values[:, :f] = flat[place == 3].reshape(-1, f)
    if h:
        values[wide, f:] = flat[place == 4].reshape(-1, h)
    scopes = np.array([r[0] for r in rows], dtype=np.int64)[of]
    return scopes, ids, values


def _malformed(
    rows: Sequence[tuple[int, int, int, bytes]], bad: npt.NDArray[np.bool_]
) -> ValueError:
    scope, part, block, _ = rows[int(np.argmax(bad))]
    return ValueError(
        f"usage_state row ({scope}, {part}, {block}) is not a block of entity values (and "
        f"{int(bad.sum()) - 1} more): the database and the code are at different migrations "
        "(run `metering db upgrade`)"
    )


def _rows(conn: Connection, where: str) -> list[tuple[int, int, int, bytes]]:
    # Identifiers and conditions come from the code, never from input.
    sql = f"SELECT scope, part, block, packed FROM usage_state WHERE {where}"  # noqa: S608
    if conn.dialect.name != "postgresql":
        return [(s, t, k, bytes(p)) for s, t, k, p in conn.exec_driver_sql(sql).all()]
    raw: Any = conn.connection.driver_connection
    with raw.cursor(binary=True) as cur:  # the values as they are stored, not in hex
        cur.execute(sql)
        return [(s, t, k, bytes(p)) for s, t, k, p in cur.fetchall()]


def select(conn: Connection, where: str = "TRUE") -> tuple[Ints, Ints, npt.NDArray[np.int64]]:
    """The entities in the ``usage_state`` rows that meet ``where`` (SQL on its scope and
    block, never its part): scopes, entity ids, and their values as one int64 matrix of
    ``FIELDS`` then ``HELD_ROW`` (a held start of -1 where an entity holds no row, and a
    minute start of -1 where its minute row has no counted second, as ``as_mapping`` reads
    them), in (scope, id) order."""
    scopes, ids, values = decode(_rows(conn, where))
    values[values[:, _AT["minute_peak"]] < 0, _AT["minute"]] = -1
    return scopes, ids, values


def packed_of(conn: Connection, scope: int, entity_id: int) -> bytes | None:
    """One entity's value as ``as_mapping`` reads it (``FIELDS``, then ``HELD_ROW`` if it
    holds a row), None if ``usage_state`` has none."""
    where = f"scope = {int(scope)} AND block = {int(entity_id) >> BLOCK_BITS}"
    _, ids, values = decode(_rows(conn, where))
    at = np.flatnonzero(ids == entity_id)
    if at.size:
        row = values[at[0]]
        out: bytes = row[: ALL if row[len(FIELDS)] >= 0 else len(FIELDS)].astype(DTYPE).tobytes()
        return out
    return None


def as_mapping(blob: bytes) -> dict[str, Any]:
    """One entity's fields by name (``FIELDS``, then ``HELD_ROW``), None where there is no
    such row (its start is -1: every field of the minute row or of the held row, or that
    unit's start)."""
    if len(blob) not in {WIDTH, HELD_WIDTH}:
        raise ValueError(
            f"a usage_state row holds {len(blob)} bytes, not {WIDTH} or {HELD_WIDTH}: the "
            "database and the code are at different migrations (run `metering db upgrade`)"
        )
    values = np.frombuffer(blob, dtype=DTYPE).tolist()
    out: dict[str, Any] = dict(zip((*FIELDS, *HELD_ROW), values, strict=False))
    out.update(dict.fromkeys(HELD_ROW[len(values) - len(FIELDS) :]))
    if out["minute"] < 0 or out["minute_peak"] < 0:
        out.update(dict.fromkeys(MINUTE_ROW))
    if out["held"] is not None and out["held"] < 0:
        out.update(dict.fromkeys(HELD_ROW))
    for unit in (*COARSER_STARTS, LAG):
        if out[unit] < 0:
            out[unit] = None
    return out


def pack(values: dict[str, int | None]) -> bytes:
    """One entity's packed value from its fields by name (None or absent: no such row; with
    a ``held`` start, the held row too)."""
    held = values.get("held") is not None
    row = np.zeros(len(FIELDS) + (len(HELD_ROW) if held else 0), dtype=DTYPE)
    for name in (*MINUTE_ROW[:1], "minute_peak", *COARSER_STARTS, LAG):
        row[_AT[name]] = -1
    for name, value in values.items():
        if value is not None:
            row[_AT[name]] = value
    return row.tobytes()
