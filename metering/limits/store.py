"""The admission state mirrored to the primary Redis, and its pub/sub notices.

Postgres (``account_admission``) is the record; gateways read this copy. Keys are in the global
hash-tag group ``{<prefix>}``:

- ``{p}:admission`` (hash): account id -> ``"<connections hard> <channels hard> <month> <by>"``,
  ``-`` for none: what gateways enforce for the account (only accounts with something to
  enforce have a field).
- ``{p}:admission:live`` (hash): account id -> ``"<connections> <channels>"``: the live counts
  at the last tick of the enforced accounts within reach of a hard limit (at least half of it);
  an enforced account not listed is below half of each of its hard limits.
- ``{p}:admission:version`` (string): a new random value with every write of ``admission``,
  so that a reader re-reads the hash only when it changed (random, not a counter: a counter
  restarted by an emptied Redis would repeat a version a reader already holds).
- ``{p}:admission:notices`` (pub/sub channel): ``limits`` after ``admission`` changed,
  ``live`` after a tick rewrote ``admission:live``, and ``check <account> <sender>`` from a
  gateway that took the account near (or refused it at) a hard limit: the other gateways
  check that account with a fresh read instead of trusting their copy until the next tick.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from metering.core.redis import Redis
from metering.limits.repository import AdmissionRow

LIMITS_NOTICE = "limits"
LIVE_NOTICE = "live"
CHECK_NOTICE = "check"
_CHUNK = 10_000


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def encode_row(row: AdmissionRow) -> str:
    parts = (
        row.connections_hard,
        row.channels_hard,
        row.publish_blocked_month,
        row.publish_blocked_by,
    )
    return " ".join("-" if p is None else str(p) for p in parts)


def decode_row(value: Any) -> AdmissionRow:
    c, ch, month, by = _s(value).split(" ")
    return AdmissionRow(
        None if c == "-" else int(c),
        None if ch == "-" else int(ch),
        None if month == "-" else month,
        None if by == "-" else by,
    )


def _put(pipe: Any, key: str, keep: Mapping[str, str], drop: list[str]) -> None:
    """Queue setting ``keep`` and deleting ``drop`` in the hash ``key``, in bounded commands."""
    items = list(keep.items())
    for start in range(0, len(items), _CHUNK):
        pipe.hset(key, mapping=dict(items[start : start + _CHUNK]))
    for start in range(0, len(drop), _CHUNK):
        pipe.hdel(key, *drop[start : start + _CHUNK])


class AdmissionStore:
    def __init__(self, client: Redis, prefix: str) -> None:
        self.client = client
        self.key = f"{{{prefix}}}:admission"
        self.live_key = f"{{{prefix}}}:admission:live"
        self.notices = f"{{{prefix}}}:admission:notices"
        self.version_key = f"{{{prefix}}}:admission:version"

    def write(self, rows: Mapping[int, AdmissionRow], *, replace: bool = False) -> None:
        """Mirror the accounts' rows (an empty one removes the account), then notify; with
        ``replace``, ``rows`` is every account there is (the periodic sync heals an emptied
        or drifted copy)."""
        pipe = self.client.pipeline(transaction=True)
        keep = {str(a): encode_row(r) for a, r in rows.items() if not r.empty}
        drop = [str(a) for a, r in rows.items() if r.empty]
        if replace:
            drop += [k for k in map(_s, self.client.hkeys(self.key)) if k not in keep]
        _put(pipe, self.key, keep, drop)
        pipe.set(self.version_key, secrets.token_hex(8))
        pipe.publish(self.notices, LIMITS_NOTICE)
        pipe.execute()

    def read(self) -> dict[int, AdmissionRow]:
        return self.read_if_changed(None)[1] or {}

    def read_if_changed(self, known: str | None) -> tuple[str, dict[int, AdmissionRow] | None]:
        """The version, and the rows unless the version is still ``known`` (then None)."""
        raw = self.client.get(self.version_key)
        if known is not None and (raw is None or _s(raw) == known):
            # No version at all: Redis lost the copy (restarted empty). Its absence says
            # nothing about the limits; the last copy stands until the engine writes again.
            return known, None
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.version_key)
        pipe.hgetall(self.key)
        version_raw, rows = pipe.execute()
        version = "" if version_raw is None else _s(version_raw)
        return version, {int(_s(k)): decode_row(v) for k, v in rows.items()}

    def write_live(self, values: Mapping[int, tuple[int, int] | None]) -> None:
        """Set (or, for None, remove) accounts' live counts, then notify: gateways re-read."""
        pipe = self.client.pipeline(transaction=True)
        keep = {str(a): f"{v[0]} {v[1]}" for a, v in values.items() if v is not None}
        _put(pipe, self.live_key, keep, [str(a) for a, v in values.items() if v is None])
        pipe.publish(self.notices, LIVE_NOTICE)
        pipe.execute()

    def notify_check(self, account: int, sender: str) -> None:
        self.client.publish(self.notices, f"{CHECK_NOTICE} {account} {sender}")

    def read_live(self) -> dict[int, tuple[int, int]]:
        out = {}
        for k, v in self.client.hgetall(self.live_key).items():
            conns, channels = _s(v).split(" ")
            out[int(_s(k))] = (int(conns), int(channels))
        return out
