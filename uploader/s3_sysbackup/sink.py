"""Where new blobs go: dedup check, packing, and shipping packs (presign -> PUT -> register).

Memory is bounded: at most `pending_limit` bytes of blobs wait for a dedup answer, one batch of
sealed packs is being filled while at most one other batch is on the wire, plus the open writers.
Producers (file-reading threads) block while the sink is full: that is the backpressure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from sysbackup_domain.compression import compress_if_worth
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import TARGET_PACK_BYTES, PackEntry, PackWriter

from .api import CHECK_BATCH, ApiClient, ApiError
from .transfer import Transfer

logger = logging.getLogger(__name__)

FAULT_ENV = "S3SB_FAULT"
# Memory, measured on the stdlib tree (bench/compare.py): with 32 MiB waiting for the dedup answer and
# packs shipped two at a time the first backup peaked at 191 MB; each 16 MiB pack shipped as it is
# sealed costs one presign and one register call more per two packs, a negligible share of a run's bill.
PENDING_LIMIT_BYTES = 16 * 1024 * 1024
PACKS_PER_BATCH = 1
PARALLEL_PUTS = 4
# Waits before sending again packs gc is deleting (POST /packs/presign or /packs/register answered 409
# with `collecting`): its deletion of one pack takes seconds; a crashed gc run's is finished by the next.
COLLECTING_WAITS_S = (5, 15, 45)


class InjectedFault(RuntimeError):
    """TEST ONLY: raised at a named point when `S3SB_FAULT` names it, to simulate a crash there.

    Points: `after-pack-put` (a pack is in S3 but not registered), `after-register` (packs are
    registered, nothing committed), `mid-commit` (the manifest is committed, the cache not updated).
    """


def fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        raise InjectedFault(f"injected fault at {name} ({FAULT_ENV} is set: test use only)")


@dataclass
class SealedPack:
    sha256: str
    data: bytes
    entries: list[PackEntry]

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class ShipCounts:
    packs: int = 0
    data_packs: int = 0
    bytes_uploaded: int = 0
    blobs_new: int = 0
    packs_already_there: int = 0


@dataclass
class _Pending:
    kind: str
    codec: str
    stored: bytes
    raw_length: int


class PackShipper:
    """Uploads a batch of sealed packs: one presign call, parallel PUTs, one register call."""

    sleep = staticmethod(time.sleep)  # between sends of packs gc is collecting

    def __init__(
        self,
        api: ApiClient,
        transfer: Transfer,
        parallel_puts: int = PARALLEL_PUTS,
        before_put: Callable[[list[str]], None] | None = None,
    ) -> None:
        """`before_put` gets the ids of packs about to be PUT (the cache records them for adoption)."""
        self.api = api
        self.transfer = transfer
        self.parallel_puts = parallel_puts
        self.before_put = before_put
        self.counts = ShipCounts()

    def ship(self, packs: list[SealedPack]) -> None:
        """Presign, PUT and register `packs`; waits out gc deleting an identical old pack (409 collecting)."""
        for wait_s in (*COLLECTING_WAITS_S, None):
            try:
                self._ship_once(packs)
                return
            except ApiError as error:
                collecting = error.body.get("collecting") if isinstance(error.body, dict) else None
                if error.status != 409 or not collecting or wait_s is None:
                    raise
                # gc is deleting an old pack byte-identical to ours: once it is gone (seconds), presign
                # makes a fresh one and our PUT lands; meanwhile the backend takes no claim on it.
                logger.warning("gc is collecting packs %s; sending them again in %d s", collecting, wait_s)
                self.sleep(wait_s)

    def _ship_once(self, packs: list[SealedPack]) -> None:
        uploads, registered = self.api.presign_packs([{"sha256": p.sha256, "size": p.size} for p in packs])
        upload_for = {upload.get("pack_id"): upload for upload in uploads}
        # A re-run after a crash: packs registered by the crashed run are not sent again.
        to_send = [p for p in packs if p.sha256 not in registered]
        missing = [p.sha256 for p in to_send if p.sha256 not in upload_for]
        if missing:
            raise RuntimeError(f"POST /packs/presign returned no upload for packs {missing}")
        if to_send and self.before_put is not None:
            self.before_put([p.sha256 for p in to_send])
        with ThreadPoolExecutor(max_workers=self.parallel_puts, thread_name_prefix="put") as pool:
            results = list(pool.map(lambda p: self._put(p, upload_for[p.sha256]), to_send))
        fault_point("after-pack-put")
        # Packs presign calls registered are registered again too: this run sends only blobs the backend
        # said it lacks, so their claims there were condemned by gc; a fresh claim stores them again.
        self.api.register_packs(
            [{"pack_id": p.sha256, "blobs": [e.to_json() for e in p.entries]} for p in packs]
        )
        fault_point("after-register")
        for pack, uploaded in zip(to_send, results, strict=True):
            self.counts.packs += 1
            self.counts.data_packs += pack.entries[0].kind == "data"  # packs hold one kind only
            self.counts.blobs_new += len(pack.entries)
            if uploaded:
                self.counts.bytes_uploaded += pack.size
            else:
                self.counts.packs_already_there += 1

    def _put(self, pack: SealedPack, upload: dict) -> bool:
        headers = upload.get("headers") or {}
        return self.transfer.put_pack(upload["url"], headers, pack.data)


@dataclass
class BlobSink:
    """Accepts blobs (thread-safe), drops the ones already stored, packs and ships the rest."""

    api: ApiClient
    shipper: PackShipper
    known_stored: set[str]
    pending_limit: int = PENDING_LIMIT_BYTES
    packs_per_batch: int = PACKS_PER_BATCH
    target_pack_bytes: int = TARGET_PACK_BYTES
    _seen: set[str] = field(default_factory=set)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _pending_bytes: int = 0
    _writers: dict[str, PackWriter] = field(default_factory=dict)
    _ready: list[SealedPack] = field(default_factory=list)
    _in_flight: Future | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="ship")
    )

    def is_known_stored(self, digest: str) -> bool:
        """True if the parent manifest references the blob (so it is stored, and stays so while retained)."""
        return digest in self.known_stored

    def needs(self, digest: str) -> bool:
        """False if the blob is known stored or already on its way: no need to compress it."""
        with self._lock:
            return digest not in self.known_stored and digest not in self._seen

    def add(self, digest: str, kind: str, codec: str, stored: bytes, raw_length: int) -> None:
        with self._lock:
            if digest in self.known_stored or digest in self._seen:
                return
            self._seen.add(digest)
            self._pending[digest] = _Pending(kind, codec, stored, raw_length)
            self._pending_bytes += len(stored)
            if len(self._pending) >= CHECK_BATCH or self._pending_bytes >= self.pending_limit:
                self._flush_pending()

    def add_plaintext(self, kind: str, plaintext: bytes) -> str:
        """Hash, compress if new, add; returns the hash. Safe from any thread."""
        digest = blob_hash(plaintext)
        if self.needs(digest):
            codec, stored = compress_if_worth(plaintext)
            self.add(digest, kind, codec, stored, len(plaintext))
        return digest

    def finish(self) -> None:
        """Send everything still held; returns when every blob added is registered."""
        try:
            with self._lock:
                self._flush_pending()
                for kind in list(self._writers):
                    self._seal(kind)
                self._ship_ready()
                self._wait_in_flight()
        finally:
            self._executor.shutdown(wait=True)

    def abort(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- under the lock ---------------------------------------------------------------------

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        already = self.api.check_blobs(self._pending)
        for digest, blob in self._pending.items():
            if digest in already:
                continue
            writer = self._writers.get(blob.kind)
            if writer is not None and not writer.has_room(len(blob.stored)):
                self._seal(blob.kind)
                writer = None
            if writer is None:
                writer = self._writers[blob.kind] = PackWriter()
            writer.add_stored(digest, blob.kind, blob.codec, blob.stored, blob.raw_length)
            if writer.size >= self.target_pack_bytes:
                self._seal(blob.kind)
        self._pending.clear()
        self._pending_bytes = 0

    def _seal(self, kind: str) -> None:
        writer = self._writers.pop(kind, None)
        if writer is None or writer.count == 0:
            return
        data, entries = writer.finish()
        self._ready.append(SealedPack(hashlib.sha256(data).hexdigest(), data, entries))
        if len(self._ready) >= self.packs_per_batch:
            self._ship_ready()

    def _ship_ready(self) -> None:
        if not self._ready:
            return
        self._wait_in_flight()  # at most one batch on the wire
        batch, self._ready = self._ready, []
        self._in_flight = self._executor.submit(self.shipper.ship, batch)

    def _wait_in_flight(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()  # re-raises a shipping failure in the producer
