"""Keep rules: restic-like buckets, never below the minimum, never a locked manifest; pack lock extension."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sysbackup_domain.keep import (
    RULE_DAILY,
    RULE_LOCKED,
    GcPolicy,
    KeepRules,
    ManifestTimes,
    lock_extension,
    select_kept,
)

NOW = datetime(2026, 11, 22, 0, 30, tzinfo=timezone.utc)
EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)


def manifest(number: int, created: datetime, locked_for: timedelta = timedelta(days=-1)) -> ManifestTimes:
    return ManifestTimes(f"m{number:05d}", created, NOW + locked_for)


@st.composite
def histories(draw: st.DrawFn) -> list[ManifestTimes]:
    """Manifests spread over ~3 years, some still locked (retain_until after NOW)."""
    offsets = draw(st.lists(st.integers(0, 3 * 365 * 24 * 3600), min_size=0, max_size=40, unique=True))
    result = []
    for number, offset in enumerate(offsets):
        created = EPOCH + timedelta(seconds=offset)
        lock_left = draw(st.integers(-400 * 86400, 5 * 86400))
        result.append(ManifestTimes(f"m{number:05d}", created, NOW + timedelta(seconds=lock_left)))
    return result


rules_strategy = st.builds(
    KeepRules,
    last=st.integers(0, 5),
    daily=st.integers(0, 10),
    weekly=st.integers(0, 6),
    monthly=st.integers(0, 13),
    yearly=st.integers(0, 4),
    minimum=st.integers(0, 8),
)


@given(histories(), rules_strategy)
def test_never_below_the_minimum_and_always_the_newest(
    history: list[ManifestTimes], rules: KeepRules
) -> None:
    kept = select_kept(history, rules, NOW)
    assert len(kept) >= min(rules.minimum, len(history))
    newest = sorted(history, key=lambda m: m.created, reverse=True)
    assert {m.manifest_id for m in newest[: max(rules.minimum, 1)]} <= set(kept)


@given(histories(), rules_strategy)
def test_never_forgets_a_manifest_still_locked(history: list[ManifestTimes], rules: KeepRules) -> None:
    kept = select_kept(history, rules, NOW)
    for m in history:
        if m.retain_until > NOW:
            assert RULE_LOCKED in kept[m.manifest_id]


@given(histories(), rules_strategy)
def test_applying_the_policy_again_forgets_nothing_more(
    history: list[ManifestTimes], rules: KeepRules
) -> None:
    kept = select_kept(history, rules, NOW)
    survivors = [m for m in history if m.manifest_id in kept]
    assert set(select_kept(survivors, rules, NOW)) == set(kept)


@given(histories(), rules_strategy, st.integers(0, 400 * 86400))
def test_later_runs_keep_a_subset(history: list[ManifestTimes], rules: KeepRules, later: int) -> None:
    """As time passes with no new manifest, nothing forgotten comes back."""
    now_kept = set(select_kept(history, rules, NOW))
    later_kept = set(select_kept(history, rules, NOW + timedelta(seconds=later)))
    assert later_kept <= now_kept


@given(
    histories(), rules_strategy, st.sampled_from(["last", "daily", "weekly", "monthly", "yearly", "minimum"])
)
def test_a_more_generous_rule_keeps_a_superset(
    history: list[ManifestTimes], rules: KeepRules, rule: str
) -> None:
    generous = KeepRules(**{**rules.__dict__, rule: getattr(rules, rule) + 1})
    assert set(select_kept(history, rules, NOW)) <= set(select_kept(history, generous, NOW))


def test_daily_keeps_the_newest_of_each_of_the_newest_days() -> None:
    day = datetime(2026, 11, 1, tzinfo=timezone.utc)
    history = [
        manifest(1, day + timedelta(hours=1)),
        manifest(2, day + timedelta(hours=20)),
        manifest(3, day + timedelta(days=1, hours=3)),
        manifest(4, day + timedelta(days=2, hours=1)),
        manifest(5, day + timedelta(days=2, hours=9)),
    ]
    rules = KeepRules(last=0, daily=2, weekly=0, monthly=0, yearly=0, minimum=0)
    kept = select_kept(history, rules, NOW)
    assert sorted(kept) == ["m00003", "m00005"]
    assert kept["m00003"] == [RULE_DAILY]


def test_yearly_reaches_back_over_years() -> None:
    history = [manifest(n, datetime(2020 + n, 6, 1, tzinfo=timezone.utc)) for n in range(5)]
    rules = KeepRules(last=0, daily=0, weekly=0, monthly=0, yearly=3, minimum=0)
    assert sorted(select_kept(history, rules, NOW)) == ["m00002", "m00003", "m00004"]


def test_no_manifests_keeps_nothing() -> None:
    assert select_kept([], KeepRules(), NOW) == {}


@pytest.mark.parametrize("bad", [-1, True, 1.5, "3"])
def test_bad_rules_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="daily"):
        KeepRules(daily=bad)  # type: ignore[arg-type]


def test_naive_times_are_refused() -> None:
    naive = ManifestTimes("m1", datetime(2026, 1, 1), datetime(2026, 2, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        select_kept([naive], KeepRules(), NOW)


def test_duplicate_ids_are_refused() -> None:
    one = manifest(1, NOW - timedelta(days=1))
    with pytest.raises(ValueError, match="unique"):
        select_kept([one, one], KeepRules(), NOW)


@settings(max_examples=200)
@given(
    st.integers(-(10**7), 10**7), st.one_of(st.none(), st.integers(-(10**7), 10**7)), st.integers(0, 10**6)
)
def test_lock_extension_only_grows_and_covers_the_need(
    required: int, current: int | None, window: int
) -> None:
    required_at = NOW + timedelta(seconds=required)
    current_at = None if current is None else NOW + timedelta(seconds=current)
    fold = timedelta(seconds=window)
    extended = lock_extension(required_at, current_at, fold)
    if current_at is not None and current_at >= required_at:
        assert extended is None
    else:
        assert extended == required_at + fold
        assert current_at is None or extended > current_at


def test_extension_happens_once_per_fold_window_for_daily_manifests() -> None:
    """Daily manifests locked 30 days each need a pack extension about once a week with a 7-day window."""
    fold = timedelta(days=7)
    lock: datetime | None = None
    extensions = 0
    for day in range(70):
        need = NOW + timedelta(days=day + 30)
        new_lock = lock_extension(need, lock, fold)
        if new_lock is not None:
            extensions += 1
            lock = new_lock
        assert lock is not None and lock >= need
    assert extensions == 9  # days 0, 8, 16, ...: every fold window + 1 day


@pytest.mark.parametrize(
    ("field", "value"), [("grace", timedelta(seconds=-1)), ("fold_window", 5), ("repack_live_ratio", 1.0)]
)
def test_bad_gc_policies_are_refused(field: str, value: object) -> None:
    arguments = {"keep": KeepRules(), "grace": timedelta(hours=1), "fold_window": timedelta(days=7)}
    with pytest.raises(ValueError, match=field):
        GcPolicy(**{**arguments, field: value})  # type: ignore[arg-type]
