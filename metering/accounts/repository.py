"""All SQL of accounts, apps and keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from metering.accounts.models import Account, ApiKey, App
from metering.core.ids import is_id


class AccountRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, obj: Account | App | ApiKey) -> None:
        self.session.add(obj)
        self.session.flush()

    def account(self, account_id: int) -> Account | None:
        return self.session.get(Account, account_id) if is_id(account_id) else None

    def app(self, app_id: int) -> App | None:
        return self.session.get(App, app_id) if is_id(app_id) else None

    def accounts(self) -> list[Account]:
        return list(self.session.scalars(select(Account).order_by(Account.id)))

    def apps(self, account_id: int | None = None) -> list[App]:
        query = select(App).order_by(App.id)
        if account_id is not None:
            query = query.where(App.account_id == account_id)
        return list(self.session.scalars(query))

    def app_owners(self) -> dict[int, int]:
        rows = self.session.execute(select(App.id, App.account_id)).all()
        return {row.id: row.account_id for row in rows}

    def key_by_hash(self, key_hash: str) -> tuple[ApiKey, App] | None:
        row = self.session.execute(
            select(ApiKey, App)
            .join(App, App.id == ApiKey.app_id)
            .where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        ).first()
        return (row[0], row[1]) if row else None
