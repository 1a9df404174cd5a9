"""The commit's `packs` and `locations`: what is new relative to the parent at the same place, and
nothing more than the backend's walk needs (docs/PACK_INDEX.md)."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import pick, write_script
from s3_sysbackup import archiver as archiver_module
from s3_sysbackup import cache as cache_module
from s3_sysbackup import commit_plan as plan_module
from s3_sysbackup.cache import IndexedBlob
from s3_sysbackup.commit_plan import PlanTooLarge, resolve
from s3_sysbackup.fetch import BlobFetcher
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.restorer import Restorer
from sysbackup_domain.packs import PackEntry, parse_trailer


@pytest.fixture(autouse=True)
def trust_fresh_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "RACY_WINDOW_NS", 0)


def dump_script(config_dir, rows: int, changed_row: int | None = None) -> None:
    payload = config_dir / "payload.sql"
    payload.write_bytes(
        b"".join(
            (b"row %d: changed\n" % i) if i == changed_row else (b"row %d: database content\n" % i)
            for i in range(rows)
        )
    )
    write_script(config_dir / "snapshots.d" / "db", f"cat {payload} >&$1\n")


def packs_holding(backend, hashes: set[str]) -> set[str]:
    blobs = backend.blobs()
    return {blobs[digest] for digest in hashes}


def test_an_unchanged_snapshot_costs_nothing_a_changed_one_lists_only_its_new_chunks(
    run_archive, config_dir, backend
):
    dump_script(config_dir, 40_000)
    first = run_archive()
    first_request = backend.commit_requests[-1]
    assert first_request["packs"]  # everything was new

    run_archive()
    assert backend.commit_requests[-1]["packs"] == [] and backend.commit_requests[-1]["locations"] == {}

    dump_script(config_dir, 40_000, changed_row=20_000)
    third = run_archive()
    request = backend.commit_requests[-1]
    old_index = backend.get_manifest(first.manifest_id)["snapshots"][0]["content"]
    new_index = backend.get_manifest(third.manifest_id)["snapshots"][0]["content"]
    assert set(request["locations"]) == {old_index, new_index}  # the walk reads both chunk lists
    new_packs = set(request["packs"]) - set(first_request["packs"])
    assert new_packs and set(request["packs"]) <= new_packs  # no pack of the unchanged chunks
    assert third.stats["bytes_uploaded"] < 40_000 * 25 // 10  # a few chunks, not the dump


def test_a_one_file_change_lists_the_new_blobs_and_locates_both_sides_of_each_changed_dir(
    run_archive, config_dir, host_root, backend
):
    deep = host_root / "data" / "a" / "b"
    deep.mkdir(parents=True)
    (host_root / "data" / "other").mkdir()
    (host_root / "data" / "other" / "f").write_bytes(b"untouched")
    (deep / "f").write_bytes(b"before")
    pick(config_dir, "/data")
    first = run_archive()
    (deep / "f").write_bytes(b"after")
    second = run_archive()
    request = backend.commit_requests[-1]
    # root, data, a, b changed: 4 new trees and the parent's 4 at the same places.
    assert len(request["locations"]) == 8
    assert first.root in request["locations"] and second.root in request["locations"]
    new_pack_ids = set(request["packs"])
    new_blobs = {entry.hash for pack_id in new_pack_ids for entry in parse_trailer(backend.objects[pack_id])}
    assert len(new_pack_ids) == 1  # one pack: the new file and the trees above it, nothing older
    assert b"untouched" not in b"".join(backend.objects[p] for p in new_pack_ids)
    assert second.root in new_blobs


@dataclass
class Located:
    """An index holding what the test says: {blob: where}."""

    blobs: dict[str, IndexedBlob]

    def packs_of(self, hashes: Iterable[str]) -> tuple[set[str], set[str]]:
        wanted = set(hashes)
        return {self.blobs[d].pack_id for d in wanted if d in self.blobs}, wanted - self.blobs.keys()

    def locate(self, hashes: Iterable[str]) -> dict[str, IndexedBlob]:
        return {digest: self.blobs[digest] for digest in hashes if digest in self.blobs}


def located(*pairs: tuple[str, str]) -> Located:
    """An index of (blob, pack) pairs."""
    return Located(
        {digest: IndexedBlob(pack, PackEntry(digest, "tree", "none", 0, 5, 5)) for digest, pack in pairs}
    )


ONE, TWO, THREE, FOUR, NINE = ("1" * 64, "2" * 64, "3" * 64, "4" * 64, "9" * 64)
PACK_A, PACK_B, PACK_C, PACK_D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def test_resolve_lists_packs_of_new_blobs_only_and_reports_unlocated():
    plan = resolve(
        listed={ONE, TWO, NINE},
        read={ONE, THREE},
        index=located((ONE, PACK_A), (TWO, PACK_A), (THREE, PACK_B)),
    )
    assert plan.packs == [PACK_A]  # the parent's tree (THREE) is located, its pack not listed
    assert set(plan.locations) == {ONE, THREE}
    expected = {"pack_id": PACK_B, "offset": 0, "length": 5, "codec": "none", "raw_length": 5}
    assert plan.locations[THREE] == expected
    assert plan.unlocated == {NINE}


def test_resolve_keeps_the_body_small_and_lists_the_packs_of_locations_it_leaves_out(monkeypatch):
    monkeypatch.setattr(plan_module, "MAX_LOCATIONS_SENT", 2)
    pack_of = {ONE: PACK_A, TWO: PACK_B, THREE: PACK_C, FOUR: PACK_D}
    plan = resolve(listed={ONE}, read=set(pack_of), index=located(*pack_of.items()))
    assert len(plan.locations) == 2
    assert ONE not in plan.locations  # the parent's blobs go first: nothing else says where they are
    left_out = set(pack_of) - set(plan.locations) - {ONE}
    assert left_out and {pack_of[digest] for digest in left_out} <= set(plan.packs)


def test_more_packs_than_one_commit_takes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(plan_module, "MAX_COMMIT_PACKS", 1)
    with pytest.raises(PlanTooLarge, match="2 packs"):
        resolve(listed={ONE, TWO}, read=set(), index=located((ONE, PACK_A), (TWO, PACK_B)))


def mutate(root: Path, rng: random.Random, step: int) -> None:
    """One round of the changes a host sees: edits, new and removed files and directories, a file
    that becomes a directory, a directory that becomes a file."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    dirs = sorted(p for p in root.rglob("*") if p.is_dir())
    for path in rng.sample(files, min(3, len(files))):
        path.write_bytes(f"edited {step} {rng.random()}\n".encode() * rng.randint(1, 50))
    parent = rng.choice([root, *dirs])
    (parent / f"new{step}").write_bytes(f"new file {step}\n".encode())
    (parent / f"dir{step}" / "inner").mkdir(parents=True)
    (parent / f"dir{step}" / "inner" / "f").write_bytes(b"inner %d" % step)
    if files and step % 2:
        victim = rng.choice([f for f in files if f.exists()] or files)
        if victim.exists():
            victim.unlink()
            victim.mkdir()  # a file becomes a directory
            (victim / "x").write_bytes(b"was a file")
    removable = [d for d in dirs if d.exists() and d != root and not any(d.iterdir())]
    if removable:
        rng.choice(removable).rmdir()


