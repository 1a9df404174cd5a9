"""Adopting packs a crashed run PUT but never registered (`POST /packs/adopt`).

A run that crashed between a pack's PUT and its registration left the pack in the bucket with a
`presigned` item. The re-run cannot rebuild the same pack (its bytes depend on which file finished
reading first), so instead of sending the data again it asks the backend to register those packs
from their own trailers: two ranged GETs per pack, no pack bytes through the host's uplink.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.packs import PackEntry
from sysbackup_domain.retention import parse_iso_utc

from .index import PACK_CORRUPT, PACK_PRESIGNED, PACK_REGISTERED, PACK_VERIFIED, BlobIndex, PackCollecting
from .store import PackStore, pack_checksum

READ_PARALLELISM = 8
# gc deletes a never-registered pack once its item is older than the grace period (8 days by default);
# adopting only well inside that window keeps an adoption from racing gc's deletion of the same pack.
ADOPT_WITHIN = timedelta(days=3)


@dataclass
class AdoptOutcome:
    adopted: list[str] = field(default_factory=list)  # registered now as the caller's claims
    registered: list[str] = field(default_factory=list)  # already stored for the caller: nothing to do
    skipped: dict[str, str] = field(default_factory=dict)  # pack id -> why it was not adopted

    def to_json(self) -> dict[str, Any]:
        return {"adopted": self.adopted, "registered": self.registered, "skipped": self.skipped}


def already_stored_for(host: str, pack: dict[str, Any] | None) -> bool:
    """Whether this host need not upload nor register the pack: verified, or registered by this host.

    Another host's unverified registration does not count (its claims are its own): the caller gets
    a URL (its PUT is a 412, the object being there) and registers the pack as its own claim.
    """
    if pack is None:
        return False
    state = pack.get("state")
    return state == PACK_VERIFIED or (state == PACK_REGISTERED and host in pack.get("hosts", set()))


def adopt_packs(
    index: BlobIndex, store: PackStore, host: str, pack_ids: Sequence[str], max_entries: int
) -> AdoptOutcome:
    """Register the packs `host` presigned and PUT but never registered, reading their trailers.

    Only the presigning host may adopt (the item's `host`): a pack some other host presigned first is
    left to the normal path (presign, PUT answered 412, register). A pack whose object is absent, whose
    size or checksum differ from the presigned ones, or whose trailer is invalid is skipped with a
    reason; the host then sends its data again as usual.
    """
    outcome = AdoptOutcome()
    known = index.get_packs(pack_ids)
    candidates: list[tuple[str, int]] = []
    for pack_id in dict.fromkeys(pack_ids):
        item = known.get(pack_id)
        reason = _refusal(host, item)
        if already_stored_for(host, item):
            outcome.registered.append(pack_id)
        elif reason:
            outcome.skipped[pack_id] = reason
        else:
            candidates.append((pack_id, int(item["size"])))  # type: ignore[index]
    with ThreadPoolExecutor(max_workers=READ_PARALLELISM) as pool:
        read = list(pool.map(lambda candidate: _read_entries(store, *candidate), candidates))
    for (pack_id, _size), (entries, reason) in zip(candidates, read, strict=True):
        if reason is None and len(entries) > max_entries:
            reason = f"its trailer lists {len(entries)} blobs, more than {max_entries}"
        if reason is not None:
            outcome.skipped[pack_id] = reason
            continue
        try:
            index.register_pack(host, pack_id, entries)
        except PackCollecting:
            outcome.skipped[pack_id] = "being collected by gc"
            continue
        outcome.adopted.append(pack_id)
    return outcome


def _refusal(host: str, item: dict[str, Any] | None) -> str | None:
    if item is None:
        return "never presigned"
    if item.get("state") == PACK_CORRUPT:
        return "found corrupt"
    if item.get("host") != host:
        return "presigned by another host"
    if item.get("state") not in (PACK_PRESIGNED, PACK_REGISTERED):
        return f"in state {item.get('state')!r}"
    if not _presigned_recently(item):
        return "presigned too long ago (gc may be collecting it)"
    return None


def _presigned_recently(item: dict[str, Any]) -> bool:
    try:
        created = parse_iso_utc(item.get("created_at"))  # type: ignore[arg-type]
    except ValueError:
        return False  # no readable time: not provably young
    return datetime.now(timezone.utc) - created <= ADOPT_WITHIN


def _read_entries(store: PackStore, pack_id: str, size: int) -> tuple[list[PackEntry], str | None]:
    """The pack's trailer entries, or a reason it cannot be adopted."""
    head = store.head_pack(pack_id)
    if head is None:
        return [], "not uploaded"
    if head.size != size or head.checksum_sha256 != pack_checksum(pack_id):
        return [], "the object does not match its presigned size and SHA-256"
    try:
        return store.read_pack_trailer(pack_id, size), None
    except InvalidDocument as error:
        return [], f"invalid trailer: {error}"
