"""One typed settings class, read from ``METERING_*`` environment variables."""

from __future__ import annotations

import functools
import os
from datetime import timedelta
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

EMBEDDED_REDIS_URL = "memory://"
# Variables of the test suite and tooling, not of the engine.
TEST_VARS = "METERING_TEST_"


# The duration settings that must be positive; the others are below them.
POSITIVE_DURATIONS = (
    "liveness_timeout", "flush_interval", "flush_min_interval", "tick_interval",
    "aggregate_interval", "retention_interval", "limits_refresh_interval",
    "alert_webhook_timeout", "smtp_timeout", "alert_retry_base", "alert_retry_max",
    "alert_sweep_interval", "admission_refresh_interval", "admission_stale_after",
    "billing_close_interval", "gateway_ws_ping_interval", "gateway_ws_ping_timeout",
)  # fmt: skip
OTHER_DURATIONS = (
    "registry_refresh_interval", "key_cache_ttl", "count_cache_ttl", "billing_grace",
)  # fmt: skip
UNITS = ("minute", "hour", "day", "month")  # retention_<unit>: empty keeps rows for ever


class Settings(BaseSettings):
    """Every setting of the engine. Durations accept seconds (``0.25``) or ISO 8601 (``PT3S``)."""

    model_config = SettingsConfigDict(env_prefix="METERING_", extra="forbid")

    database_url: str = "sqlite:///metering.db"
    # The primary Redis: global live counts, the app registry, the tick's state, Celery's broker.
    # ``memory://`` is the embedded in-process stand-in, good for one process only.
    redis_url: str = EMBEDDED_REDIS_URL
    # The datacenter this process runs in (a gateway writes its counts there).
    datacenter: str = "local"
    # Every datacenter's Redis, ``dc=url`` pairs separated by commas. Empty: one datacenter,
    # ``datacenter``, whose counts live in the primary Redis.
    datacenters: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # Prefix of every Redis key, so that several engines (or test runs) share one Redis.
    redis_prefix: str = "metering"

    liveness_timeout: timedelta = timedelta(seconds=3)
    flush_interval: timedelta = timedelta(milliseconds=250)
    flush_min_interval: timedelta = timedelta(milliseconds=20)
    tick_interval: timedelta = timedelta(seconds=1)
    # How many 1-second samples the live stream keeps for the rollups to read (an hour: an
    # entry holds what changed in its second, which for 100k busy apps is a few hundred KB).
    sample_retention: int = 3_600
    registry_refresh_interval: timedelta = timedelta(seconds=30)
    # How often the aggregator folds samples and message counters into the Postgres rollups.
    aggregate_interval: timedelta = timedelta(seconds=5)
    # At most this many 1-second samples per aggregation cycle (a cycle behind catches up
    # over several).
    aggregate_max_samples: int = 3_600
    # How long rollup rows are kept, per unit; empty: for ever.
    retention_minute: timedelta | None = timedelta(days=7)
    retention_hour: timedelta | None = timedelta(days=90)
    retention_day: timedelta | None = None
    retention_month: timedelta | None = None
    retention_interval: timedelta = timedelta(hours=1)
    # The previous month is closed (its invoices made final) once this long after it ended,
    # so that aggregates of its last seconds land first; checked every billing_close_interval.
    billing_grace: timedelta = timedelta(hours=1)
    billing_close_interval: timedelta = timedelta(minutes=5)
    key_cache_ttl: timedelta = timedelta(seconds=10)
    # How long the API reuses a live count it just read for the same app (0: never).
    count_cache_ttl: timedelta = timedelta(milliseconds=50)

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8001
    gateway_frontend_id: str = "gw-1"
    # A gateway pings each WebSocket client this often and closes it (1011) when the pong takes
    # longer than the timeout: a client gone without a word frees its slot.
    gateway_ws_ping_interval: timedelta = timedelta(seconds=20)
    gateway_ws_ping_timeout: timedelta = timedelta(seconds=20)
    max_message_bytes: int = 64 * 1024
    max_channel_length: int = 256
    max_channels_per_connection: int = 200

    # Package limits and staff alerts (metering/limits). An alert goes to each channel that is
    # set: a webhook (JSON, signed with HMAC-SHA256 over "<timestamp>.<body>") and e-mail.
    limits_refresh_interval: timedelta = timedelta(seconds=5)
    alert_webhook_url: str | None = None
    alert_webhook_secret: str | None = None
    alert_webhook_timeout: timedelta = timedelta(seconds=5)
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_timeout: timedelta = timedelta(seconds=10)
    alert_email_from: str = "metering@localhost"
    # Addresses separated by commas.
    alert_email_to: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A delivery that fails is tried again after alert_retry_base, doubling up to
    # alert_retry_max, at most alert_max_attempts times; then it is marked failed (and logged).
    alert_max_attempts: int = 8
    alert_retry_base: timedelta = timedelta(seconds=5)
    alert_retry_max: timedelta = timedelta(hours=1)
    # How often pending deliveries whose task was lost (a worker killed) are swept up.
    alert_sweep_interval: timedelta = timedelta(seconds=10)
    # Gateways: whether a gateway that cannot reach Redis (its admission copy older than
    # admission_stale_after) lets connections, attaches and messages in, and how often it
    # re-reads the copy without a notice.
    admission_fail_open: bool = True
    admission_refresh_interval: timedelta = timedelta(seconds=5)
    admission_stale_after: timedelta = timedelta(seconds=15)

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator(
        *POSITIVE_DURATIONS, *OTHER_DURATIONS, *(f"retention_{u}" for u in UNITS), mode="before"
    )
    @classmethod
    def _seconds(cls, value: object) -> object:
        # Plain numbers are seconds ("0.25"); anything else goes to pydantic (ISO 8601).
        if isinstance(value, str):
            if not value.strip():
                return None
            try:
                return timedelta(seconds=float(value))
            except ValueError:
                return value
        return value

    @field_validator("datacenters", mode="before")
    @classmethod
    def _parse_datacenters(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, url = item.partition("=")
            if not sep or not name.strip() or not url.strip():
                raise ValueError(f"expected dc=url pairs separated by commas, got {item!r}")
            pairs[_hash_tag_safe(name.strip())] = url.strip()
        return pairs

    @field_validator("alert_email_to", mode="before")
    @classmethod
    def _parse_addresses(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        addresses = [a.strip() for a in value.split(",") if a.strip()]
        for address in addresses:
            if "@" not in address or any(c.isspace() for c in address):
                raise ValueError(f"not an e-mail address: {address!r}")
        return addresses

    @field_validator("redis_prefix", "datacenter")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        return _hash_tag_safe(value)

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        # pydantic-settings ignores variables it does not know: a typo would go unnoticed.
        known = {f"METERING_{name.upper()}" for name in type(self).model_fields}
        unknown = sorted(
            name
            for name in os.environ
            if name.startswith("METERING_") and name not in known and not name.startswith(TEST_VARS)
        )
        if unknown:
            raise ValueError(f"unknown setting {', '.join(unknown)}")
        return self

    @model_validator(mode="after")
    def _durations_positive(self) -> Settings:
        for name in POSITIVE_DURATIONS:
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be positive")
        for unit in UNITS:
            kept = getattr(self, f"retention_{unit}")
            if kept is not None and kept <= timedelta(0):
                raise ValueError(f"retention_{unit} must be positive (empty keeps rows for ever)")
        if self.alert_webhook_url and not self.alert_webhook_secret:
            raise ValueError("alert_webhook_url needs alert_webhook_secret (the HMAC key)")
        if self.alert_email_to and not self.smtp_host:
            raise ValueError("alert_email_to needs smtp_host")
        if self.alert_max_attempts < 1:
            raise ValueError("alert_max_attempts must be at least 1")
        if self.aggregate_max_samples < 1:
            raise ValueError("aggregate_max_samples must be at least 1")
        if self.billing_grace < timedelta(0):
            raise ValueError("billing_grace must not be negative")
        if self.flush_interval >= self.liveness_timeout:
            raise ValueError("flush_interval must be shorter than liveness_timeout")
        return self

    @property
    def datacenter_urls(self) -> dict[str, str]:
        """Each datacenter and its Redis URL; by default this one, in the primary Redis."""
        return dict(self.datacenters) or {self.datacenter: self.redis_url}

    def datacenter_url(self, name: str) -> str:
        """The Redis of datacenter ``name``; an error for one the engine does not read.

        Counts written to a datacenter missing here would be read by no tick and no API.
        """
        urls = self.datacenter_urls
        if name not in urls:
            raise ValueError(
                f"datacenter {name!r} is not one the engine reads ({', '.join(sorted(urls))}); "
                "set METERING_DATACENTER, or list it in METERING_DATACENTERS"
            )
        return urls[name]

    @property
    def embedded(self) -> bool:
        return self.redis_url == EMBEDDED_REDIS_URL


def _hash_tag_safe(value: str) -> str:
    # Prefixes and datacenter names go inside a Redis Cluster hash tag, where braces and ':'
    # would change the slot.
    if not value or any(ch in value for ch in "{}: "):
        raise ValueError(f"{value!r} must be non-empty, without braces, colons or spaces")
    return value


@functools.cache
def get_settings() -> Settings:
    return Settings()
