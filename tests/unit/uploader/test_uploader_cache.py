"""The cache: when a file may be trusted unread, atomic updates, the local index, the run lock."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from s3_sysbackup import cache as cache_module
from s3_sysbackup.cache import (
    RACY_WINDOW_NS,
    ArchiveLock,
    CachedFile,
    CacheLockedError,
    FileState,
    KnownBlobs,
    ParentCache,
    ParentSnapshot,
    host_state_dir,
)
from sysbackup_domain.packs import PackEntry

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


def test_record_commit_writes_the_view_and_deletes_the_rows_a_walk_passed_over(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="https://api.one")
    first_snapshots = {"db": ParentSnapshot("d" * 64, ("1" * 64,)), "old": ParentSnapshot("e" * 64, ())}
    cache.stage_files([("/a", STATE, ("1" * 64,)), ("/gone", STATE, ())], SCANNED)
    cache.record_commit("m1", snapshots=first_snapshots)
    rows = cache.file_rows()
    assert rows.lookup("/a") is not None  # the walk has /a, no /gone
    cache.stage_files([("/a", STATE, ("2" * 64,))], SCANNED)
    cache.record_commit("m2", gone=rows.finish(), snapshots={"db": ParentSnapshot("f" * 64, ())})
    assert cache.parent_manifest == "m2" and cache.view_matches_parent
    assert cache.lookup("/gone") is None
    cached = cache.lookup("/a")
    assert cached is not None and cached.content == ("2" * 64,) and cached.state == STATE
    assert cache.parent_snapshots() == {"db": ParentSnapshot("f" * 64, ())}


def test_non_utf8_paths_round_trip(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    odd = os.fsdecode(b"/data/latin1-\xe9\nnewline")
    cache.stage_files([(odd, STATE, ())], SCANNED)
    cache.record_commit("m1")
    assert cache.lookup(odd) is not None


def test_another_stack_starts_from_scratch(tmp_path: Path):
    one = ParentCache(tmp_path, scope="https://api.one")
    one.stage_files([("/a", STATE, ())], SCANNED)
    one.record_commit("m1")
    one.record_pack("p" * 64, 100, [entry("1" * 64, 0)])
    one.mark_index_ready()
    other = ParentCache(tmp_path, scope="https://api.two")
    assert other.parent_manifest is None and other.lookup("/a") is None
    assert other.indexed_hashes() == set() and other.known_packs() == {} and not other.index_ready


def test_uncommitted_run_leaves_the_last_good_state(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    cache.stage_files([("/a", STATE, ())], SCANNED)
    cache.record_commit("m1")
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
    cache.stage_files([("/kept", STATE, ("1" * 64,)), ("/reread", STATE, ()), ("/gone", STATE, ())], SCANNED)
    cache.record_commit("m1")
    later = SCANNED + 10 * SECOND
    rows = cache.file_rows()
    assert rows.lookup("/kept") is not None and rows.lookup("/reread") is not None
    cache.stage_files([("/reread", other, ("2" * 64,))], later)
    cache.record_commit("m2", gone=rows.finish())
    kept, reread = cache.lookup("/kept"), cache.lookup("/reread")
    assert kept == CachedFile(STATE, ("1" * 64,), SCANNED)  # untouched, read-time included
    assert reread == CachedFile(other, ("2" * 64,), later)
    assert cache.lookup("/gone") is None

    rows = cache.file_rows()
    assert rows.lookup("/reread") is not None
    cache.stage_files([("/reread", None, ())], later)  # skipped this time: its row goes too
    cache.record_commit("m3", gone=rows.finish())
    assert cache.lookup("/kept") is None and cache.lookup("/reread") is None
    assert cache.parent_manifest == "m3"


def test_rows_staged_by_a_run_that_never_committed_are_dropped(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    cache.stage_files([("/a", STATE, ("1" * 64,))], SCANNED)
    cache.record_commit("m1")
    cache.file_rows()
    cache.stage_files([("/a", STATE, ("2" * 64,)), ("/b", STATE, ())], SCANNED)
    cache.close()  # the run crashed before its commit

    rerun = ParentCache(tmp_path, scope="s")
    rows = rerun.file_rows()
    cached = rows.lookup("/a")
    assert cached is not None and cached.content == ("1" * 64,)
    rerun.record_commit("m2", gone=rows.finish())
    assert rerun.lookup("/a") == cached and rerun.lookup("/b") is None


def entry(digest: str, offset: int, length: int = 10) -> PackEntry:
    return PackEntry(digest, "data", "none", offset, length, length)


def test_the_local_index_outlives_a_crash_and_answers_lookups(tmp_path: Path):
    crashed = ParentCache(tmp_path, scope="s")
    crashed.record_pack("p" * 64, 100, [entry("1" * 64, 0), entry("2" * 64, 10)])
    crashed.close()  # the process dies before any commit

    rerun = ParentCache(tmp_path, scope="s")
    assert rerun.indexed_hashes() == {"1" * 64, "2" * 64} and rerun.known_packs() == {"p" * 64: 100}
    located = rerun.locate(["2" * 64, "3" * 64])
    assert set(located) == {"2" * 64}
    assert located["2" * 64].pack_id == "p" * 64 and located["2" * 64].entry == entry("2" * 64, 10)


def test_packs_of_names_the_packs_of_indexed_blobs_and_the_blobs_no_pack_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cache_module, "SQL_BATCH", 2)  # answers gathered over several queries
    cache = ParentCache(tmp_path, scope="s")
    cache.record_pack("p" * 64, 100, [entry("1" * 64, 0), entry("2" * 64, 10)])
    cache.record_pack("q" * 64, 50, [entry("3" * 64, 0)])
    assert cache.packs_of(["1" * 64, "2" * 64, "9" * 64, "8" * 64, "1" * 64]) == (
        {"p" * 64},
        {"9" * 64, "8" * 64},
    )
    assert cache.packs_of(["3" * 64, "2" * 64]) == ({"p" * 64, "q" * 64}, set())
    assert cache.packs_of([]) == (set(), set())


def test_known_blobs_asks_the_database_until_many_questions_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = ParentCache(tmp_path, scope="s")
    cache.record_pack("p" * 64, 100, [entry("1" * 64, 0), entry("2" * 64, 10)])
    loads: list[int] = []
    load_all = cache.indexed_hashes
    monkeypatch.setattr(cache, "indexed_hashes", lambda: loads.append(1) or load_all())
    known = KnownBlobs(cache, asked_before_loading=3)
    questions = ("1" * 64, "9" * 64, "2" * 64)

    assert [digest in known for digest in questions] == [True, False, True]
    assert loads == []  # a few questions: a query each
    assert [digest in known for digest in questions] == [True, False, True]
    assert loads == [1]  # many: every hash loaded once
    assert [digest in known for digest in questions] == [True, False, True] and loads == [1]


def test_dropping_a_pack_forgets_its_blobs_and_the_files_that_need_them(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    cache.record_pack("p" * 64, 100, [entry("1" * 64, 0), entry("2" * 64, 10)])
    cache.record_pack("q" * 64, 50, [entry("3" * 64, 0)])
    cache.stage_files([("/a", STATE, ("1" * 64,)), ("/b", STATE, ("3" * 64,))], SCANNED)
    cache.record_commit("m1")
    cache.drop_packs(["p" * 64])
    assert cache.indexed_hashes() == {"3" * 64} and cache.known_packs() == {"q" * 64: 50}
    assert cache.forget_unindexed_files() == 1
    assert cache.lookup("/a") is None and cache.lookup("/b") is not None
    cache.drop_blobs(["3" * 64])
    assert cache.indexed_hashes() == set()


def test_a_parent_taken_from_the_backend_is_not_described_by_the_view(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    assert not cache.view_matches_parent  # no parent at all
    cache.record_commit("m1")
    assert cache.view_matches_parent
    cache.adopt_parent("m2")  # a crashed run's commit had landed
    assert cache.parent_manifest == "m2" and not cache.view_matches_parent


def test_a_v1_cache_keeps_its_parent_and_files_and_rebuilds_its_index(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    cache.stage_files([("/a", STATE, ("1" * 64,))], SCANNED)
    cache.record_commit("m1")
    cache.close()
    db = sqlite3.connect(tmp_path / "cache.sqlite", isolation_level=None)
    db.execute("CREATE TABLE stored (hash TEXT PRIMARY KEY)")
    db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    db.execute(
        "UPDATE files SET content = ?", (json.dumps(["1" * 64, "2" * 64]),)
    )  # v1 spelled lists as JSON
    db.close()
    upgraded = ParentCache(tmp_path, scope="s")
    cached = upgraded.lookup("/a")
    assert upgraded.parent_manifest == "m1" and cached is not None
    assert cached.content == ("1" * 64, "2" * 64)
    assert not upgraded.index_ready
    tables = {row[0] for row in upgraded.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "stored" not in tables


@pytest.mark.parametrize("page", [2, 1000])  # rows read a few at a time, or all in one page
def test_file_rows_answer_a_walk_in_byte_order_and_keep_what_it_passed_over_as_gone(
    tmp_path: Path, page: int, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(cache_module, "SCAN_PAGE", page)
    cache = ParentCache(tmp_path, scope="s")
    rows = [("/b", STATE, ("1" * 64,)), ("/a/\udcff", STATE, ("2" * 64,)), ("/a/z", STATE, ())]
    rows += [(f"/other/{n}", STATE, ("3" * 64,)) for n in range(5)]
    cache.stage_files(rows, SCANNED)
    cache.record_commit("m1")

    scan = cache.file_rows()
    found = {path: scan.lookup(path) for path in ["/a/z", "/a/\udcff", "/missing"]}  # z < \xff as bytes

    assert {path: cached.content if cached else None for path, cached in found.items()} == {
        "/a/z": (),
        "/a/\udcff": ("2" * 64,),
        "/missing": None,
    }
    with pytest.raises(ValueError, match="out of order"):
        scan.lookup("/b")
    cache.record_commit("m2", gone=scan.finish())
    assert (
        cache.lookup("/b") is None and cache.lookup("/other/0") is None and cache.lookup("/other/4") is None
    )
    assert cache.lookup("/a/z") is not None and cache.lookup("/a/\udcff") is not None


def test_a_walk_of_nothing_leaves_no_file_rows(tmp_path: Path):
    cache = ParentCache(tmp_path, scope="s")
    cache.stage_files([("/a", STATE, ()), ("/b", STATE, ())], SCANNED)
    cache.record_commit("m1")
    cache.record_commit("m2", gone=cache.file_rows().finish())
    assert cache.lookup("/a") is None and cache.lookup("/b") is None
