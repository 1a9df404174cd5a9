"""Garbage collection (index v2, docs/PACK_INDEX.md "gc v2"): forget, mark, condemn packs, later delete them.

One run (GcFunction, on a schedule, under GcRole):

1. Lease: one run at a time (an item in JobsTable that expires, so a crashed run never blocks the next).
2. Forget: per host, manifests outside the keep rules (sysbackup_domain.keep; never the newest, never below
   the minimum, never one still locked) lose their catalogue item, then their documents' lapsed versions.
3. Map and mark (sysbackup_backend.gc_mark): every registry pack not `deleting` has its trailer read
   (`hash -> [pack_id]`); from every kept manifest (root tree, snapshot stream indexes) the Merkle tree is
   walked, trees read through that map. A blob is reached *for a host* (the manifest's): only packs whose
   `hosts` hold that host can serve it. A mark that cannot finish stops the run before anything is condemned.
4. Repack, first half: a live pack whose live blob bytes are a small share is rewritten: its live blobs go
   into a new pack (same hosts, locked, If-None-Match, like a host's upload), recorded as verified.
5. Condemning window (gc's epoch odd, see GcEpoch): manifests committed since the mark are marked too, with
   the registry scanned again; then (gc_mark.judge) a pack is
   - live if it holds a blob reached for one of its hosts and is not condemned (the lock need is the latest
     retain_until of the manifests reaching it);
   - revived if it is condemned but some blob reached for one of its hosts has no other usable holder for
     that host (a commit raced gc, or a repacked pack failed);
   - condemned if nothing reaches it and it is older than the grace period (younger ones may belong to a
     backup in flight); repacked packs are condemned with `superseded_by` their new pack.
6. Delete: a pack condemned longer than the grace period goes once no version of it is locked (GOVERNANCE
   locks are bypassed only if the policy says so): `deleting` first (conditional on `condemned_at`: a pack
   presign revived meanwhile stays), then every version by version id, then its item. A crashed run's
   `deleting` pack is finished by the next run.
7. Locks: live packs whose recorded lock ends before their manifests' latest retain_until are sent to the
   retention worker (RetentionQueue).

`dry_run` computes and reports all of it and writes nothing. Every write is conditional and idempotent, so
a run that crashes anywhere is finished by the next one.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.keep import GcPolicy, KeepRules, ManifestTimes, lock_extension, select_kept
from sysbackup_domain.manifest import decode_manifest
from sysbackup_domain.packs import PackEntry, PackWriter, open_blob
from sysbackup_domain.retention import iso_utc, parse_iso_utc

from .catalogue import HEAD_ID, Catalogue, ManifestSummary
from .dynamo import is_condition_failure
from .errors import SettingsError
from .gc_mark import GcIncomplete, Marker, PackMap, Reach, Verdicts, judge, live_blobs, mostly_dead
from .registry import (
    PACK_CONDEMNED,
    PACK_CORRUPT,
    PACK_DELETING,
    PACK_PRESIGNED,
    USABLE_STATES,
    PackRecord,
    PackRegistry,
)
from .retention_worker import RetentionQueue
from .settings import non_negative_int
from .store import PackStore, pack_checksum, pack_key
from .walk import BlobPlace, read_stored_blobs

logger = Logger(child=True)

LEASE_ID = "gc#lease"
# Longer than GcFunction's timeout: a lease outlives its run only when the run crashed.
LEASE_SECONDS = 20 * 60
# The report lists at most this many deleted pack ids (it is a Lambda result: 6 MB at most); counts are exact.
MAX_LISTED_PACKS = 1000


# --------------------------------------------------------------------------------------------- settings


def policy_from_environment(env: Mapping[str, str]) -> GcPolicy:
    """GcPolicy from the template's parameters (KEEP_*, MINIMUM_REDUNDANCY, GRACE/FOLD seconds, ...)."""
    ratio_raw = str(env.get("REPACK_LIVE_RATIO", "")).strip() or "0.25"
    try:
        ratio = float(ratio_raw)
        return GcPolicy(
            keep=KeepRules(
                last=non_negative_int(env, "KEEP_LAST", 1),
                daily=non_negative_int(env, "KEEP_DAILY", 7),
                weekly=non_negative_int(env, "KEEP_WEEKLY", 5),
                monthly=non_negative_int(env, "KEEP_MONTHLY", 12),
                yearly=non_negative_int(env, "KEEP_YEARLY", 3),
                minimum=non_negative_int(env, "MINIMUM_REDUNDANCY", 3),
            ),
            grace=timedelta(seconds=non_negative_int(env, "GRACE_PERIOD_SECONDS", 8 * 24 * 3600)),
            fold_window=timedelta(seconds=non_negative_int(env, "FOLD_WINDOW_SECONDS", 7 * 24 * 3600)),
            repack_live_ratio=ratio,
            bypass_governance=str(env.get("GC_BYPASS_GOVERNANCE", "false")).strip().lower() == "true",
        )
    except ValueError as error:
        raise SettingsError(f"gc settings: {error}") from None


