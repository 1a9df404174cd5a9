"""`POST /packs/presign`: which packs a host must upload and which are already stored for it.

The per-state rules of docs/PACK_INDEX.md ("HTTP API v2"). A pack id is the SHA-256 of the pack's bytes, so
an object at its key (with the recorded size and checksum) holds exactly the bytes the caller has: a host
that presigns a pack another host uploaded is let use it without sending it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sysbackup_domain.retention import iso_utc, parse_iso_utc

from .errors import Conflict, Unprocessable
from .registry import (
    PACK_CONDEMNED,
    PACK_CORRUPT,
    PACK_DELETING,
    PACK_PRESIGNED,
    PACK_VERIFIED,
    PackRecord,
    PackRegistry,
)
from .store import ObjectHead, PackStore, pack_checksum

HEAD_PARALLELISM = 8
# A pack's state can change under us (gc condemns or deletes it, another host revives it): re-read and
# decide again a few times, then give up on it as gc's (409: the host waits and retries).
MAX_SETTLE_ROUNDS = 4


@dataclass
class PresignPlan:
    uploads: dict[str, datetime] = field(default_factory=dict)  # pack id -> lock its URL must set
    stored: list[str] = field(default_factory=list)
    collecting: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)


def refuse_collecting(pack_ids: Iterable[str]) -> None:
    """409 naming the packs gc is deleting: the host waits and presigns them again."""
    collecting = sorted(pack_ids)
    if collecting:
        raise Conflict(
            "these packs are being collected by gc; wait and presign them again", collecting=collecting
        )


def refuse_corrupt(pack_ids: Iterable[str]) -> None:
    corrupt = sorted(pack_ids)
    if corrupt:
        raise Unprocessable("these packs were found corrupt; build new packs", corrupt=corrupt)


def refuse_wrong_sizes(sizes: Mapping[str, int], known: Mapping[str, PackRecord]) -> None:
    """A pack's size is fixed by its bytes: a size unlike the recorded one is a bad request."""
    wrong = sorted(pack_id for pack_id, record in known.items() if record.size != sizes[pack_id])
    if wrong:
        raise Unprocessable(
            "these packs were presigned before with another size: " + ", ".join(wrong), wrong_size=wrong
        )


class Presigner:
    """Decides, per pack, between a fresh upload URL and `stored`, updating the registry on the way."""

    def __init__(self, registry: PackRegistry, store: PackStore) -> None:
        self.registry = registry
        self.store = store

    def plan(self, host: str, sizes: Mapping[str, int], lock_until: datetime) -> PresignPlan:
        """Refuses (before writing anything) corrupt packs, packs gc is deleting and wrong sizes."""
        known = self.registry.get_many(sizes)
        refuse_corrupt(pack_id for pack_id, record in known.items() if record.state == PACK_CORRUPT)
        refuse_collecting(pack_id for pack_id, record in known.items() if record.state == PACK_DELETING)
        refuse_wrong_sizes(sizes, known)
        heads = self._heads(pack_id for pack_id, record in known.items() if _may_need_head(record))
        plan = PresignPlan()
        for pack_id, size in sizes.items():
            record = known.get(pack_id)
            if record is None:
                record = self.registry.record_presigned(pack_id, host, size, iso_utc(lock_until))
                if _fresh_for(record, host):
                    plan.uploads[pack_id] = lock_until
                    continue
            self._settle(plan, host, record, heads, lock_until)
        return plan

    def _settle(
        self,
        plan: PresignPlan,
        host: str,
        record: PackRecord,
        heads: dict[str, ObjectHead | None],
        lock_until: datetime,
    ) -> None:
        """File one existing pack under `plan`'s uploads, stored, collecting or corrupt."""
        pack_id = record.pack_id
        for _ in range(MAX_SETTLE_ROUNDS):
            if record.state == PACK_CORRUPT:
                plan.corrupt.append(pack_id)
                return
            if record.state == PACK_DELETING:
                break
            if record.state == PACK_CONDEMNED:
                self.registry.revive(pack_id)  # lost to gc or another host: the re-read says which
            elif host not in record.hosts:
                self.registry.add_host(pack_id, host)
            elif record.state == PACK_VERIFIED or self._landed(record, heads):
                plan.stored.append(pack_id)
                return
            else:
                # A lock at least as long as the one recorded: the retention worker trusts the record.
                plan.uploads[pack_id] = max(lock_until, parse_iso_utc(record.retain_until))
                return
            reread = self.registry.get(pack_id)
            if reread is None:  # gc dropped it in between: start afresh
                reread = self.registry.record_presigned(pack_id, host, record.size, iso_utc(lock_until))
            record = reread
        plan.collecting.append(pack_id)

    def _landed(self, record: PackRecord, heads: dict[str, ObjectHead | None]) -> bool:
        """The pack's object is in the bucket, with the recorded size and the id's checksum."""
        if record.pack_id not in heads:
            heads[record.pack_id] = self.store.head_pack(record.pack_id)
        head = heads[record.pack_id]
        return (
            head is not None
            and head.size == record.size
            and head.checksum_sha256 == pack_checksum(record.pack_id)
        )

    def _heads(self, pack_ids: Iterable[str]) -> dict[str, ObjectHead | None]:
        """HEADs in parallel: up to 100 packs a call must stay well inside API Gateway's 29 s."""
        wanted = sorted(pack_ids)
        if not wanted:
            return {}
        with ThreadPoolExecutor(max_workers=HEAD_PARALLELISM) as pool:
            return dict(zip(wanted, pool.map(self.store.head_pack, wanted), strict=True))


def _may_need_head(record: PackRecord) -> bool:
    """Only a presigned pack (or one condemned while presigned) may or may not have its object yet."""
    state = record.state_before_condemned if record.state == PACK_CONDEMNED else record.state
    return state == PACK_PRESIGNED


def _fresh_for(record: PackRecord, host: str) -> bool:
    """The item this call just created (or the host's own untouched one): it needs a URL, no HEAD."""
    return record.state == PACK_PRESIGNED and record.hosts == {host}
