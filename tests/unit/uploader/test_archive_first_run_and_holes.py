"""A new cache asks for the head while the run reads; a file's holes are not read and come back as holes."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import pick
from s3_sysbackup.archiver import EXIT_OK
from s3_sysbackup.fetch import BlobFetcher
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.restorer import Restorer
from s3_sysbackup.sink import BlobSink
from sysbackup_domain.chunking import FILE_CHUNKING
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import open_blob, parse_trailer
from sysbackup_domain.tree import decode_tree

MiB = 1024 * 1024


def blob(backend, digest: str) -> bytes:
    for pack in backend.objects.values():
        for entry in parse_trailer(pack):
            if entry.hash == digest:
                return open_blob(entry, pack[entry.offset : entry.offset + entry.length])
    raise KeyError(digest)


def test_a_first_run_reads_while_it_asks_for_the_head(
    run_archive, config_dir, host_root, backend, monkeypatch
):
    (host_root / "data").mkdir()
    (host_root / "data" / "a").write_bytes(b"first file")
    pick(config_dir, "/data")
    reading_started = threading.Event()
    real_add = BlobSink.add_plaintext

    def add_plaintext(self, kind: str, plaintext: bytes) -> str:
        reading_started.set()
        return real_add(self, kind, plaintext)

    real_head = backend.latest_manifest
    answered_after_reading: list[bool] = []

    def slow_head(host=None):
        # The answer waits for the run's first blob: a run that asked before reading would wait 5 s here.
        answered_after_reading.append(reading_started.wait(timeout=5))
        return real_head(host)

    monkeypatch.setattr(BlobSink, "add_plaintext", add_plaintext)
    monkeypatch.setattr(backend, "latest_manifest", slow_head)
    result = run_archive()
    assert result.exit_code == EXIT_OK
    assert answered_after_reading == [True]
    assert backend.manifests[result.manifest_id]["parent"] is None


def test_a_lost_cache_sends_nothing_before_its_index_is_rebuilt(
    run_archive, config_dir, host_root, backend, transfer, tmp_path
):
    (host_root / "data").mkdir()
    (host_root / "data" / "a").write_bytes(os.urandom(5000))
    pick(config_dir, "/data")
    first = run_archive()
    presigns = backend.counter.as_dict()["api"]["POST /packs/presign"]
    for path in (tmp_path / "cache").iterdir():  # the host lost its cache
        if path.is_dir():
            for child in path.rglob("*"):
                if child.is_file():
                    child.unlink()
    second = run_archive()
    # The pass that started before the head was known stopped before its first presign; the pass after
    # the rebuild found everything in the index.
    assert backend.counter.as_dict()["api"]["POST /packs/presign"] == presigns
    assert backend.manifests[second.manifest_id]["parent"] == first.manifest_id


def test_holes_are_not_read_and_come_back_as_holes(
    run_archive, config_dir, host_root, backend, transfer, tmp_path, monkeypatch
):
    image = host_root / "data" / "disk.img"
    image.parent.mkdir()
    with image.open("wb") as out:
        out.write(b"boot sector" * 100)
        out.seek(6 * FILE_CHUNKING.max_size, os.SEEK_CUR)
        out.write(b"last block")
    size = image.stat().st_size
    fd = os.open(image, os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_HOLE) >= size:
            pytest.skip("this file system keeps no holes")
    finally:
        os.close(fd)
    hashed: list[int] = []
    real_add = BlobSink.add_plaintext

    def add_plaintext(self, kind: str, plaintext: bytes) -> str:
        hashed.append(len(plaintext))
        return real_add(self, kind, plaintext)

    monkeypatch.setattr(BlobSink, "add_plaintext", add_plaintext)
    pick(config_dir, "/data")
    result = run_archive()
    assert result.exit_code == EXIT_OK

    root = decode_tree(blob(backend, backend.manifests[result.manifest_id]["root"]))
    data = decode_tree(blob(backend, root.entries[0].subtree))
    (entry,) = data.entries
    zero_block = blob_hash(bytes(FILE_CHUNKING.max_size))
    assert entry.content.count(zero_block) >= 5
    assert hashed.count(FILE_CHUNKING.max_size) <= 1  # the zero block was hashed once, not per hole chunk

    target = tmp_path / "restored"
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    Restorer(fetcher, str(target)).restore(backend.get_manifest(result.manifest_id), ())
    restored = target / "data" / "disk.img"
    assert restored.read_bytes() == image.read_bytes()
    assert restored.stat().st_blocks * 512 < size // 2  # and the holes are holes again