def cached_paths(tmp_path: Path) -> set[bytes]:
    (database,) = tmp_path.rglob("cache.sqlite")
    db = sqlite3.connect(database)
    try:
        return {row[0] for row in db.execute("SELECT path FROM files")}
    finally:
        db.close()


# The default batches, and batches so small that directories wait for reads and rows are staged often.
@pytest.mark.parametrize(("read_batch", "waiting_entries"), [(None, None), (2, 3)])
def test_every_plan_of_a_changing_tree_is_accepted_at_once_and_restores(
    run_archive, config_dir, host_root, backend, transfer, tmp_path, monkeypatch, read_batch, waiting_entries
):
    if read_batch is not None:
        monkeypatch.setattr(archiver_module, "READ_BATCH", read_batch)
        monkeypatch.setattr(archiver_module, "WAITING_ENTRIES_MAX", waiting_entries)
        monkeypatch.setattr(archiver_module, "STAGED_ROWS_MAX", 3)
    rng = random.Random(4)
    data = host_root / "data"
    for n in range(12):
        (data / f"d{n % 3}" / f"s{n % 2}").mkdir(parents=True, exist_ok=True)
        (data / f"d{n % 3}" / f"s{n % 2}" / f"f{n}").write_bytes(b"start %d\n" % n * (n + 1))
    pick(config_dir, "/data")
    for step in range(6):
        before = len(backend.commit_requests)
        result = run_archive()
        assert len(backend.commit_requests) == before + 1, backend.commit_requests[-1]  # no refusal
        target = tmp_path / f"restored{step}"
        fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
        Restorer(fetcher, str(target)).restore(backend.get_manifest(result.manifest_id))
        expected = {p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}
        restored = {
            p.relative_to(target / "data"): p.read_bytes()
            for p in (target / "data").rglob("*")
            if p.is_file()
        }
        assert restored == expected
        # The cache's view is this run's files, no more (rows of what went are deleted), no fewer.
        assert cached_paths(tmp_path) == {os.fsencode(p) for p in data.rglob("*") if p.is_file()}
        mutate(data, rng, step)
