"""Creating accounts, apps and keys; authenticating keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy.orm import Session

from metering.accounts.models import PERMISSIONS, Account, ApiKey, App
from metering.accounts.repository import AccountRepository
from metering.accounts.schemas import AccountOut, AppOut, KeyCreated, KeyInfo
from metering.core.errors import NotFoundError, ValidationError

KEY_PREFIX = "mk_"
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _name(value: str, what: str) -> str:
    value = value.strip()
    if not value or len(value) > 200:
        raise ValidationError(f"{what} name must be 1 to 200 characters")
    return value


def create_account(session: Session, name: str) -> AccountOut:
    account = Account(name=_name(name, "account"))
    AccountRepository(session).add(account)
    return AccountOut.model_validate(account)


def create_app(session: Session, account_id: int, name: str) -> AppOut:
    repo = AccountRepository(session)
    if repo.account(account_id) is None:
        raise NotFoundError(f"account {account_id} does not exist", code="ACCOUNT_NOT_FOUND")
    app = App(account_id=account_id, name=_name(name, "app"))
    repo.add(app)
    return AppOut.model_validate(app)


def create_key(
    session: Session, app_id: int, permissions: list[str], label: str | None = None
) -> KeyCreated:
    repo = AccountRepository(session)
    app = repo.app(app_id)
    if app is None:
        raise NotFoundError(f"app {app_id} does not exist", code="APP_NOT_FOUND")
    unknown = sorted(set(permissions) - set(PERMISSIONS))
    if unknown:
        raise ValidationError(
            f"unknown permission {', '.join(unknown)}; choose from {', '.join(PERMISSIONS)}"
        )
    if not permissions:
        raise ValidationError("a key needs at least one permission")
    perms = sorted(set(permissions))
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        app_id=app.id,
        key_hash=digest(plaintext),
        key_prefix=plaintext[:10],
        permissions=" ".join(perms),
        label=label,
    )
    repo.add(key)
    return KeyCreated(
        id=key.id,
        app_id=app.id,
        account_id=app.account_id,
        permissions=perms,
        label=label,
        key_prefix=key.key_prefix,
        key=plaintext,
        created_at=key.created_at,
    )


def authenticate(session: Session, key: str) -> KeyInfo | None:
    """The key's app and permissions, or None for an unknown or revoked key.

    The lookup is by SHA-256 digest, so how long it takes says nothing about how close a guess
    was; the final comparison is constant-time as well.
    """
    wanted = digest(key)
    found = AccountRepository(session).key_by_hash(wanted)
    stored = found[0].key_hash if found else _DUMMY_DIGEST
    if not hmac.compare_digest(stored, wanted) or found is None:
        return None
    api_key, app = found
    return KeyInfo(
        key_id=api_key.id,
        app_id=app.id,
        account_id=app.account_id,
        permissions=frozenset(api_key.permissions.split()),
    )


def app_owners(session: Session) -> dict[int, int]:
    return AccountRepository(session).app_owners()