# --------------------------------------------------------------------------------------------- report


@dataclass
class GcReport:
    """What a run did (or, dry, would do). `blobs_*` count the blobs of live / condemned / revived packs;
    `redundant_claims_dropped` and `closed_marks_dropped` stay 0 since index v2 (no per-blob items)."""

    dry_run: bool
    started: str
    complete: bool = False
    skipped: str | None = None
    hosts: int = 0
    manifests_kept: int = 0
    manifests_forgotten: int = 0
    manifest_versions_deleted: int = 0
    trees_read: int = 0
    blobs_live: int = 0
    blobs_condemned: int = 0
    blobs_revived: int = 0
    redundant_claims_dropped: int = 0
    closed_marks_dropped: int = 0
    packs_live: int = 0
    packs_condemned: int = 0
    packs_revived: int = 0
    packs_deleted: int = 0
    pack_versions_deleted: int = 0
    packs_waiting_for_lock: int = 0
    orphan_packs_deleted: int = 0
    packs_mostly_dead: int = 0
    packs_repacked: int = 0
    bytes_repacked: int = 0
    bytes_freed: int = 0
    lock_extensions_requested: int = 0
    forgotten: dict[str, list[str]] = field(default_factory=dict)
    deleted_packs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------------------------- gc epoch

EPOCH_KEY = {"pk": "gc#epoch", "sk": "epoch"}


@dataclass(frozen=True)
class GcEpoch:
    """A counter in BlobIndexTable that gc makes odd while it condemns and even again after.

    A commit records the (even) epoch its walk started in and its transaction checks it is unchanged: a walk
    that may have seen a pack usable before gc condemned it never commits; it walks again (and is refused
    the condemned pack). An odd epoch past `condemning_until` is a crashed run's.
    """

    number: int
    condemning_until: str | None

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> GcEpoch:
        """From the epoch item (a table without one is at epoch 0)."""
        return cls(int(item.get("number", 0)), item.get("condemning_until"))

    def stable(self, now: datetime) -> bool:
        return self.number % 2 == 0 or (self.condemning_until or "") < iso_utc(now)


def read_gc_epoch(registry: PackRegistry) -> GcEpoch:
    response = registry.client.get_item(TableName=registry.table_name, Key=EPOCH_KEY, ConsistentRead=True)
    return GcEpoch.from_item(response.get("Item") or {})


def epoch_unchanged_check(registry: PackRegistry, number: int) -> dict[str, Any]:
    """A transaction item that fails if gc has opened a condemning window since `number` was read."""
    if number == 0:
        condition: dict[str, Any] = {"ConditionExpression": "attribute_not_exists(pk)"}
    else:
        condition = {
            "ConditionExpression": "#number = :number",
            "ExpressionAttributeNames": {"#number": "number"},
            "ExpressionAttributeValues": {":number": number},
        }
    return {"ConditionCheck": {"TableName": registry.table_name, "Key": dict(EPOCH_KEY), **condition}}


def _served_by(packs: PackMap, reach: Reach, verdicts: Verdicts, old: str, done: Repacked) -> bool:
    """A repacked pack may go: its new pack is live, may serve every host the old one serves now (a host
    presign added since the repack keeps the old pack a run longer) and holds every blob reached in it now
    (a late manifest may reach more)."""
    record, new = packs.records[old], packs.records.get(done.new_pack)
    if new is None or new.state not in USABLE_STATES or done.new_pack not in verdicts.live:
        return False
    return (
        record.hosts <= new.hosts and {entry.hash for entry in live_blobs(packs, reach, record)} <= done.blobs
    )


