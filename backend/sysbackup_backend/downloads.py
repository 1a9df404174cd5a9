"""What the restore API answers: a host's packs page by page, and presigned GETs for packs it may read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sysbackup_domain.hashing import is_blob_hash

from .catalogue import page_token, token_after
from .registry import PACK_DELETING, PackRecord, PackRegistry
from .store import PackStore, pack_key

DEFAULT_PACK_PAGE_LIMIT = 1000
MAX_PACK_PAGE_LIMIT = 1000
MAX_PACKS_PER_DOWNLOAD = 200

# Why a requested pack gets no URL (the same words as a commit's refusal).
UNKNOWN = "unknown"
NOT_YOURS = "not_yours"
DELETING = "deleting"


def pack_page_token(host: str, pack_id: str) -> str:
    """The `next` token of `GET /packs`: the catalogue's token format, naming the host and the last pack."""
    return page_token(host, pack_id)


def pack_after(token: str, host: str) -> str:
    """The pack id a `pack_page_token(host, ...)` continues after; BadRequest otherwise."""
    return token_after(token, host, is_blob_hash)


def pack_page(registry: PackRegistry, host: str, limit: int, token: str | None) -> dict[str, Any]:
    """One page of the packs `host` first presigned, in pack id order (`GET /packs`)."""
    after = pack_after(token, host) if token is not None else None
    records, next_after = registry.list_host(host, limit, after)
    return {
        "packs": [
            {"pack_id": record.pack_id, "size": record.size, "state": record.state} for record in records
        ],
        "next": pack_page_token(host, next_after) if next_after is not None else None,
    }


def refusal(record: PackRecord | None, host: str) -> str | None:
    """Why `host` may not download the pack, or None if it may (any state but `deleting`: a restore
    still wants the good blobs of a corrupt or condemned pack, and re-hashes each one it reads)."""
    if record is None:
        return UNKNOWN
    if host not in record.hosts:
        return NOT_YOURS
    if record.state == PACK_DELETING:
        return DELETING
    return None


@dataclass
class DownloadAnswer:
    urls: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"urls": self.urls, "sizes": self.sizes, "missing": self.missing}


def download_urls(
    registry: PackRegistry, store: PackStore, host: str, pack_ids: Sequence[str], expires_in: int
) -> DownloadAnswer:
    """Presigned GETs (ranged reads allowed) for the packs `host` may read; the others with the reason."""
    records = registry.get_many(pack_ids)
    answer = DownloadAnswer()
    for pack_id in dict.fromkeys(pack_ids):
        record = records.get(pack_id)
        reason = refusal(record, host)
        if reason is not None:
            answer.missing[pack_id] = reason
            continue
        assert record is not None  # refusal() answers UNKNOWN for a pack without an item
        answer.urls[pack_id] = store.presign_get(pack_key(pack_id), expires_in)
        answer.sizes[pack_id] = record.size
    return answer
