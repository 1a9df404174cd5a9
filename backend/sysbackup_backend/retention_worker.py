"""Pack lock extension: requests on RetentionQueue and the worker (ExtendRetentionFunction) applying them.

A pack must stay locked until at least the latest retain_until of any manifest using it. Commits request
extensions for the packs their walk saw (new packs mostly), gc for every live pack whose lock falls short of
its manifests (packs reused under unchanged subtrees). Both only enqueue: a commit of a million files sends a
few SendMessageBatch calls (hundreds of packs per message), never thousands of S3 calls inside its 29 s.
The worker reads each pack's recorded lock and extends only what falls short, `fold_window` past the need
(sysbackup_domain.keep.lock_extension), so a pack is extended about once per fold window.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from botocore.exceptions import ClientError
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import is_blob_hash
from sysbackup_domain.keep import lock_extension
from sysbackup_domain.retention import iso_utc, parse_iso_utc

from .dynamo import chunks
from .registry import USABLE_STATES, PackRecord, PackRegistry
from .store import object_missing, pack_key

# ~70 bytes per pack id in JSON: 300 per message keeps a full batch of 10 far below SQS's 256 KiB.
PACKS_PER_MESSAGE = 300
SQS_BATCH_ENTRIES = 10
# S3 calls of one message run in parallel; a message of 300 packs is then a few seconds.
PARALLEL_EXTENSIONS = 8


@dataclass(frozen=True)
class ExtensionRequest:
    """Lock these packs until at least `retain_until` (asked for by `source`: a manifest id or gc)."""

    pack_ids: tuple[str, ...]
    retain_until: datetime
    source: str

    def to_json(self) -> dict[str, Any]:
        return {
            "packs": list(self.pack_ids),
            "retain_until": iso_utc(self.retain_until),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, document: object) -> ExtensionRequest:
        if not isinstance(document, dict):
            raise InvalidDocument("an extension request is a JSON object")
        packs = document.get("packs")
        if not isinstance(packs, list) or not packs or len(packs) > PACKS_PER_MESSAGE:
            raise InvalidDocument(f"packs must list 1..{PACKS_PER_MESSAGE} pack ids")
        if not all(is_blob_hash(pack_id) for pack_id in packs):
            raise InvalidDocument("a pack id is not a SHA-256 hex digest")
        try:
            until = parse_iso_utc(document.get("retain_until"))  # type: ignore[arg-type]
        except ValueError as error:
            raise InvalidDocument(f"retain_until: {error}") from None
        source = document.get("source")
        if not isinstance(source, str) or not source:
            raise InvalidDocument("source must be a non-empty string")
        return cls(tuple(packs), until, source)


class RetentionQueue:
    """Sends extension requests to RetentionQueue (SQS)."""

    def __init__(self, queue_url: str, client: Any) -> None:
        self.queue_url = queue_url
        self.client = client

    def request(self, pack_ids: Iterable[str], retain_until: datetime, source: str) -> int:
        """Enqueue extensions for the packs; returns the number of messages sent. Raises if SQS refuses."""
        ordered = sorted(set(pack_ids))
        messages = [
            json.dumps(ExtensionRequest(tuple(group), retain_until, source).to_json())
            for group in chunks(ordered, PACKS_PER_MESSAGE)
        ]
        for batch in chunks(messages, SQS_BATCH_ENTRIES):
            response = self.client.send_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(number), "MessageBody": body} for number, body in enumerate(batch)],
            )
            if response.get("Failed"):
                raise RuntimeError(
                    f"RetentionQueue refused {len(response['Failed'])} messages: {response['Failed'][:3]}"
                )
        return len(messages)


@dataclass
class ExtensionReport:
    extended: list[str] = field(default_factory=list)
    already_locked: list[str] = field(default_factory=list)
    not_uploaded: list[str] = field(default_factory=list)  # no item, or no object behind a presigned one
    not_live: list[str] = field(default_factory=list)  # condemned, being deleted or corrupt: no manifest's

    def to_json(self) -> dict[str, Any]:
        return {
            "extended": len(self.extended),
            "already_locked": len(self.already_locked),
            "not_uploaded": len(self.not_uploaded),
            "not_live": len(self.not_live),
        }


class LockExtender:
    """Applies extension requests: PutObjectRetention on the pack, then the pack item's retain_until."""

    def __init__(
        self, registry: PackRegistry, s3: Any, bucket: str, lock_mode: str, fold_window: timedelta
    ) -> None:
        self.registry = registry
        self.s3 = s3
        self.bucket = bucket
        self.lock_mode = lock_mode
        self.fold_window = fold_window

    def apply(self, request: ExtensionRequest) -> ExtensionReport:
        report = ExtensionReport()
        records = self.registry.get_many(request.pack_ids)
        targets: dict[str, datetime] = {}
        for pack_id in request.pack_ids:
            record = records.get(pack_id)
            if record is None:
                report.not_uploaded.append(pack_id)
            elif record.state not in USABLE_STATES:
                # A commit that used it was refused (or gc repacked it): locking it longer only delays gc.
                report.not_live.append(pack_id)
            elif (target := self._target(request, record)) is None:
                report.already_locked.append(pack_id)
            else:
                targets[pack_id] = target
        if targets:
            with ThreadPoolExecutor(max_workers=min(PARALLEL_EXTENSIONS, len(targets))) as pool:
                outcomes = list(pool.map(lambda pair: self._extend(*pair), targets.items()))
            for pack_id, extended in zip(targets, outcomes, strict=True):
                (report.extended if extended else report.not_uploaded).append(pack_id)
        return report

    def _target(self, request: ExtensionRequest, record: PackRecord) -> datetime | None:
        """The new lock end, or None if the recorded lock suffices (a presigned pack's is its PUT's lock)."""
        return lock_extension(request.retain_until, parse_iso_utc(record.retain_until), self.fold_window)

    def _extend(self, pack_id: str, until: datetime) -> bool:
        """Lock the pack's current version until `until`; False if the bucket has no such pack."""
        try:
            self.s3.put_object_retention(
                Bucket=self.bucket,
                Key=pack_key(pack_id),
                Retention={"Mode": self.lock_mode, "RetainUntilDate": until},
            )
        except ClientError as error:
            if object_missing(error):
                return False
            raise
        # The item remembers the lock (only ever later), so repeated requests cost no S3 call.
        self.registry.raise_retain_until(pack_id, iso_utc(until))
        return True


def queue_from_environment(
    env: Mapping[str, str], client_factory: Callable[[], Any]
) -> RetentionQueue | None:
    """RetentionQueue from RETENTION_QUEUE_URL, or None where the function has no queue (not wired)."""
    url = str(env.get("RETENTION_QUEUE_URL", "")).strip()
    return RetentionQueue(url, client_factory()) if url else None
