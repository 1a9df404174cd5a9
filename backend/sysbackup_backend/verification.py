"""Verifying a whole pack: its bytes hash to its id and every blob re-hashes to its trailer entry.

Used by the verifier function (packs a commit queued) and by `admin rebuild-index --verify`; the commit's
inline check of small packs can use `checked_pack_entries` the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from botocore.exceptions import ClientError
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.packs import PackEntry, verify_pack

from .registry import PACK_CORRUPT, PACK_PRESIGNED, PACK_VERIFIED, PackRegistry
from .store import PackStore, object_missing, pack_key

# Outcomes of `verify_registered_packs` besides the registry states it writes.
SKIPPED = "skipped"  # no item, or not `presigned` (already decided, or gc has it)
ABSENT = "absent"  # the item is presigned but the object is not in the bucket
MOVED_ON = "moved on"  # the item left `presigned`/`verified` while the pack was read (gc)


def checked_pack_entries(pack_id: str, data: bytes) -> list[PackEntry]:
    """The pack's entries once its SHA-256 is its id and every blob re-hashed; CorruptBlob or
    InvalidDocument on the first problem."""
    if hashlib.sha256(data).hexdigest() != pack_id:
        raise CorruptBlob("the pack's bytes do not hash to its key")
    return verify_pack(data)


@dataclass(frozen=True)
class VerifyOutcome:
    pack_id: str
    result: str  # PACK_VERIFIED, PACK_CORRUPT, SKIPPED, ABSENT or MOVED_ON
    detail: str | None = None  # the corruption, or why it was skipped


def _read_if_present(store: PackStore, pack_id: str) -> bytes | None:
    try:
        return store.read(pack_key(pack_id))
    except ClientError as error:
        if object_missing(error):
            return None
        raise


def verify_registered_packs(
    registry: PackRegistry, store: PackStore, pack_ids: Iterable[str]
) -> Iterator[VerifyOutcome]:
    """Read each `presigned` pack whole, re-hash it and record it verified or corrupt (idempotent); the
    next pack is read while this one is re-hashed: a Lambda's S3 GET of a 16-64 MiB pack takes about as
    long as hashing it, and both are billed."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-pack") as reader:
        upcoming: tuple[str, Future[bytes | VerifyOutcome]] | None = None
        for pack_id in pack_ids:
            following = (pack_id, reader.submit(_read_presigned, registry, store, pack_id))
            if upcoming is not None:
                yield _outcome_of(registry, *upcoming)
            upcoming = following
        if upcoming is not None:
            yield _outcome_of(registry, *upcoming)


def _outcome_of(registry: PackRegistry, pack_id: str, read: Future[bytes | VerifyOutcome]) -> VerifyOutcome:
    result = read.result()  # re-raises a failure to reach S3 or DynamoDB (the message is redelivered)
    return result if isinstance(result, VerifyOutcome) else _check_and_record(registry, pack_id, result)


def _read_presigned(registry: PackRegistry, store: PackStore, pack_id: str) -> bytes | VerifyOutcome:
    """The pack's bytes if its item is `presigned` and its object is there; else why not."""
    record = registry.get(pack_id)
    if record is None or record.state != PACK_PRESIGNED:
        return VerifyOutcome(pack_id, SKIPPED, record.state if record else "no registry item")
    data = _read_if_present(store, pack_id)
    return VerifyOutcome(pack_id, ABSENT) if data is None else data


def _check_and_record(registry: PackRegistry, pack_id: str, data: bytes) -> VerifyOutcome:
    try:
        entries = checked_pack_entries(pack_id, data)
    except (CorruptBlob, InvalidDocument) as error:
        recorded = registry.mark_corrupt(pack_id, str(error))
        return VerifyOutcome(pack_id, PACK_CORRUPT if recorded else MOVED_ON, str(error))
    if not registry.mark_verified(pack_id, len(entries)):
        return VerifyOutcome(pack_id, MOVED_ON)
    return VerifyOutcome(pack_id, PACK_VERIFIED)
