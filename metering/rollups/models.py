"""Postgres tables of the rollups.

Times here are whole seconds since the Unix epoch (UTC), as the 1-second samples count them.

The design writes only what changed (see ``docs/rollups.md``):

- ``usage_state`` holds, per app and per account, the value held now and running totals since
  the entity was first seen: the time integral of connections and channels (``area``: one
  connection for one counted second is 1) and the cumulative counters; with them its latest
  minute row and where its latest hour, day and month rows start. All of it in one packed
  value, 64 entities of a scope to a row (``metering.rollups.state``): a busy entity's value
  is rewritten every cycle, and on Postgres a rewrite costs per column and per row written.
  A block none of whose entities changed costs nothing: its values carry forward.
- ``usage_rollups`` holds one row per period in which something happened to the entity: the
  values carried in at the period's start (``*0``), the running totals at its start, and the
  extremes. A period's sums are the difference of the running totals at its two ends, so a
  busy app writes its state row each cycle, its minute row once, when the minute is over
  (the latest minute row is part of the state row until then, and a closed one for up to
  55 s more), and its hour, day and month rows at most once a minute, when the minute rows
  that changed them leave the state row (until then the reads widen them with those:
  ``fold.Book``).
- ``usage_cursor`` is the aggregator's watermark: the last sample second folded, the cycle
  number, and each datacenter's counter cursor. It is written in the transaction that writes
  the rollups, so a cycle counts everything once or not at all.
- ``usage_marks`` holds, per frontend incarnation, the cumulative counter totals already
  applied (DESIGN.md invariant 3): the next cycle applies only the difference.
- ``usage_gaps`` lists the seconds no tick counted (a paused worker), so a mean covers only
  the seconds that were counted.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from metering.core.database import Base

# Columns of the running totals, in one order everywhere (state, rows' start values, marks).
# ``refused``, ``ch_refused`` and ``msg_refused`` are what enforcement refused: connections,
# channel attaches and messages.
COUNTERS = (
    "opened", "refused", "ch_opened", "pub_n", "pub_b", "del_n", "del_b", "ch_refused",
    "msg_refused",
)  # fmt: skip
# The counters a frontend reports per incarnation, in the order of its packed value
# (docs/redis-keys.md; ``ch_opened`` comes from the samples).
FRONTEND_COUNTERS = (
    "opened", "refused", "pub_n", "pub_b", "del_n", "del_b", "ch_refused", "msg_refused",
)  # fmt: skip


class UsageCursor(Base):
    __tablename__ = "usage_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The last sample second folded into the rollups (None: nothing yet).
    second: Mapped[int | None] = mapped_column(BigInteger)
    # The first second ever counted: nothing before it is covered.
    first_second: Mapped[int | None] = mapped_column(BigInteger)
    cycle: Mapped[int] = mapped_column(BigInteger, default=0)
    # JSON: datacenter -> [epoch, counter sequence read up to].
    counter_cursors: Mapped[str] = mapped_column(Text, default="{}")
    # JSON: unit code -> the second before which the retention task deleted that unit's rows.
    horizons: Mapped[str] = mapped_column(Text, default="{}")


class UsageGap(Base):
    __tablename__ = "usage_gaps"

    # A counted second that came ``missed`` seconds after the previous counted one plus one.
    second: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    missed: Mapped[int] = mapped_column(BigInteger)


class UsageState(Base):
    """What the aggregator knows of each app and account: its state, its latest minute row
    and where its latest hour, day and month rows start, packed, 64 entities of a scope to a
    row, in two parts: what changes whenever the entity does, and what changes only when a row
    begins or a held row comes or goes (``metering.rollups.state``; migrations 0012, 0014
    and 0015: stored as byte planes, compressed with lz4)."""

    __tablename__ = "usage_state"

    scope: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    # Which part of the entities' values: ``state.NOW`` or ``state.ROWS``.
    part: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    # The entities' ids shifted right by ``state.BLOCK_BITS``.
    block: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    packed: Mapped[bytes] = mapped_column(LargeBinary)


class UsageRollup(Base):
    __tablename__ = "usage_rollups"

    scope: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    entity_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    unit: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    period_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # Carried in: the values held when the period started.
    conns0: Mapped[int] = mapped_column(BigInteger)
    ws0: Mapped[int] = mapped_column(BigInteger)
    channels0: Mapped[int] = mapped_column(BigInteger)
    # Running totals at the period's start.
    area0: Mapped[int] = mapped_column(BigInteger)
    ch_area0: Mapped[int] = mapped_column(BigInteger)
    opened0: Mapped[int] = mapped_column(BigInteger)
    refused0: Mapped[int] = mapped_column(BigInteger)
    ch_opened0: Mapped[int] = mapped_column(BigInteger)
    pub_n0: Mapped[int] = mapped_column(BigInteger)
    pub_b0: Mapped[int] = mapped_column(BigInteger)
    del_n0: Mapped[int] = mapped_column(BigInteger)
    del_b0: Mapped[int] = mapped_column(BigInteger)
    ch_refused0: Mapped[int] = mapped_column(BigInteger)
    msg_refused0: Mapped[int] = mapped_column(BigInteger)
    # Extremes over the period's counted seconds so far.
    peak: Mapped[int] = mapped_column(BigInteger)
    peak_at: Mapped[int] = mapped_column(BigInteger)
    min: Mapped[int] = mapped_column(BigInteger)
    ws_peak: Mapped[int] = mapped_column(BigInteger)
    ch_peak: Mapped[int] = mapped_column(BigInteger)
    ch_min: Mapped[int] = mapped_column(BigInteger)

    # The retention task deletes by unit and age.
    __table_args__ = (Index("ix_usage_rollups_unit_period_start", "unit", "period_start"),)


class UsageMark(Base):
    __tablename__ = "usage_marks"

    datacenter: Mapped[str] = mapped_column(String(100), primary_key=True)
    incarnation: Mapped[str] = mapped_column(String(200), primary_key=True)
    # The totals already applied (``metering.rollups.marks``): per app, sorted by app, its id
    # and its FRONTEND_COUNTERS totals, as little-endian int64.
    packed: Mapped[bytes] = mapped_column(LargeBinary)
    # The incarnation was reaped and its final totals applied: its Redis counters can go.
    retired: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the marks last changed (seconds), for the retention task.
    updated: Mapped[int] = mapped_column(BigInteger)
