"""Build the host's local index from the packs themselves (docs/PACK_INDEX.md, "Uploader").

A new or lost cache, a restore on another machine or of another host (`--host`), or a blob the index
does not know: `GET /packs` lists the packs the host may use, `POST /downloads` gives presigned GETs,
and one ranged GET of each unknown pack's tail (two when its trailer is larger than the first read)
yields its trailer: blob -> (offset, length, codec). Trailers are untrusted input like any stored
byte: `parse_trailer_bytes` validates them, and every blob read later is re-hashed anyway.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.packs import (
    PackEntry,
    parse_trailer_bytes,
    read_trailer_bytes,
)

from .api import ApiClient
from .cache import IndexedBlob
from .transfer import Transfer, TransferError

logger = logging.getLogger(__name__)

# The first ranged read of a pack's end: a trailer is ~60 bytes a blob compressed, so 64 KiB holds
# the whole trailer of most packs and the tail in one GET.
FIRST_TAIL_READ_BYTES = 64 * 1024
PARALLEL_TAIL_READS = 8
# Packs whose blobs a host may read or reference; the others would be refused by the commit.
USABLE_STATES = frozenset({"presigned", "verified"})
PROGRESS_EVERY_PACKS = 100
URL_ROUND_PACKS = 1000  # presigned GETs live 300 s: ask for them a round at a time


class LocalIndex(Protocol):
    """Where blobs are, as this process knows it: the cache's tables or an in-memory map."""

    def known_packs(self) -> dict[str, int]: ...

    def locate(self, hashes: Iterable[str]) -> dict[str, IndexedBlob]: ...

    def trees_in(self, pack_ids: Iterable[str]) -> dict[str, IndexedBlob]: ...

    def record_pack(self, pack_id: str, size: int, entries: Sequence[PackEntry]) -> None: ...

    def drop_packs(self, pack_ids: Iterable[str]) -> None: ...


@dataclass
class MemoryIndex:
    """A local index that lives only as long as the process (a restore of another host's backups)."""

    packs: dict[str, int] = field(default_factory=dict)
    blobs: dict[str, IndexedBlob] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def known_packs(self) -> dict[str, int]:
        return dict(self.packs)

    def locate(self, hashes: Iterable[str]) -> dict[str, IndexedBlob]:
        return {digest: self.blobs[digest] for digest in set(hashes) if digest in self.blobs}

    def trees_in(self, pack_ids: Iterable[str]) -> dict[str, IndexedBlob]:
        wanted = set(pack_ids)
        return {h: b for h, b in self.blobs.items() if b.pack_id in wanted and b.entry.kind == "tree"}

    def record_pack(self, pack_id: str, size: int, entries: Sequence[PackEntry]) -> None:
        with self._lock:
            self.packs[pack_id] = size
            self.blobs.update((entry.hash, IndexedBlob(pack_id, entry)) for entry in entries)

    def drop_packs(self, pack_ids: Iterable[str]) -> None:
        gone = set(pack_ids)
        if not gone:
            return
        with self._lock:
            for pack_id in gone:
                self.packs.pop(pack_id, None)
            self.blobs = {h: b for h, b in self.blobs.items() if b.pack_id not in gone}


@dataclass
class RebuildReport:
    packs_listed: int = 0
    packs_read: int = 0
    blobs_indexed: int = 0
    dropped: int = 0  # known packs no longer usable, forgotten
    skipped: dict[str, str] = field(default_factory=dict)  # pack_id -> why it was not indexed


def rebuild_index(
    api: ApiClient,
    transfer: Transfer,
    index: LocalIndex,
    host: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> RebuildReport:
    """Index every usable pack the backend lists for the host that `index` does not know yet."""
    rebuild = _Rebuild(api, transfer, index, host, progress)
    listed = api.list_packs(host=host)
    rebuild.report.packs_listed = len(listed)
    known = index.known_packs()
    unusable_known = []
    for pack in listed:
        pack_id, state = str(pack.get("pack_id")), pack.get("state")
        if pack_id in known:
            if state not in USABLE_STATES:
                unusable_known.append(pack_id)
            continue
        if state not in USABLE_STATES:
            rebuild.report.skipped[pack_id] = f"state {state}"
            continue
        rebuild.sizes[pack_id] = int(pack.get("size") or 0)
    # Known packs gc condemned (or is deleting): a commit would refuse them, so their blobs are sent
    # again instead. (Packs the list lacks stay: the list may lag a pack presigned a moment ago.)
    index.drop_packs(unusable_known)
    rebuild.report.dropped = len(unusable_known)
    wanted = sorted(rebuild.sizes)
    for start in range(0, len(wanted), URL_ROUND_PACKS):
        rebuild.index_round(wanted[start : start + URL_ROUND_PACKS], total=len(wanted))
    report = rebuild.report
    if wanted:
        logger.info(
            "local index: %d packs read, %d blobs indexed, %d skipped",
            report.packs_read,
            report.blobs_indexed,
            len(report.skipped),
        )
    return report


@dataclass
class _Rebuild:
    api: ApiClient
    transfer: Transfer
    index: LocalIndex
    host: str | None
    progress: Callable[[str], None] | None
    sizes: dict[str, int] = field(default_factory=dict)  # pack_id -> size, as listed
    report: RebuildReport = field(default_factory=RebuildReport)
    _lock: threading.Lock = field(default_factory=threading.Lock)  # the report, from the read threads

    def index_round(self, pack_ids: list[str], total: int) -> None:
        """One POST /downloads for `pack_ids`, then their trailers, PARALLEL_TAIL_READS at a time."""
        downloads = self.api.download_urls(pack_ids, host=self.host)
        self.report.skipped.update(downloads.missing)

        def read_one(pack_id: str) -> None:
            size = int(downloads.sizes.get(pack_id, self.sizes[pack_id]))
            try:
                entries = read_trailer(self.transfer, downloads.urls[pack_id], size)
            except (TransferError, InvalidDocument) as error:
                # An upload that never arrived (a crashed run), or a damaged pack: its blobs go again.
                with self._lock:
                    self.report.skipped[pack_id] = str(error)
                return
            self.index.record_pack(pack_id, size, entries)
            with self._lock:
                self.report.packs_read += 1
                self.report.blobs_indexed += len(entries)
                read = self.report.packs_read
            if self.progress is not None and read % PROGRESS_EVERY_PACKS == 0:
                self.progress(f"local index: {read}/{total} pack trailers read")

        readable = [pack_id for pack_id in pack_ids if pack_id in downloads.urls]
        with ThreadPoolExecutor(max_workers=PARALLEL_TAIL_READS, thread_name_prefix="tail") as pool:
            list(pool.map(read_one, readable))


def read_trailer(transfer: Transfer, url: str, size: int) -> list[PackEntry]:
    """A pack's validated trailer entries from one ranged GET of its end (two if the trailer is large)."""
    trailer = read_trailer_bytes(
        lambda start, length: transfer.get_range(url, start, length), size, FIRST_TAIL_READ_BYTES
    )
    return parse_trailer_bytes(trailer, size)
