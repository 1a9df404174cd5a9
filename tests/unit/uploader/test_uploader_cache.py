"""The parent cache: when a file may be trusted unread, atomic updates, and the one-run-at-a-time lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_sysbackup.cache import (
    RACY_WINDOW_NS,
    ArchiveLock,
    CachedFile,
    CacheLockedError,
    FileState,
    ParentCache,
    host_state_dir,
)

SECOND = 1_000_000_000
STATE = FileState(size=10, mtime_ns=100 * SECOND, ctime_ns=100 * SECOND, inode=42)
SCANNED = 200 * SECOND


@pytest.mark.parametrize(
    ("current", "reusable"),
    [
        (STATE, True),
        (FileState(11, STATE.mtime_ns, STATE.ctime_ns, 42), False),  # size
        (FileState(10, STATE.mtime_ns + 1, STATE.ctime_ns, 42), False),  # mtime
        (FileState(10, STATE.mtime_ns, STATE.ctime_ns + 1, 42), False),  # ctime (chmod, xattr, rename over)
        (FileState(10, STATE.mtime_ns, STATE.ctime_ns, 43), False),  # inode (replaced file)
    ],
)
def test_reuse_needs_identical_stat(current: FileState, reusable: bool):
    assert CachedFile(STATE, ("a" * 64,), SCANNED).reusable_for(current) is reusable


def test_a_file_modified_just_before_the_scan_is_read_again():
    racy = FileState(10, SCANNED - RACY_WINDOW_NS // 2, SCANNED - RACY_WINDOW_NS // 2, 42)
    assert not CachedFile(racy, (), SCANNED).reusable_for(racy)
    settled = FileState(10, SCANNED - 2 * RACY_WINDOW_NS, SCANNED - 2 * RACY_WINDOW_NS, 42)
    assert CachedFile(settled, (), SCANNED).reusable_for(settled)


def test_record_commit_replaces_the_whole_view(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="https://api.one")
    cache.record_commit("m1", [("/a", STATE, ("1" * 64,)), ("/gone", STATE, ())], SCANNED, {"1" * 64})
    cache.record_commit("m2", [("/a", STATE, ("2" * 64,))], SCANNED, {"2" * 64})
    assert cache.parent_manifest == "m2"
    assert cache.lookup("/gone") is None
    cached = cache.lookup("/a")
    assert cached is not None and cached.content == ("2" * 64,) and cached.state == STATE
    assert cache.all_stored() == {"2" * 64}  # only what the parent references is vouched for


def test_non_utf8_paths_round_trip(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    odd = os.fsdecode(b"/data/latin1-\xe9\nnewline")
    cache.record_commit("m1", [(odd, STATE, ())], SCANNED, ())
    assert cache.lookup(odd) is not None


def test_another_stack_starts_from_scratch(tmp_path: Path):
    ParentCache(tmp_path, scope="https://api.one").record_commit(
        "m1", [("/a", STATE, ())], SCANNED, {"1" * 64}
    )
    other = ParentCache(tmp_path, scope="https://api.two")
    assert other.parent_manifest is None and other.lookup("/a") is None and other.all_stored() == set()


def test_uncommitted_run_leaves_the_last_good_state(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    cache.record_commit("m1", [("/a", STATE, ())], SCANNED, ())
    cache.mark_inflight("run-2")  # a run that crashes after this never calls record_commit
    reopened = ParentCache(tmp_path, scope="s")
    assert reopened.parent_manifest == "m1" and reopened.inflight_run == "run-2"
    assert reopened.lookup("/a") is not None


def test_two_archive_runs_cannot_overlap(tmp_path: Path):
    with ArchiveLock(tmp_path), pytest.raises(CacheLockedError, match="in progress"), ArchiveLock(tmp_path):
        pass
    with ArchiveLock(tmp_path):  # released on exit
        pass


def test_each_host_config_has_its_own_state(tmp_path: Path):
    web = host_state_dir(tmp_path, "https://api", tmp_path / "web")
    assert web == host_state_dir(tmp_path, "https://api", tmp_path / "web")
    assert web != host_state_dir(tmp_path, "https://api", tmp_path / "db")
    assert web != host_state_dir(tmp_path, "https://other-api", tmp_path / "web")
    with ArchiveLock(web), ArchiveLock(host_state_dir(tmp_path, "https://api", tmp_path / "db")):
        pass  # different hosts may archive at the same time


def test_record_commit_keeps_reused_rows_as_they_were(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    other = FileState(20, STATE.mtime_ns, STATE.ctime_ns, 43)
    cache.record_commit(
        "m1",
        [("/kept", STATE, ("1" * 64,)), ("/reread", STATE, ()), ("/gone", STATE, ())],
        SCANNED,
        {"1" * 64},
    )
    later = SCANNED + 10 * SECOND
    cache.record_commit("m2", [("/reread", other, ("2" * 64,))], later, {"1" * 64, "2" * 64}, kept=["/kept"])
    kept, reread = cache.lookup("/kept"), cache.lookup("/reread")
    assert kept == CachedFile(STATE, ("1" * 64,), SCANNED)  # untouched, read-time included
    assert reread == CachedFile(other, ("2" * 64,), later)
    assert cache.lookup("/gone") is None
    assert cache.all_stored() == {"1" * 64, "2" * 64}
    cache.record_commit("m3", [], later, {"2" * 64}, kept=["/reread"])
    assert cache.lookup("/kept") is None and cache.all_stored() == {"2" * 64}
    assert cache.parent_manifest == "m3"


def test_unfinished_packs_outlive_a_crash_and_go_with_the_next_commit(tmp_path: Path):
    crashed = ParentCache(tmp_path, scope="https://api.one")
    assert crashed.unfinished_packs() == []  # a fresh cache: nothing to adopt, no request
    crashed.add_unfinished_packs(["b" * 64, "a" * 64])
    crashed.add_unfinished_packs(["a" * 64])
    crashed.close()  # the process dies here

    rerun = ParentCache(tmp_path, scope="https://api.one")
    assert rerun.unfinished_packs() == ["a" * 64, "b" * 64]
    rerun.record_commit("m1", [], SCANNED, ())
    assert rerun.unfinished_packs() == []
    rerun.add_unfinished_packs(["c" * 64])
    assert ParentCache(tmp_path, scope="https://api.two").unfinished_packs() == []  # another stack
