"""BlobSink's packing: packs grow with the run, batches of packs grow and stay bounded in bytes."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pytest
from s3_sysbackup.sink import BlobSink, PackShipper, SealedPack
from sysbackup_domain.packs import PACK_GROWTH_LIMIT, TARGET_PACK_BYTES, next_pack_target, parse_trailer


class RecordingShipper(PackShipper):
    """The real shipper (presign and PUT to the fake backend), remembering each batch's packs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[int]] = []  # pack sizes per presign call, in the order sent

    def ship(self, packs: list[SealedPack]) -> None:
        self.batches.append([pack.size for pack in packs])
        super().ship(packs)


def test_next_pack_target_starts_at_the_first_size_and_grows_with_what_was_sealed_up_to_its_limit():
    assert next_pack_target(0) == TARGET_PACK_BYTES
    assert next_pack_target(4 * TARGET_PACK_BYTES) == TARGET_PACK_BYTES
    assert next_pack_target(6 * TARGET_PACK_BYTES) == TARGET_PACK_BYTES * 3 // 2
    assert next_pack_target(10**12) == PACK_GROWTH_LIMIT * TARGET_PACK_BYTES
    assert next_pack_target(10**12, first_target=1000) == PACK_GROWTH_LIMIT * 1000


def test_a_big_run_grows_its_packs_and_a_small_one_keeps_them_small(backend, transfer, tmp_path: Path):
    shipper = RecordingShipper(backend, transfer, on_stored=lambda pack: None)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path, target_pack_bytes=1000)
    blobs = [os.urandom(300) for _ in range(200)]  # incompressible: stored as they are
    for blob in blobs:
        sink.add_plaintext("data", blob)
    sink.finish()
    sizes = [size for batch in shipper.batches for size in batch]
    # The first packs close just past the first target; later ones near the limit, never far past it.
    assert all(size < 1000 + 300 + 200 for size in sizes[:4])
    assert max(sizes) > 3000
    assert max(sizes) < PACK_GROWTH_LIMIT * 1000 + 300 + 1000  # one blob and a trailer past the target
    # Nothing lost on the way: every blob is in exactly one pack.
    listed = [entry.hash for pack in backend.objects.values() for entry in parse_trailer(pack)]
    assert len(listed) == len(set(listed)) == len(blobs)


def test_batches_of_packs_grow_so_a_big_run_makes_few_presign_calls(backend, transfer, tmp_path: Path):
    shipper = RecordingShipper(backend, transfer, on_stored=lambda pack: None)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path, target_pack_bytes=10_000, max_packs_per_batch=8)
    for _ in range(40):  # incompressible blobs of 50 kB: each one seals a pack, whatever the target
        sink.add_plaintext("data", os.urandom(50_000))
    sink.finish()
    counts = [len(batch) for batch in shipper.batches]
    assert counts[0] == 1  # the first pack ships alone: uploading starts at once
    # Each batch may hold twice the last's packs, but (except the last, which takes what is left)
    # no more bytes than 8 first-size packs and one pack more: the spool's disk use stays bounded.
    assert all(after <= 2 * before for before, after in itertools.pairwise(counts[:-1]))
    assert all(sum(batch) < 8 * 10_000 + 51_000 for batch in shipper.batches[:-1])
    assert sum(counts) == shipper.counts.packs == len(transfer.puts) == 40
    assert len(counts) < 40 // 1.5  # far fewer presign calls than packs


class RunStopped(RuntimeError):
    pass


def test_nothing_is_presigned_or_sent_before_the_go_ahead(backend, transfer, tmp_path: Path):
    allowed = threading.Event()

    def go_ahead() -> None:
        if not allowed.wait(timeout=10):
            raise RunStopped("no go-ahead")

    shipper = PackShipper(backend, transfer, on_stored=lambda pack: None, go_ahead=go_ahead)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path, target_pack_bytes=1000)
    for _ in range(3):  # each seals a pack: two batches (1 and 2 packs) go to the shipping threads
        sink.add_plaintext("data", os.urandom(5000))
    time.sleep(0.2)
    assert backend.counter.as_dict().get("api", {}) == {} and transfer.puts == []
    allowed.set()
    sink.finish()
    assert shipper.counts.packs == len(transfer.puts) == 3


def test_a_go_ahead_that_refuses_stops_the_run_with_nothing_sent(backend, transfer, tmp_path: Path):
    def go_ahead() -> None:
        raise RunStopped("this host's cache was lost: its index must be rebuilt first")

    shipper = PackShipper(backend, transfer, on_stored=lambda pack: None, go_ahead=go_ahead)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path, target_pack_bytes=1000)
    with pytest.raises(RunStopped):
        for _ in range(20):
            sink.add_plaintext("data", os.urandom(5000))
        sink.finish()
    sink.abort()
    assert backend.counter.as_dict().get("api", {}) == {} and transfer.puts == []


def test_trees_go_to_packs_of_their_own(backend, transfer, tmp_path: Path):
    shipper = RecordingShipper(backend, transfer, on_stored=lambda pack: None)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path, target_pack_bytes=20_000)
    for number in range(40):  # a directory's files, then its tree, as a walk adds them
        sink.add_plaintext("data", os.urandom(3000))
        if number % 4 == 3:
            sink.add_plaintext("tree", os.urandom(2500))
    sink.finish()
    kinds = sorted(
        ",".join(sorted({e.kind for e in parse_trailer(pack)})) for pack in backend.objects.values()
    )
    # Trees filled a pack of their own; only the run's last trees may ride with its last data.
    assert kinds.count("tree") >= 1 and kinds.count("data,tree") <= 1
    assert kinds.count("tree") + kinds.count("data,tree") <= 2 and len(kinds) >= 5
    blobs = [entry for pack in backend.objects.values() for entry in parse_trailer(pack)]
    assert len(blobs) == 50 and len({entry.hash for entry in blobs}) == 50


def test_a_small_run_is_one_pack(backend, transfer, tmp_path: Path):
    shipper = RecordingShipper(backend, transfer, on_stored=lambda pack: None)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path)
    sink.add_plaintext("data", b"the one changed file")
    for depth in range(3):  # the trees above it
        sink.add_plaintext("tree", b'{"tree at depth": %d}' % depth)
    sink.finish()
    assert len(transfer.puts) == 1
    (pack,) = backend.objects.values()
    assert sorted(entry.kind for entry in parse_trailer(pack)) == ["data", "tree", "tree", "tree"]


def test_the_first_presign_call_runs_alone(backend, transfer, tmp_path: Path, monkeypatch):
    # Two calls at once to a cold function start two environments (two cold starts billed): the second
    # batch's call waits for the first's answer; after that, calls run side by side.
    running = 0
    most_at_once: list[int] = []
    guard = threading.Lock()
    real_presign = backend.presign_packs

    def slow_presign(packs):
        nonlocal running
        with guard:
            running += 1
            most_at_once.append(running)
        time.sleep(0.05)
        with guard:
            running -= 1
        return real_presign(packs)

    monkeypatch.setattr(backend, "presign_packs", slow_presign)
    shipper = PackShipper(backend, transfer, on_stored=lambda pack: None)  # type: ignore[arg-type]
    sink = BlobSink(shipper, known=set(), spool_dir=tmp_path, target_pack_bytes=1000)
    for _ in range(30):  # each blob seals a pack: batches of 1, 2, 4, 8... two on the wire at once
        sink.add_plaintext("data", os.urandom(5000))
    sink.finish()
    assert most_at_once[0] == 1 and most_at_once[1] == 1  # the first call alone; the second after it
    assert shipper.counts.packs == 30
