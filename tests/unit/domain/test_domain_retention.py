"""Retention: a host may ask for longer, never shorter, capped at the stack's maximum."""

from datetime import datetime, timedelta, timezone

import pytest
from sysbackup_domain.retention import RetentionPolicy, iso_utc, parse_iso_utc, retain_until

POLICY = RetentionPolicy(days_retained=30, max_days_retained=365, lock_mode="GOVERNANCE")
NOW = datetime(2026, 11, 21, 23, 50, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("requested", "expected_days"),
    [(None, 30), (0, 30), (10, 30), (30, 30), (31, 31), (365, 365), (366, 365), (100_000, 365)],
)
def test_host_may_ask_for_longer_never_shorter_and_is_capped(
    requested: int | None, expected_days: int
) -> None:
    assert retain_until(NOW, POLICY, requested) == NOW + timedelta(days=expected_days)


def test_sub_second_now_rounds_up_so_the_lock_is_never_short() -> None:
    now = NOW + timedelta(microseconds=1)
    until = retain_until(now, POLICY, None)
    assert until.microsecond == 0
    assert until >= now + timedelta(days=30)
    assert until - (now + timedelta(days=30)) < timedelta(seconds=1)


def test_result_is_utc_whatever_the_input_zone() -> None:
    elsewhere = NOW.astimezone(timezone(timedelta(hours=-7)))
    until = retain_until(elsewhere, POLICY, None)
    assert until.utcoffset() == timedelta(0)
    assert iso_utc(until) == "2026-12-21T23:50:00Z"


@pytest.mark.parametrize(
    ("requested", "message"), [(-1, "negative"), ("30", "whole number"), (True, "whole number")]
)
def test_nonsense_requests_are_refused(requested: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        retain_until(NOW, POLICY, requested)  # type: ignore[arg-type]


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        retain_until(datetime(2026, 11, 21), POLICY, None)


@pytest.mark.parametrize(
    ("days", "max_days", "mode", "message"),
    [
        (0, 10, "GOVERNANCE", "days_retained"),
        (30, 10, "GOVERNANCE", "below"),
        (30, 40, "LEGAL_HOLD", "lock_mode"),
        (30, 40.5, "COMPLIANCE", "max_days_retained"),
    ],
)
def test_bad_policies_are_refused(days: object, max_days: object, mode: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetentionPolicy(days, max_days, mode)  # type: ignore[arg-type]


def test_iso_utc_round_trip() -> None:
    assert iso_utc(NOW) == "2026-11-21T23:50:00Z"
    assert parse_iso_utc("2026-11-21T23:50:00Z") == NOW
    for bad in ("2026-11-21T23:50:00", "2026-11-21T23:50:00+00:00", "21/11/2026", ""):
        with pytest.raises(ValueError, match="UTC time"):
            parse_iso_utc(bad)
    with pytest.raises(ValueError, match="timezone-aware"):
        iso_utc(datetime(2026, 1, 1))
