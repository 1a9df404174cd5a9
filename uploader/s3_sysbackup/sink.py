"""Where new blobs go: local dedup, packing, and shipping packs (presign -> PUT -> local index).

Dedup is a lookup in the host's local index (docs/PACK_INDEX.md, "Uploader"): no API call. A pack
is indexed locally as soon as it is in S3 (its PUT succeeded, or presign said the backend already
stores it), before any commit, so a re-run after a crash does not send it again.

Memory is bounded: one open writer per kind, one sealed batch waiting while at most one other batch
is on the wire. Tree blobs go to packs of their own, as restic's do: a commit, a restore or gc reads a
run's trees in one ranged GET, not one per stretch of data they were scattered between. A run's last
trees join its last data pack when both fit in one: a small run (one changed file and the trees
above it) is one pack, one PUT, which the commit reads and verifies in one GET. Producers
(file-reading threads) block while a batch waits: the backpressure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sysbackup_domain.compression import compress_if_worth
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import MAX_PACK_BLOBS, TARGET_PACK_BYTES, PackEntry, PackWriter, next_pack_target

from .api import ApiClient, ApiError
from .transfer import Transfer

logger = logging.getLogger(__name__)

FAULT_ENV = "S3SB_FAULT"
# Packs are spooled to files in the cache directory, so a pack waiting for its PUT costs page cache,
# not memory. The first pack ships alone, as soon as it is sealed (reading and uploading overlap
# from the start); each later batch may hold twice as many, up to MAX_PACKS_PER_BATCH packs or as
# many bytes as that many first-size packs (packs grow in a big run; the bytes bound keeps the spool's
# disk use where it was), so a big run makes one presign call (an API call and an invocation) per
# 128 MiB, not per pack. Two batches may be on the wire at once, hiding a presign's latency.
MAX_PACKS_PER_BATCH = 8
BATCHES_IN_FLIGHT = 2
PARALLEL_PUTS = 4
# Waits before sending again packs gc is deleting (POST /packs/presign answered 409 with
# `collecting`): its deletion of one pack takes seconds; a crashed gc run's is finished by the next.
COLLECTING_WAITS_S = (5, 15, 45)


class InjectedFault(RuntimeError):
    """TEST ONLY: raised at a named point when `S3SB_FAULT` names it, to simulate a crash there.

    Points: `after-pack-put` (a pack is in S3 but not in the local index), `after-index` (packs are
    indexed, nothing committed), `mid-commit` (the manifest is committed, the cache not updated).
    """


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        raise InjectedFault(f"injected fault at {name} ({FAULT_ENV} is set: test use only)")


@dataclass
class SealedPack:
    sha256: str
    body: bytes | BinaryIO  # the pack, in memory or in its spool file (read from the start)
    size: int
    entries: list[PackEntry]

    @classmethod
    def in_memory(cls, data: bytes, entries: list[PackEntry]) -> SealedPack:
        return cls(hashlib.sha256(data).hexdigest(), data, len(data), entries)

    def close(self) -> None:
        """Drop a spool file (it was unlinked when made: closing frees its disk)."""
        if not isinstance(self.body, bytes):
            self.body.close()


@dataclass
class ShipCounts:
    packs: int = 0
    data_packs: int = 0
    bytes_uploaded: int = 0
    blobs_new: int = 0
    packs_already_there: int = 0


PackStored = Callable[["SealedPack"], None]


class PackShipper:
    """Uploads a batch of sealed packs: one presign call, parallel PUTs, then `on_stored` per pack."""

    sleep = staticmethod(time.sleep)  # between sends of packs gc is collecting

    def __init__(
        self,
        api: ApiClient,
        transfer: Transfer,
        on_stored: PackStored,
        parallel_puts: int = PARALLEL_PUTS,
        go_ahead: Callable[[], None] = lambda: None,
    ) -> None:
        """`on_stored` gets each pack once it is in S3 (the cache indexes it). `go_ahead` runs before each
        batch is sent: it may wait for what the run must know first, or raise to stop the run."""
        self.api = api
        self.transfer = transfer
        self.on_stored = on_stored
        self.go_ahead = go_ahead
        self.parallel_puts = parallel_puts
        self.counts = ShipCounts()
        self._counting = threading.Lock()
        # Until the first presign call has returned, others wait for it: two calls at once to a function
        # not yet started start (and bill) two cold environments; one after the other, the second finds
        # the first warm, and waits no longer than its own cold start would have taken.
        self._first_presign = threading.Lock()
        self._presigned_once = False

    def ship(self, packs: list[SealedPack]) -> None:
        """Presign and PUT `packs`; waits out gc deleting an identical old pack (409 collecting)."""
        try:
            self.go_ahead()
            for wait_s in (*COLLECTING_WAITS_S, None):
                try:
                    self._ship_once(packs)
                    return
                except ApiError as error:
                    collecting = error.body.get("collecting") if isinstance(error.body, dict) else None
                    if error.status != 409 or not collecting or wait_s is None:
                        raise
                    # gc is deleting an old pack byte-identical to ours: once it is gone (seconds),
                    # presign makes a fresh one and our PUT lands.
                    logger.warning(
                        "gc is collecting packs %s; sending them again in %d s", collecting, wait_s
                    )
                    self.sleep(wait_s)
        finally:
            for pack in packs:
                pack.close()

    def _ship_once(self, packs: list[SealedPack]) -> None:
        uploads, stored = self._presign(packs)
        upload_for = {upload.get("pack_id"): upload for upload in uploads}
        # Byte-identical packs the backend holds for us (a crashed run's, another host's) are not sent.
        to_send = [p for p in packs if p.sha256 not in stored]
        missing = [p.sha256 for p in to_send if p.sha256 not in upload_for]
        if missing:
            raise RuntimeError(f"POST /packs/presign returned no upload for packs {missing}")
        with ThreadPoolExecutor(max_workers=self.parallel_puts, thread_name_prefix="put") as pool:
            uploaded = list(pool.map(lambda p: self._put(p, upload_for[p.sha256]), to_send))
        sent = {pack.sha256 for pack, fresh in zip(to_send, uploaded, strict=True) if fresh}
        fault_point("after-pack-put")
        with self._counting:  # two batches may finish at once
            for pack in packs:
                self.on_stored(pack)
                self.counts.packs += 1
                self.counts.data_packs += any(entry.kind == "data" for entry in pack.entries)
                self.counts.blobs_new += len(pack.entries)
                if pack.sha256 in sent:
                    self.counts.bytes_uploaded += pack.size
                else:
                    self.counts.packs_already_there += 1
        fault_point("after-index")

    def _presign(self, packs: list[SealedPack]) -> tuple[list[dict], set[str]]:
        request = [{"sha256": pack.sha256, "size": pack.size} for pack in packs]
        if self._presigned_once:
            return self.api.presign_packs(request)
        with self._first_presign:
            answer = self.api.presign_packs(request)
            self._presigned_once = True
            return answer

    def _put(self, pack: SealedPack, upload: dict) -> bool:
        headers = upload.get("headers") or {}
        return self.transfer.put_pack(upload["url"], headers, pack.body)


@dataclass
class BlobSink:
    """Accepts blobs (thread-safe), drops the ones the local index knows, packs and ships the rest."""

    shipper: PackShipper
    known: Container[str]  # the local index's hashes when the run started (a set, or the index itself)
    spool_dir: Path  # where packs are built, as unlinked files
    max_packs_per_batch: int = MAX_PACKS_PER_BATCH
    _batch_size: int = 1  # packs the next batch waits for (doubles after each batch)
    target_pack_bytes: int = TARGET_PACK_BYTES  # the run's first packs; later ones grow (next_pack_target)
    _sealed_bytes: int = 0
    _seen: set[str] = field(default_factory=set)
    _writers: dict[str, PackWriter] = field(default_factory=dict)  # the open pack of each blob kind
    _ready: list[SealedPack] = field(default_factory=list)
    _in_flight: deque[Future] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=BATCHES_IN_FLIGHT, thread_name_prefix="ship")
    )

    def is_known_stored(self, digest: str) -> bool:
        """True if the local index holds the blob (the commit learns where from the same index)."""
        return digest in self.known

    def needs(self, digest: str) -> bool:
        """False if the blob is indexed or already on its way: no need to compress it."""
        with self._lock:
            return digest not in self.known and digest not in self._seen

    def add(self, digest: str, kind: str, codec: str, stored: bytes, raw_length: int) -> None:
        with self._lock:
            if digest in self.known or digest in self._seen:
                return
            self._seen.add(digest)
            writer = self._writers.get(kind)
            if writer is not None and not writer.has_room(len(stored)):
                self._seal(kind)
                writer = None
            if writer is None:
                writer = self._writers[kind] = self._new_writer()
            writer.add_stored(digest, kind, codec, stored, raw_length)
            if writer.size >= self._pack_target():
                self._seal(kind)

    def add_plaintext(self, kind: str, plaintext: bytes) -> str:
        """Hash, compress if new, add; returns the hash. Safe from any thread."""
        digest = blob_hash(plaintext)
        if self.needs(digest):
            codec, stored = compress_if_worth(plaintext)
            self.add(digest, kind, codec, stored, len(plaintext))
        return digest

    def finish(self) -> None:
        """Send everything still held; returns when every blob added is in S3 and indexed."""
        try:
            with self._lock:
                self._fold_trees_into_data()
                for kind in list(self._writers):
                    self._seal(kind, ship=False)
                self._ship_ready()  # with the last sealed packs: one presign call for all
                self._wait_in_flight()
        finally:
            self._executor.shutdown(wait=True)

    def abort(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- under the lock ---------------------------------------------------------------------

    def _new_writer(self) -> PackWriter:
        return PackWriter(spool=tempfile.TemporaryFile(dir=self.spool_dir, prefix="pack-"))

    def _pack_target(self) -> int:
        return next_pack_target(self._sealed_bytes, self.target_pack_bytes)

    def _fold_trees_into_data(self) -> None:
        """The run's last trees join its last data pack if both fit in one pack: one PUT, not two."""
        trees, data = self._writers.get("tree"), self._writers.get("data")
        if trees is None or data is None:
            return
        if data.size + trees.size > self._pack_target() or data.count + trees.count > MAX_PACK_BLOBS:
            return
        for entry, stored in trees.stored_blobs():
            data.add_stored(entry.hash, entry.kind, entry.codec, stored, entry.raw_length)
        del self._writers["tree"]
        if trees.spool is not None:
            trees.spool.close()

    def _seal(self, kind: str, ship: bool = True) -> None:
        writer = self._writers.pop(kind, None)
        if writer is None or writer.count == 0:
            return
        sha256, size, entries = writer.finish_spool()
        assert writer.spool is not None  # every writer of the sink spools (_new_writer)
        self._ready.append(SealedPack(sha256, writer.spool, size, entries))
        self._sealed_bytes += size
        ready_bytes = sum(pack.size for pack in self._ready)
        batch_bytes = self.max_packs_per_batch * self.target_pack_bytes
        if ship and (len(self._ready) >= self._batch_size or ready_bytes >= batch_bytes):
            self._ship_ready()

    def _ship_ready(self) -> None:
        if not self._ready:
            return
        while len(self._in_flight) >= BATCHES_IN_FLIGHT:
            self._in_flight.popleft().result()  # re-raises a shipping failure in the producer
        batch, self._ready = self._ready, []
        self._in_flight.append(self._executor.submit(self.shipper.ship, batch))
        self._batch_size = min(2 * self._batch_size, self.max_packs_per_batch)

    def _wait_in_flight(self) -> None:
        while self._in_flight:
            self._in_flight.popleft().result()
