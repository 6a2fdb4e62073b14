"""Imports every model module, so the metadata is whole (for Alembic and the model check).

Here and not in ``metering``: ``billing`` imports ``metering``, never the reverse.
"""

from __future__ import annotations


def import_all_models() -> None:
    import billing.models  # noqa: F401, PLC0415
    import metering.accounts.models  # noqa: PLC0415
    import metering.limits.models  # noqa: PLC0415
    import metering.rollups.models  # noqa: F401, PLC0415
