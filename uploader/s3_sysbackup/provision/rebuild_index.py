"""`admin rebuild-index`: the blob index again, from the packs in the bucket (disaster recovery).

Each pack carries its own table of contents (the trailer), so the index can be rebuilt from the bucket
alone: two ranged GETs per pack (the 12-byte tail, then the trailer). With `verify`, every pack is read
whole and each blob re-hashed, exactly as the verifier function does; without it the trailers are
trusted, which is right only if nobody could have uploaded a lying pack (hosts can: prefer --verify
unless the bucket is trusted). Writes go through the backend's own `BlobIndex`, so the items are the
verifier's: a blob already verified keeps its location, a pack recorded corrupt stays corrupt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError
from sysbackup_backend.index import PACK_CORRUPT, BlobIndex
from sysbackup_backend.store import PACKS_PREFIX, PackStore, pack_key
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import is_blob_hash
from sysbackup_domain.packs import (
    TRAILER_TAIL_BYTES,
    PackEntry,
    parse_trailer_bytes,
    verify_pack,
)

# Trailer reads are small and latency-bound; whole-pack reads hold up to 128 MiB each in memory.
PARALLEL_TRAILER_READS = 8
PARALLEL_PACK_READS = 2
PROGRESS_EVERY = 500


@dataclass(frozen=True)
class PackObject:
    pack_id: str
    size: int


@dataclass
class RebuildReport:
    packs_indexed: int = 0
    blobs_indexed: int = 0  # new verified items (blobs already verified elsewhere keep theirs)
    bytes_read: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)  # pack id -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it is not a pack to index


@dataclass(frozen=True)
class _Outcome:
    pack_id: str
    entries: list[PackEntry] | None
    bytes_read: int
    problem: str | None = None
    skipped: str | None = None


def list_packs(s3: Any, bucket: str, report: RebuildReport) -> Iterator[PackObject]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PACKS_PREFIX):
        for item in page.get("Contents", []):
            pack_id = item["Key"].removeprefix(PACKS_PREFIX)
            if not is_blob_hash(pack_id):
                report.skipped[item["Key"]] = "not named by a SHA-256"
                continue
            yield PackObject(pack_id, int(item["Size"]))


def read_trailer(store: PackStore, pack: PackObject) -> tuple[list[PackEntry], int]:
    """The pack's validated entries from two ranged GETs; (entries, bytes read)."""
    trailer = store.read_pack_trailer_bytes(pack.pack_id, pack.size)
    # read_range refuses short reads, so the tail read was exactly TRAILER_TAIL_BYTES.
    return parse_trailer_bytes(trailer, pack.size), TRAILER_TAIL_BYTES + len(trailer)


def read_and_verify(store: PackStore, pack: PackObject) -> tuple[list[PackEntry], int]:
    """The whole pack, its SHA-256 against its key and every blob re-hashed; (entries, bytes read)."""
    data = store.read(pack_key(pack.pack_id))
    if hashlib.sha256(data).hexdigest() != pack.pack_id:
        raise CorruptBlob("the pack's bytes do not hash to its key")
    return verify_pack(data), len(data)


def rebuild_index(
    s3: Any,
    bucket: str,
    index: BlobIndex,
    verify: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> RebuildReport:
    report = RebuildReport()
    store = PackStore(bucket, s3)
    reader = read_and_verify if verify else read_trailer

    def examine(pack: PackObject) -> _Outcome:
        if (index.get_pack(pack.pack_id) or {}).get("state") == PACK_CORRUPT:
            return _Outcome(pack.pack_id, None, 0, skipped="recorded corrupt by the verifier")
        try:
            entries, bytes_read = reader(store, pack)
        except (CorruptBlob, InvalidDocument) as error:
            return _Outcome(pack.pack_id, None, 0, problem=str(error))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "InvalidObjectState":
                raise
            # In a Glacier storage class: unreadable until restored, not corrupt.
            return _Outcome(pack.pack_id, None, 0, skipped="archived (restore it, then run again)")
        return _Outcome(pack.pack_id, entries, bytes_read)

    with ThreadPoolExecutor(max_workers=PARALLEL_PACK_READS if verify else PARALLEL_TRAILER_READS) as pool:
        for examined, outcome in enumerate(pool.map(examine, list_packs(s3, bucket, report)), start=1):
            if examined % PROGRESS_EVERY == 0:
                progress(f"{examined} packs examined, {report.blobs_indexed} blobs newly verified")
            report.bytes_read += outcome.bytes_read
            if outcome.skipped is not None:
                report.skipped[pack_key(outcome.pack_id)] = outcome.skipped
            elif outcome.problem is not None:
                index.record_corrupt(outcome.pack_id, outcome.problem)
                report.corrupt[outcome.pack_id] = outcome.problem
                progress(f"corrupt pack {outcome.pack_id}: {outcome.problem}")
            elif outcome.entries is not None:
                report.blobs_indexed += index.record_verified(outcome.pack_id, outcome.entries)
                report.packs_indexed += 1
    return report
