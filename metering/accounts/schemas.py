"""What accounts, apps and keys look like to API and CLI users (camelCase JSON)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class Schema(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, from_attributes=True)


class AccountOut(Schema):
    id: int
    name: str
    package_id: int | None
    created_at: datetime


class AppOut(Schema):
    id: int
    account_id: int
    name: str
    created_at: datetime


class KeyCreated(Schema):
    id: int
    app_id: int
    account_id: int
    permissions: list[str]
    label: str | None
    key_prefix: str
    # Shown once: only its digest is stored.
    key: str
    created_at: datetime


class KeyInfo(Schema):
    """What an authenticated request knows about its key."""

    key_id: int
    app_id: int
    account_id: int
    permissions: frozenset[str]
