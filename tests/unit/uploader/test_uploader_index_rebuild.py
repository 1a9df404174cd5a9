"""The local index rebuilt from the backend's packs (GET /packs, POST /downloads, ranged tail reads):
a lost cache sends nothing again, restore of another host starts from GET /packs?host=, and trailers
are read with one ranged GET (two when large) and validated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import pick, write_script
from s3_sysbackup import cache as cache_module
from s3_sysbackup import index_rebuild as rebuild_module
from s3_sysbackup.archiver import CommitConflict
from s3_sysbackup.fetch import BlobFetcher, MissingBlob
from s3_sysbackup.index_rebuild import MemoryIndex, read_trailer, rebuild_index
from s3_sysbackup.restorer import Restorer
from s3_sysbackup.sink import FAULT_ENV, InjectedFault
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import PackWriter, parse_trailer
from uploader_fakes import URL_PREFIX, FakeBackend, FakeTransfer


@pytest.fixture(autouse=True)
def trust_fresh_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "RACY_WINDOW_NS", 0)


def write_files(root: Path, count: int = 30) -> Path:
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    for n in range(count):
        (data / ("sub" if n % 2 else "") / f"f{n}").write_bytes(f"file {n}\n".encode() * (n + 1))
    return data


def pack_of(*payloads: bytes) -> bytes:
    writer = PackWriter()
    for payload in payloads:
        writer.add(blob_hash(payload), "data", payload)
    return writer.finish()[0]


def test_a_lost_cache_is_rebuilt_and_nothing_is_sent_again(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    write_files(host_root)
    pick(config_dir, "/data")
    first = run_archive()
    shutil.rmtree(tmp_path / "cache")  # the host lost its cache
    puts_before = len(transfer.puts)
    presigns_before = backend.counter.as_dict()["api"]["POST /packs/presign"]
    commits_before = len(backend.commit_requests)

    second = run_archive()  # a new cache takes the backend's head as parent: no --adopt-head needed

    assert len(backend.commit_requests) == commits_before + 1  # asked for the head first: no 409
    assert backend.commit_requests[-1]["packs"] == []
    assert len(transfer.puts) == puts_before and second.stats["bytes_uploaded"] == 0
    assert backend.counter.as_dict()["api"]["POST /packs/presign"] == presigns_before
    assert second.root == first.root
    assert backend.manifests[second.manifest_id]["parent"] == first.manifest_id
    calls = backend.counter.as_dict()["api"]
    assert calls["GET /packs"] == 1  # the rebuild's (a first run asks only for the head)
    reads = [get for get in transfer.gets if get[0] in backend.objects]
    assert len(reads) >= len(backend.objects)  # each pack's tail read once (no blob downloaded)


def test_after_a_lost_cache_a_change_is_committed_against_the_parents_own_trees(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    data = write_files(host_root)
    pick(config_dir, "/data")
    run_archive()
    shutil.rmtree(tmp_path / "cache")
    (data / "sub" / "f1").write_bytes(b"changed after the cache was lost")

    result = run_archive()

    assert backend.head == result.manifest_id
    request = backend.commit_requests[-1]
    assert len(request["packs"]) == 1  # the run's one pack: the new data blob and the new trees
    assert result.stats["files_read"] == 30  # no file rows: everything read, little sent


def test_a_crashed_runs_landed_commit_is_the_parent_and_its_trees_are_read(
    run_archive, config_dir, host_root, backend, transfer, monkeypatch
):
    data = write_files(host_root)
    pick(config_dir, "/data")
    run_archive()
    (data / "f0").write_bytes(b"changed by the crashed run")
    monkeypatch.setenv(FAULT_ENV, "mid-commit")
    with pytest.raises(InjectedFault):
        run_archive()
    monkeypatch.delenv(FAULT_ENV)
    crashed = backend.head
    (data / "sub" / "f3").write_bytes(b"changed after")
    before = dict(backend.counter.as_dict()["api"])

    result = run_archive()

    assert backend.manifests[result.manifest_id]["parent"] == crashed
    calls = backend.counter.as_dict()["api"]
    assert calls["GET /manifests/{manifest_id}"] - before.get("GET /manifests/{manifest_id}", 0) == 1


def test_a_clone_that_kept_its_cache_is_still_a_conflict(run_archive, config_dir, host_root, backend):
    write_files(host_root)
    pick(config_dir, "/data")
    run_archive()
    backend.commit_manifest({"parent": backend.head, "root": None, "snapshots": [], "stats": {"run_id": "x"}})
    with pytest.raises(CommitConflict, match="cloned"):
        run_archive()


def test_restore_of_another_host_starts_from_its_pack_list(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    data = write_files(host_root)
    pick(config_dir, "/data")
    result = run_archive()
    fetcher = BlobFetcher(backend, transfer, MemoryIndex(), host="test-host")  # type: ignore[arg-type]
    fetcher.rebuild_index()
    before = dict(backend.counter.as_dict()["api"])
    Restorer(fetcher, str(tmp_path / "r")).restore(backend.get_manifest(result.manifest_id))
    assert (tmp_path / "r" / "data" / "sub" / "f1").read_bytes() == (data / "sub" / "f1").read_bytes()
    assert backend.counter.as_dict()["api"].get("GET /packs") == before.get("GET /packs")  # no second list


def test_a_blob_no_listed_pack_holds_is_a_clear_missing_blob(backend, transfer):
    backend.store_pack(pack_of(b"only this"))
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    with pytest.raises(MissingBlob, match="in no pack the backend lists"):
        fetcher.fetch_all([blob_hash(b"something else")])
    assert fetcher.fetch_all([blob_hash(b"only this")]) == {blob_hash(b"only this"): b"only this"}


def test_a_pack_gone_from_the_backend_is_dropped_and_its_blobs_found_elsewhere(backend, transfer):
    payload = b"moved by gc"
    first = backend.store_pack(pack_of(payload))
    index = MemoryIndex()
    fetcher = BlobFetcher(backend, transfer, index)  # type: ignore[arg-type]
    assert fetcher.fetch_all([blob_hash(payload)])[blob_hash(payload)] == payload
    second = backend.repack(first)
    backend.collect(first)
    again = BlobFetcher(backend, transfer, index)  # type: ignore[arg-type]
    assert again.fetch_all([blob_hash(payload)])[blob_hash(payload)] == payload
    assert set(index.known_packs()) == {second}


def test_unusable_and_unreadable_packs_are_skipped(backend, transfer):
    good = backend.store_pack(pack_of(b"good"))
    condemned = backend.store_pack(pack_of(b"condemned"))
    backend.condemn(condemned)
    never_put = pack_of(b"never arrived")
    backend.presign_packs([{"sha256": blob_hash(never_put), "size": len(never_put)}])
    index = MemoryIndex()
    report = rebuild_index(backend, transfer, index)  # type: ignore[arg-type]
    assert set(index.known_packs()) == {good}
    assert report.skipped[condemned] == "state condemned"
    assert "404" in report.skipped[blob_hash(never_put)]


def test_known_packs_gc_condemned_are_forgotten_when_the_list_is_read(backend, transfer):
    kept = backend.store_pack(pack_of(b"kept"))
    condemned = backend.store_pack(pack_of(b"condemned later"))
    index = MemoryIndex()
    rebuild_index(backend, transfer, index)  # type: ignore[arg-type]
    assert set(index.known_packs()) == {kept, condemned}
    backend.condemn(condemned)
    report = rebuild_index(backend, transfer, index)  # type: ignore[arg-type]
    assert set(index.known_packs()) == {kept} and report.dropped == 1
    assert index.locate([blob_hash(b"condemned later")]) == {}


def test_a_small_trailer_takes_one_ranged_get_a_large_one_two(backend: FakeBackend, monkeypatch):
    transfer = FakeTransfer(backend)
    data = pack_of(*(f"blob {n}".encode() for n in range(50)))
    pack_id = backend.store_pack(data)
    assert read_trailer(transfer, URL_PREFIX + pack_id, len(data)) == parse_trailer(data)  # type: ignore[arg-type]
    assert len(transfer.gets) == 1
    monkeypatch.setattr(rebuild_module, "FIRST_TAIL_READ_BYTES", 64)
    transfer.gets.clear()
    assert read_trailer(transfer, URL_PREFIX + pack_id, len(data)) == parse_trailer(data)  # type: ignore[arg-type]
    assert len(transfer.gets) == 2


def test_a_damaged_tail_is_refused(backend: FakeBackend):
    transfer = FakeTransfer(backend)
    data = bytearray(pack_of(b"x" * 100))
    data[-1] ^= 0xFF  # the magic
    pack_id = backend.store_pack(bytes(data))
    with pytest.raises(InvalidDocument, match="not a pack"):
        read_trailer(transfer, URL_PREFIX + pack_id, len(data))  # type: ignore[arg-type]


def test_a_landed_crashed_commit_with_a_snapshot_is_compared_from_its_stream_index(
    run_archive, config_dir, backend, monkeypatch
):
    payload = config_dir / "payload.sql"
    payload.write_bytes(b"".join(b"row %d: content\n" % i for i in range(30_000)))
    write_script(config_dir / "snapshots.d" / "db", f"cat {payload} >&$1\n")
    run_archive()
    payload.write_bytes(b"".join(b"row %d: content\n" % i for i in range(30_001)))
    monkeypatch.setenv(FAULT_ENV, "mid-commit")
    with pytest.raises(InjectedFault):
        run_archive()
    monkeypatch.delenv(FAULT_ENV)
    crashed = backend.manifests[backend.head]
    payload.write_bytes(b"".join(b"row %d: content\n" % i for i in range(30_002)))
    before = len(backend.commit_requests)

    result = run_archive()

    assert len(backend.commit_requests) == before + 2  # the 409 (the crashed commit landed), then accepted
    request = backend.commit_requests[-1]
    assert crashed["snapshots"][0]["content"] in request["locations"]  # the parent's chunk list, read back
    assert backend.manifests[result.manifest_id]["parent"] == crashed["id"]
    assert len(request["packs"]) == 1  # only the last chunks' pack: the parent's were found unchanged
