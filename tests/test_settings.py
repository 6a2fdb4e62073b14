"""Settings come from METERING_* variables; typos and nonsense are refused, not swallowed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from metering.core.settings import Settings


def test_defaults_are_the_embedded_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("METERING_DATABASE_URL", "METERING_REDIS_URL", "METERING_DATACENTERS"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.database_url == "sqlite:///metering.db"
    assert settings.embedded
    assert settings.liveness_timeout == timedelta(seconds=3)
    assert settings.datacenter_urls == {settings.datacenter: "memory://"}


def test_datacenters_and_durations_parse_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("METERING_DATACENTERS", "eu=redis://a:6379/0, us=redis://b:6379/0")
    monkeypatch.setenv("METERING_LIVENESS_TIMEOUT", "5")
    monkeypatch.setenv("METERING_FLUSH_INTERVAL", "PT0.5S")
    settings = Settings()
    assert settings.datacenter_urls == {"eu": "redis://a:6379/0", "us": "redis://b:6379/0"}
    assert settings.liveness_timeout == timedelta(seconds=5)
    assert settings.flush_interval == timedelta(milliseconds=500)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("METERING_DATACENTERS", "eu"),
        ("METERING_DATACENTERS", "e:u=redis://a:6379/0"),
        ("METERING_DATACENTER", "dc:1"),
        ("METERING_REDIS_PREFIX", "a{b}"),
        ("METERING_LIVENESS_TIMEOUT", "-1"),
        ("METERING_FLUSH_INTERVAL", "10"),  # not shorter than the liveness timeout
        ("METERING_TICK_INTERVAL", "soon"),
    ],
)
def test_nonsense_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_an_unknown_setting_is_a_typo_not_ignored() -> None:
    with pytest.raises(ValidationError):
        Settings(liveness_timout=timedelta(seconds=1))  # type: ignore[call-arg]


def test_an_unknown_metering_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_LIVENESS_TIMOUT", "1")
    with pytest.raises(ValidationError, match="METERING_LIVENESS_TIMOUT"):
        Settings()
