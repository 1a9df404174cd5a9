"""Retention: how long S3 Object Lock holds a manifest and its packs.

The stack holds the policy; a host may ask for longer, never shorter, and never beyond the stack's
maximum. All times are server times in UTC. Keep rules and pack lock extension ("time folding") are in
keep.py.
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")

_ISO_UTC_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_ISO_UTC_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


@dataclass(frozen=True)
class RetentionPolicy:
    days_retained: int
    max_days_retained: int
    lock_mode: str
    # Tests only (template parameter TestRetentionSeconds): locks last this many seconds instead of
    # days_retained days, so no test waits for days. A host asking for more than days_retained still
    # gets its days (capped at the maximum).
    retention_seconds: int | None = None

    def __post_init__(self) -> None:
        if self.retention_seconds is not None and (
            not isinstance(self.retention_seconds, int)
            or isinstance(self.retention_seconds, bool)
            or self.retention_seconds < 1
        ):
            raise ValueError(
                f"retention_seconds must be a positive whole number, got {self.retention_seconds!r}"
            )
        for field_name in ("days_retained", "max_days_retained"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field_name} must be a positive whole number of days, got {value!r}")
        if self.max_days_retained < self.days_retained:
            raise ValueError(
                f"max_days_retained ({self.max_days_retained}) is below days_retained ({self.days_retained})"
            )
        if self.lock_mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {', '.join(LOCK_MODES)}, got {self.lock_mode!r}")


def retained_days(policy: RetentionPolicy, requested_days: int | None) -> int:
    """Days to keep: the policy's, or the host's request if longer, capped at the policy's maximum."""
    if requested_days is None:
        return policy.days_retained
    if not isinstance(requested_days, int) or isinstance(requested_days, bool):
        raise ValueError(f"days_retained must be a whole number of days, got {requested_days!r}")
    if requested_days < 0:
        raise ValueError(f"days_retained cannot be negative, got {requested_days}")
    return min(max(requested_days, policy.days_retained), policy.max_days_retained)


def retain_until(now: datetime, policy: RetentionPolicy, requested_days: int | None) -> datetime:
    """The lock's end (UTC, whole seconds rounded up so the lock is never shorter than promised)."""
    period = timedelta(days=retained_days(policy, requested_days))
    asks_for_longer = requested_days is not None and requested_days > policy.days_retained
    if policy.retention_seconds is not None and not asks_for_longer:
        period = timedelta(seconds=policy.retention_seconds)
    end = _require_aware(now, "now").astimezone(timezone.utc) + period
    if end.microsecond:
        end = end.replace(microsecond=0) + timedelta(seconds=1)
    return end


def iso_utc(dt: datetime) -> str:
    """ "2026-11-21T23:50:00Z", the form S3 lock headers accept. Sub-second parts are dropped."""
    return _require_aware(dt, "dt").astimezone(timezone.utc).strftime(_ISO_UTC_FORMAT)


def parse_iso_utc(text: str) -> datetime:
    """Inverse of iso_utc, strict: exactly "YYYY-MM-DDTHH:MM:SSZ"."""
    if not isinstance(text, str) or _ISO_UTC_RE.fullmatch(text) is None:
        raise ValueError(f"expected a UTC time like 2026-11-21T23:50:00Z, got {text!r:.60}")
    return datetime.strptime(text, _ISO_UTC_FORMAT).replace(tzinfo=timezone.utc)


def _require_aware(dt: datetime, name: str) -> datetime:
    if not isinstance(dt, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (a naive time is ambiguous): {dt!r}")
    return dt
