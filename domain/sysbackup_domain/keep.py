"""Keep rules ("time folding") and the gc policy: which manifests a host keeps, how packs stay locked.

Like restic's `forget`: the newest `last` manifests are kept, and for each of the newest `daily` days (weeks,
months, years) that have a manifest, the newest manifest of that day. On top, and unlike restic, two rules gc
can never break: the newest `minimum` manifests are always kept (backup-my-bucket's MinimumRedundancy), and a
manifest still under its Object Lock (retain_until in the future) is never forgotten. All times are UTC.

Pack locks follow the manifests that use them: a pack must stay locked until at least the latest retain_until
of any manifest using it. Extending a lock costs one request per pack, so an extension goes `fold_window`
beyond what is needed: a pack used by a daily backup is extended about once per fold window, not daily.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

RULE_LAST = "last"
RULE_DAILY = "daily"
RULE_WEEKLY = "weekly"
RULE_MONTHLY = "monthly"
RULE_YEARLY = "yearly"
RULE_MINIMUM = "minimum"
RULE_LOCKED = "locked"
RULE_HEAD = "head"


@dataclass(frozen=True)
class KeepRules:
    last: int = 1
    daily: int = 7
    weekly: int = 5
    monthly: int = 12
    yearly: int = 3
    minimum: int = 3

    def __post_init__(self) -> None:
        for rule in fields(self):
            value = getattr(self, rule.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"keep rule {rule.name} must be a whole number >= 0, got {value!r}")


@dataclass(frozen=True)
class GcPolicy:
    keep: KeepRules
    # Condemned blobs wait this long before their packs may go: longer than any commit in flight can take.
    grace: timedelta
    # A pack lock is extended this far past what its manifests need, so it is extended once per window.
    fold_window: timedelta
    # A pack whose live bytes are at most this share of its size is rewritten (repacked).
    repack_live_ratio: float = 0.25
    # GOVERNANCE locks of dead packs are bypassed (gc's role only) instead of waiting for them to lapse.
    bypass_governance: bool = False

    def __post_init__(self) -> None:
        for name in ("grace", "fold_window"):
            value = getattr(self, name)
            if not isinstance(value, timedelta) or value < timedelta(0):
                raise ValueError(f"{name} must be a non-negative timedelta, got {value!r}")
        if not 0.0 <= self.repack_live_ratio < 1.0:
            raise ValueError(f"repack_live_ratio must be in [0, 1), got {self.repack_live_ratio!r}")


@dataclass(frozen=True)
class ManifestTimes:
    """What the keep rules look at: a manifest's id, creation and lock end (aware datetimes)."""

    manifest_id: str
    created: datetime
    retain_until: datetime


def _day(dt: datetime) -> tuple[int, ...]:
    return (dt.year, dt.month, dt.day)


def _week(dt: datetime) -> tuple[int, ...]:
    iso = dt.isocalendar()
    return (iso.year, iso.week)


def _month(dt: datetime) -> tuple[int, ...]:
    return (dt.year, dt.month)


def _year(dt: datetime) -> tuple[int, ...]:
    return (dt.year,)


_BUCKETED_RULES: tuple[tuple[str, Callable[[datetime], tuple[int, ...]]], ...] = (
    (RULE_DAILY, _day),
    (RULE_WEEKLY, _week),
    (RULE_MONTHLY, _month),
    (RULE_YEARLY, _year),
)


def _require_aware(dt: datetime, what: str) -> None:
    if not isinstance(dt, datetime) or dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{what} must be a timezone-aware datetime, got {dt!r}")


def select_kept(manifests: Iterable[ManifestTimes], rules: KeepRules, now: datetime) -> dict[str, list[str]]:
    """The manifests to keep, each with the rules that keep it; every other one may be forgotten.

    The newest manifest (the host's head, the next commit's parent) is always kept.
    """
    _require_aware(now, "now")
    listed = list(manifests)
    for manifest in listed:
        _require_aware(manifest.created, f"created of {manifest.manifest_id}")
        _require_aware(manifest.retain_until, f"retain_until of {manifest.manifest_id}")
    if len({m.manifest_id for m in listed}) != len(listed):
        raise ValueError("manifest ids must be unique")
    newest_first = sorted(listed, key=lambda m: (m.created, m.manifest_id), reverse=True)
    reasons: dict[str, list[str]] = {}

    def keep(manifest: ManifestTimes, reason: str) -> None:
        reasons.setdefault(manifest.manifest_id, []).append(reason)

    for position, manifest in enumerate(newest_first):
        if position == 0:
            keep(manifest, RULE_HEAD)
        if position < rules.last:
            keep(manifest, RULE_LAST)
        if position < rules.minimum:
            keep(manifest, RULE_MINIMUM)
        if manifest.retain_until > now:
            keep(manifest, RULE_LOCKED)
    for rule, bucket_of in _BUCKETED_RULES:
        wanted = getattr(rules, rule)
        seen: set[tuple[int, ...]] = set()
        for manifest in newest_first:
            if len(seen) >= wanted:
                break
            bucket = bucket_of(manifest.created)
            if bucket not in seen:
                seen.add(bucket)
                keep(manifest, rule)
    return reasons


def lock_extension(
    required_until: datetime, current_until: datetime | None, fold_window: timedelta
) -> datetime | None:
    """The new lock end for a pack whose manifests need `required_until`, or None if its lock suffices.

    Locks only grow: a sufficient lock is left alone, an insufficient one goes `fold_window` past the need.
    """
    _require_aware(required_until, "required_until")
    if current_until is not None:
        _require_aware(current_until, "current_until")
        if current_until >= required_until:
            return None
    return required_until + fold_window
