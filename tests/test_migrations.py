"""The migrations build exactly the models' schema, on Postgres and on SQLite, and unwind."""

from __future__ import annotations

import re
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from metering.core.database import Base
from metering.core.migrate import alembic_config, upgrade
from migrations.metadata import import_all_models

# On Postgres ``usage_rollups`` is partitioned (migration 0003, metering/rollups/partitions.py):
# the inspector lists its partitions as tables of their own, which no model describes. These
# names, and only these, are left out; the partitioned table itself is compared like any other.
PARTITIONS = re.compile(
    r"usage_rollups_minute(_\d{8}|_default)?|usage_rollups_hour(_\d{6}|_default)?"
    r"|usage_rollups_(day|month)"
)


# The model's (unit, period_start) index of usage_rollups is, on Postgres, on each partition
# but the daily ones of minute rows, not on the partitioned parent (migration 0011).
PARTITION_INDEX = "ix_usage_rollups_unit_period_start"


def _not_a_partition(name: str | None, type_: str, _parents: object) -> bool:
    return not (type_ == "table" and name is not None and PARTITIONS.fullmatch(name))


def _not_the_partition_index(
    _obj: object, name: str | None, type_: str, _reflected: bool, _compare_to: object
) -> bool:
    return not (type_ == "index" and name == PARTITION_INDEX)


def _diff(url: str) -> list[object]:
    import_all_models()
    engine = create_engine(url)
    with engine.connect() as conn:
        opts: dict[str, object] = {"compare_type": True, "include_name": _not_a_partition}
        if conn.dialect.name == "postgresql":
            opts["include_object"] = _not_the_partition_index
        context = MigrationContext.configure(conn, opts=opts)
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return list(diff)


def test_postgres_schema_from_migrations_matches_the_models(database_url: str) -> None:
    assert _diff(database_url) == []


def test_sqlite_schema_from_migrations_matches_the_models_and_unwinds(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    assert _diff(url) == []
    command.downgrade(alembic_config(url), "base")
    engine = create_engine(url)
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    engine.dispose()