# --------------------------------------------------------------------------------------------- the run


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ObjectVersion:
    version_id: str
    size: int
    locked_until: datetime | None  # None for a delete marker or an unlocked version
    is_marker: bool = False


@dataclass
class Repacked:
    """A mostly-dead pack rewritten this run: `new_pack` holds `blobs`."""

    new_pack: str
    blobs: frozenset[str]


class GarbageCollector:
    def __init__(
        self,
        registry: PackRegistry,
        store: PackStore,
        catalogue: Catalogue,
        jobs_table: str,
        policy: GcPolicy,
        lock_mode: str,
        retention_queue: RetentionQueue | None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.registry = registry
        self.store = store
        self.catalogue = catalogue
        self.jobs_table = jobs_table
        self.policy = policy
        self.lock_mode = lock_mode
        self.retention_queue = retention_queue
        self.clock = clock

    # ----------------------------------------------------------------------------------- entry point
    def run(self, dry_run: bool = False, seconds: float = 840.0) -> GcReport:
        started = self.clock()
        report = GcReport(dry_run=dry_run, started=iso_utc(started))
        owner = str(uuid.uuid4())
        if not dry_run and not self._take_lease(owner, started):
            report.skipped = "another gc run holds the lease"
            return report
        try:
            self._collect(report, started, dry_run, time.monotonic() + seconds)
        except GcIncomplete as error:
            report.errors.append(str(error))
            logger.warning("gc stopped before condemning anything", extra={"reason": str(error)})
        finally:
            if not dry_run:
                self._release_lease(owner)
        return report

    def _collect(self, report: GcReport, now: datetime, dry_run: bool, deadline: float) -> None:
        young_after = iso_utc(now - self.policy.grace)
        kept = self._forget(report, now, dry_run)
        packs = PackMap(self.store)
        packs.load(self.registry, deadline)
        marker = Marker(packs, deadline)
        self._mark_all(marker, kept)
        first = judge(packs, marker.reach, young_after, young_after)
        candidates = mostly_dead(packs, marker.reach, first.live, self.policy.repack_live_ratio, young_after)
        report.packs_mostly_dead = len(candidates)
        repacked = {} if dry_run else self._repack(report, packs, marker.reach, candidates, now)
        if not dry_run:
            self._open_condemning_window(self.clock())
        try:
            # Commits that landed before the window opened are catalogued now: mark them too (their new packs
            # are in a fresh scan). Later ones fail their epoch check and walk again after the window.
            known = {(m.host, m.manifest_id) for m in kept} | {
                (host, manifest_id) for host, ids in report.forgotten.items() for manifest_id in ids
            }
            late = [m for m in self._all_summaries() if (m.host, m.manifest_id) not in known]
            packs.load(self.registry, deadline)
            self._mark_all(marker, late)
            verdicts = judge(packs, marker.reach, young_after, young_after)
            self._condemn_and_revive(report, packs, marker.reach, verdicts, repacked, now, dry_run)
        finally:
            if not dry_run:
                self._close_condemning_window()
        report.trees_read = marker.trees_read
        crashed = [record for record in packs.records.values() if record.state == PACK_DELETING]
        self._delete_packs(report, verdicts.ripe + crashed, dry_run)
        self._request_locks(report, packs, verdicts.live, dry_run)
        report.complete = True

    # ----------------------------------------------------------------------------------- lease
    def _take_lease(self, owner: str, now: datetime) -> bool:
        epoch = int(now.timestamp())
        try:
            self.registry.client.put_item(
                TableName=self.jobs_table,
                Item={
                    "job_id": LEASE_ID,
                    "kind": "gc-lease",
                    "owner": owner,
                    "acquired_at": iso_utc(now),
                    "expires_at": epoch + LEASE_SECONDS,
                },
                ConditionExpression="attribute_not_exists(job_id) OR expires_at < :now",
                ExpressionAttributeValues={":now": epoch},
            )
        except ClientError as error:
            if is_condition_failure(error):
                return False
            raise
        return True

    def _release_lease(self, owner: str) -> None:
        try:
            self.registry.client.delete_item(
                TableName=self.jobs_table,
                Key={"job_id": LEASE_ID},
                ConditionExpression="#owner = :owner",
                ExpressionAttributeNames={"#owner": "owner"},
                ExpressionAttributeValues={":owner": owner},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    # ----------------------------------------------------------------------------------- epoch
    def _open_condemning_window(self, now: datetime) -> None:
        """Make the epoch odd (a crashed run's odd one moves on by two): no commit walked before lands."""
        current = read_gc_epoch(self.registry)
        opened = current.number + (2 if current.number % 2 else 1)
        self._set_epoch(current.number, opened, iso_utc(now + timedelta(seconds=LEASE_SECONDS)))

    def _close_condemning_window(self) -> None:
        current = read_gc_epoch(self.registry)
        self._set_epoch(current.number, current.number + 1, None)

    def _set_epoch(self, expected: int, number: int, condemning_until: str | None) -> None:
        """Conditional on `expected`: only the lease holder moves the epoch, so a failure here is a bug."""
        values: dict[str, Any] = {":number": number, ":expected": expected}
        update = "SET #number = :number"
        if condemning_until is None:
            update += " REMOVE condemning_until"
        else:
            update += ", condemning_until = :until"
            values[":until"] = condemning_until
        condition = (
            "attribute_not_exists(#number) OR #number = :expected" if expected == 0 else "#number = :expected"
        )
        self.registry.client.update_item(
            TableName=self.registry.table_name,
            Key=dict(EPOCH_KEY),
            UpdateExpression=update,
            ConditionExpression=condition,
            ExpressionAttributeNames={"#number": "number"},
            ExpressionAttributeValues=values,
        )

    # ----------------------------------------------------------------------------------- forget
    def _all_summaries(self) -> list[ManifestSummary]:
        pages = self.catalogue.client.get_paginator("scan").paginate(
            TableName=self.catalogue.table_name, ConsistentRead=True
        )
        return [
            ManifestSummary.from_item(item)
            for page in pages
            for item in page.get("Items", [])
            if item["manifest_id"] != HEAD_ID
        ]

    def _forget(self, report: GcReport, now: datetime, dry_run: bool) -> list[ManifestSummary]:
        """Applies the keep rules per host; returns the manifests that stay."""
        by_host: dict[str, list[ManifestSummary]] = defaultdict(list)
        for summary in self._all_summaries():
            by_host[summary.host].append(summary)
        report.hosts = len(by_host)
        kept_all: list[ManifestSummary] = []
        for host, summaries in sorted(by_host.items()):
            times = [
                ManifestTimes(s.manifest_id, parse_iso_utc(s.created), parse_iso_utc(s.retain_until))
                for s in summaries
            ]
            kept = select_kept(times, self.policy.keep, now)
            head = self.catalogue.head(host)
            for summary in summaries:
                if summary.manifest_id in kept or summary.manifest_id == head:
                    kept_all.append(summary)
                    continue
                report.forgotten.setdefault(host, []).append(summary.manifest_id)
                if not dry_run:
                    self._forget_one(report, summary)
        report.manifests_kept = len(kept_all)
        report.manifests_forgotten = sum(len(ids) for ids in report.forgotten.values())
        return kept_all

    def _forget_one(self, report: GcReport, summary: ManifestSummary) -> None:
        """Catalogue item first (the manifest stops being served), then the document's lapsed versions."""
        self.catalogue.client.delete_item(
            TableName=self.catalogue.table_name,
            Key={"host": summary.host, "manifest_id": summary.manifest_id},
        )
        for version in self._versions(summary.key):
            deleted = self._deletable(version) and self._delete_version(summary.key, version)
            report.manifest_versions_deleted += deleted and not version.is_marker
        logger.info("manifest forgotten", extra={"host": summary.host, "manifest_id": summary.manifest_id})

    # ----------------------------------------------------------------------------------- mark
    def _mark_all(self, marker: Marker, summaries: list[ManifestSummary]) -> None:
        for summary in sorted(summaries, key=lambda s: s.retain_until, reverse=True):
            try:
                document = decode_manifest(self.store.read(summary.key))
            except (ClientError, InvalidDocument) as error:
                raise GcIncomplete(f"manifest {summary.key} unreadable: {error}") from None
            streams = [snapshot.content for snapshot in document.snapshots if snapshot.content is not None]
            marker.mark(summary.host, document.root, streams, summary.retain_until)

    # ----------------------------------------------------------------------------------- repack
    def _repack(
        self, report: GcReport, packs: PackMap, reach: Reach, candidates: list[str], now: datetime
    ) -> dict[str, Repacked]:
        """Write a new pack of each candidate's live blobs (before the window: PUTs take time). The old pack
        is condemned inside the window, once the late manifests are marked too."""
        repacked: dict[str, Repacked] = {}
        for pack_id in candidates:
            record = packs.records[pack_id]
            alive = live_blobs(packs, reach, record)
            try:
                new_record, entries = self._write_repacked(record, alive, reach, now)
            except CorruptBlob as error:
                report.errors.append(f"pack {pack_id} not repacked: {error}")
                continue
            packs.add(new_record, entries)
            repacked[pack_id] = Repacked(new_record.pack_id, frozenset(entry.hash for entry in entries))
            report.packs_repacked += 1
            report.bytes_repacked += new_record.size
            logger.info("pack repacked", extra={"pack_id": pack_id, "into": new_record.pack_id})
        return repacked

    def _write_repacked(
        self, old: PackRecord, alive: list[PackEntry], reach: Reach, now: datetime
    ) -> tuple[PackRecord, list[PackEntry]]:
        """Copy the blobs' stored bytes (checked against their hashes) into a new locked pack; record it."""
        writer = PackWriter()
        places = {entry.hash: BlobPlace(old.pack_id, entry) for entry in alive}
        for blob, place, stored in sorted(read_stored_blobs(self.store, places), key=lambda read: read[0]):
            if stored is None:
                raise CorruptBlob(f"blob {blob}: its range of pack {old.pack_id} is not there")
            open_blob(place.entry, stored)  # CorruptBlob: never copy a bad blob into a verified pack
            writer.add_stored(
                blob, place.entry.kind, place.entry.codec, bytes(stored), place.entry.raw_length
            )
        data, entries = writer.finish()
        new_pack = hashlib.sha256(data).hexdigest()
        need = max(reach.until[entry.hash] for entry in alive)
        # From the time of the write, not the run's start: a retain-until S3 sees in the past is refused
        # (a run slower than the fold window, or a window of 0, would fail here).
        lock_until = max(parse_iso_utc(need), now, self.clock()) + self.policy.fold_window
        try:
            self.store.client.put_object(
                Bucket=self.store.bucket,
                Key=pack_key(new_pack),
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=pack_checksum(new_pack),
                ObjectLockMode=self.lock_mode,
                ObjectLockRetainUntilDate=lock_until,
                IfNoneMatch="*",
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise  # 412: a crashed earlier run stored this very pack already
        record = self.registry.record_repacked(
            new_pack, old.hosts, len(data), len(entries), iso_utc(lock_until)
        )
        return record, entries

    # ----------------------------------------------------------------------------------- window
    def _condemn_and_revive(
        self,
        report: GcReport,
        packs: PackMap,
        reach: Reach,
        verdicts: Verdicts,
        repacked: dict[str, Repacked],
        now: datetime,
        dry_run: bool,
    ) -> None:
        for pack_id in verdicts.revive:
            if dry_run or self.registry.revive(pack_id):
                report.packs_revived += 1
                report.blobs_revived += len(packs.entries.get(pack_id, {}))
                logger.info("condemned pack revived: a kept manifest needs it", extra={"pack_id": pack_id})
        superseded = {
            old: done.new_pack
            for old, done in repacked.items()
            if old in verdicts.live and _served_by(packs, reach, verdicts, old, done)
        }
        for pack_id in verdicts.condemn + sorted(superseded):
            if dry_run or self.registry.condemn(pack_id, now, superseded_by=superseded.get(pack_id)):
                report.packs_condemned += 1
                report.blobs_condemned += len(packs.entries.get(pack_id, {}))
            verdicts.live.pop(pack_id, None)
        report.packs_live = len(verdicts.live)
        report.blobs_live = sum(len(packs.entries.get(pack_id, {})) for pack_id in verdicts.live)

    # ----------------------------------------------------------------------------------- delete
    def _delete_packs(self, report: GcReport, records: list[PackRecord], dry_run: bool) -> None:
        """Condemned packs past the grace period, and `deleting` ones a crashed run left: every version, then
        the item; a pack with a version still locked waits (its state unchanged)."""
        for record in records:
            versions = self._versions(pack_key(record.pack_id))
            if not all(self._deletable(version) for version in versions):
                report.packs_waiting_for_lock += 1
                continue
            freed = sum(version.size for version in versions)
            if not dry_run:
                if record.state == PACK_CONDEMNED and not self.registry.start_deleting(
                    record.pack_id, record.condemned_at or ""
                ):
                    continue  # revived since the scan: a host presigned it again
                gone = [
                    version for version in versions if self._delete_version(pack_key(record.pack_id), version)
                ]
                if len(gone) < len(versions):
                    report.packs_waiting_for_lock += 1  # locked after all: the next run finishes it
                    continue
                self.registry.delete(record.pack_id)
            report.packs_deleted += 1
            report.pack_versions_deleted += sum(1 for version in versions if not version.is_marker)
            report.bytes_freed += freed
            if record.state_before_condemned == PACK_PRESIGNED:
                report.orphan_packs_deleted += 1
            if len(report.deleted_packs) < MAX_LISTED_PACKS:
                report.deleted_packs.append(record.pack_id)
            logger.info("pack deleted", extra={"pack_id": record.pack_id, "bytes": freed})

    def _versions(self, key: str) -> list[ObjectVersion]:
        """Every version and delete marker of `key`, versions with their lock end (from HEAD)."""
        found: list[ObjectVersion] = []
        for page in self.store.client.get_paginator("list_object_versions").paginate(
            Bucket=self.store.bucket, Prefix=key
        ):
            for version in page.get("Versions", []):
                if version["Key"] == key:
                    until = self._lock_until(key, version["VersionId"])
                    found.append(ObjectVersion(version["VersionId"], int(version.get("Size", 0)), until))
            for marker in page.get("DeleteMarkers", []):
                if marker["Key"] == key:
                    found.append(ObjectVersion(marker["VersionId"], 0, None, is_marker=True))
        return found

    def _lock_until(self, key: str, version_id: str) -> datetime | None:
        """The version's lock end, from HEAD (S3 reports it to callers holding s3:GetObjectRetention)."""
        response = self.store.client.head_object(Bucket=self.store.bucket, Key=key, VersionId=version_id)
        until = response.get("ObjectLockRetainUntilDate")
        return until.astimezone(timezone.utc) if isinstance(until, datetime) else None

    def _deletable(self, version: ObjectVersion) -> bool:
        locked = version.locked_until is not None and version.locked_until > self.clock()
        return not locked or (self.lock_mode == "GOVERNANCE" and self.policy.bypass_governance)

    def _delete_version(self, key: str, version: ObjectVersion) -> bool:
        """False if S3 refuses (still locked after all: clock skew, COMPLIANCE)."""
        locked = version.locked_until is not None and version.locked_until > self.clock()
        try:
            self.store.client.delete_object(
                Bucket=self.store.bucket,
                Key=key,
                VersionId=version.version_id,
                **({"BypassGovernanceRetention": True} if locked else {}),
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("AccessDenied", "InvalidRequest"):
                return False
            raise
        return True

    # ----------------------------------------------------------------------------------- locks
    def _request_locks(self, report: GcReport, packs: PackMap, live: dict[str, str], dry_run: bool) -> None:
        """Live packs whose recorded lock ends before their manifests' latest retain_until (a corrupt one is
        kept as it is: the retention worker would not extend it)."""
        short: dict[str, list[str]] = defaultdict(list)
        for pack_id, need in live.items():
            if packs.records[pack_id].state == PACK_CORRUPT:
                continue
            recorded = parse_iso_utc(packs.records[pack_id].retain_until)
            if lock_extension(parse_iso_utc(need), recorded, self.policy.fold_window) is not None:
                short[need].append(pack_id)
        report.lock_extensions_requested = sum(len(pack_ids) for pack_ids in short.values())
        if dry_run or self.retention_queue is None:
            return
        for need, pack_ids in short.items():
            self.retention_queue.request(pack_ids, parse_iso_utc(need), "gc")
