"""Test-only retention in seconds: locks end at any instant, a host's longer request still counts."""

from datetime import datetime, timedelta, timezone

import pytest
from sysbackup_backend.errors import SettingsError
from sysbackup_backend.settings import load_settings
from sysbackup_domain.retention import RetentionPolicy, retain_until

NOW = datetime(2026, 11, 22, 0, 40, tzinfo=timezone.utc)
SHORT = RetentionPolicy(days_retained=30, max_days_retained=365, lock_mode="GOVERNANCE", retention_seconds=20)
BASE_ENV = {"BUCKET_NAME": "b", "BLOB_INDEX_TABLE": "i", "MANIFEST_TABLE": "m", "JOBS_TABLE": "j"}


def test_seconds_replace_the_stack_default() -> None:
    assert retain_until(NOW, SHORT, None) == NOW + timedelta(seconds=20)


@pytest.mark.parametrize(("requested", "days"), [(31, 31), (400, 365)])
def test_a_host_asking_for_longer_still_gets_its_days_capped(requested: int, days: int) -> None:
    assert retain_until(NOW, SHORT, requested) == NOW + timedelta(days=days)


@pytest.mark.parametrize("requested", [0, 2, 30])
def test_a_host_asking_for_the_default_or_less_gets_the_seconds(requested: int) -> None:
    assert retain_until(NOW, SHORT, requested) == NOW + timedelta(seconds=20)


@pytest.mark.parametrize("bad", [0, -5, True, 2.5])
def test_bad_seconds_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="retention_seconds"):
        RetentionPolicy(30, 365, "GOVERNANCE", retention_seconds=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("0", None), ("", None), ("15", 15)])
def test_settings_read_retention_seconds(raw: str | None, expected: int | None) -> None:
    env = BASE_ENV | ({"RETENTION_SECONDS": raw} if raw is not None else {})
    assert load_settings(env).retention.retention_seconds == expected


def test_settings_name_a_malformed_retention_seconds() -> None:
    with pytest.raises(SettingsError, match="RETENTION_SECONDS"):
        load_settings(BASE_ENV | {"RETENTION_SECONDS": "soon"})
