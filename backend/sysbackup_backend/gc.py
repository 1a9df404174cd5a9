"""Garbage collection: forget manifests outside the keep rules, mark, condemn, after a grace period delete.

One run (GcFunction, on a schedule, under GcRole):

1. Lease: one run at a time (an item in JobsTable that expires, so a crashed run never blocks the next).
2. Forget: per host, manifests outside the keep rules (sysbackup_domain.keep; never the newest, never below
   the minimum, never one still locked) lose their catalogue item; their documents' versions are deleted
   (their locks have lapsed, or the keep rules would have kept them).
3. Mark: from every live manifest (root tree, snapshot stream indexes) the whole Merkle tree is walked, each
   tree read once; every reachable blob is live and remembers the latest retain_until of its manifests.
   A mark that cannot finish (a tree unreadable, out of time) stops the run before anything is condemned.
4. Sweep, phase one: index items of blobs nobody reaches, older than the grace period (younger ones may
   belong to a backup in flight), get `condemned_at`, and the closed marks of those blobs are deleted:
   a condemned blob never answers dedup and a commit walking onto it is refused. Live blobs that were
   condemned earlier lose `condemned_at` again. Condemning happens inside a window of gc's epoch (odd while
   open): manifests committed before it opened are re-listed and marked first, and a commit whose walk began
   before it closed fails its transaction's epoch check and walks again (see GcEpoch).
5. Sweep, phase two: a pack that no live item points to, whose items were all condemned at least the grace
   period ago (or that no item ever pointed to: an orphan of a crashed run older than the grace period),
   is deleted version by version once its lock has lapsed (GOVERNANCE locks are bypassed only if the policy
   says so; COMPLIANCE locks are waited for). Its condemned items and its pack item go after it. First its
   pack item moves to `deleting`, conditional on nothing having been indexed into it since the scan (its
   `version`); register, adopt and the verifier refuse a `deleting` pack, so no claim lands on a pack as
   it goes (a still-locked pack goes back to its state).
6. Repack: a live pack whose live blobs are a small share of its blob bytes, every other item of which is
   condemned, is rewritten: its live blobs go into a new pack (locked, If-None-Match, like a host's upload),
   their items move to it, and the old pack, now only condemned items, goes in a later run (phase two).
7. Locks: live packs whose recorded lock ends before their manifests' latest retain_until are sent to the
   retention worker (RetentionQueue).

`dry_run` computes and reports all of it and writes nothing. Every step is idempotent and conditional, so
a run that crashes anywhere is finished by the next one.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.keep import GcPolicy, KeepRules, ManifestTimes, lock_extension, select_kept
from sysbackup_domain.manifest import decode_manifest, decode_stream_index
from sysbackup_domain.packs import PackEntry, PackWriter, open_blob
from sysbackup_domain.retention import iso_utc, parse_iso_utc
from sysbackup_domain.tree import decode_tree

from .catalogue import HEAD_ID, Catalogue, ManifestSummary
from .dynamo import batch_get, is_condition_failure
from .errors import SettingsError
from .index import (
    PACK_DELETING,
    PACK_PRESIGNED,
    PACK_REGISTERED,
    PACK_SK,
    VERIFIED_SK,
    BlobIndex,
    BlobLocation,
    blob_pk,
    host_sk,
    pack_pk,
)
from .retention_worker import RetentionQueue
from .settings import non_negative_int
from .store import PackStore, pack_checksum, pack_key
from .walk import read_stored_blobs

logger = Logger(child=True)

LEASE_ID = "gc#lease"
# Longer than GcFunction's timeout: a lease outlives its run only when the run crashed.
LEASE_SECONDS = 20 * 60
NODES_PER_STEP = 500
# The report lists at most this many deleted pack ids (it is a Lambda result: 6 MB at most); counts are exact.
MAX_LISTED_PACKS = 1000
TREE = "tree"
STREAM = "stream"


class GcIncomplete(Exception):
    """The mark could not finish; nothing may be condemned or deleted on its evidence."""


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
    that may have seen a blob before gc condemned it never commits; it walks again (closed marks of condemned
    blobs are gone, so the new walk sees them). An odd epoch past `condemning_until` is a crashed run's.
    """

    number: int
    condemning_until: str | None

    def stable(self, now: datetime) -> bool:
        return self.number % 2 == 0 or (self.condemning_until or "") < iso_utc(now)


def read_gc_epoch(index: BlobIndex) -> GcEpoch:
    response = index.client.get_item(TableName=index.table_name, Key=EPOCH_KEY, ConsistentRead=True)
    item = response.get("Item") or {}
    return GcEpoch(int(item.get("number", 0)), item.get("condemning_until"))


def epoch_unchanged_check(index: BlobIndex, number: int) -> dict[str, Any]:
    """A transaction item that fails if gc has opened a condemning window since `number` was read."""
    if number == 0:
        condition: dict[str, Any] = {"ConditionExpression": "attribute_not_exists(pk)"}
    else:
        condition = {
            "ConditionExpression": "#number = :number",
            "ExpressionAttributeNames": {"#number": "number"},
            "ExpressionAttributeValues": {":number": number},
        }
    return {"ConditionCheck": {"TableName": index.table_name, "Key": dict(EPOCH_KEY), **condition}}


# --------------------------------------------------------------------------------------------- index scan


@dataclass
class BlobItem:
    blob: str
    sk: str
    pack_id: str
    length: int
    stamp: str  # registered_at / verified_at
    condemned_at: str | None


@dataclass
class IndexSnapshot:
    """Every blob item, closed mark and pack item of BlobIndexTable, as one scan saw them."""

    blob_items: list[BlobItem] = field(default_factory=list)
    closed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # blob -> sort keys
    packs: dict[str, dict[str, Any]] = field(default_factory=dict)


def scan_index(index: BlobIndex) -> IndexSnapshot:
    snapshot = IndexSnapshot()
    for page in index.client.get_paginator("scan").paginate(TableName=index.table_name, ConsistentRead=True):
        for item in page.get("Items", []):
            _file_item(snapshot, item)
    return snapshot


def _file_item(snapshot: IndexSnapshot, item: dict[str, Any]) -> None:
    pk, sk = str(item["pk"]), str(item["sk"])
    if pk.startswith("pack#") and sk == PACK_SK:
        snapshot.packs[pk.removeprefix("pack#")] = item
    elif pk.startswith("blob#") and sk.startswith("closed#"):
        snapshot.closed[pk.removeprefix("blob#")].append(sk)
    elif pk.startswith("blob#") and "pack_id" in item:
        snapshot.blob_items.append(
            BlobItem(
                blob=pk.removeprefix("blob#"),
                sk=sk,
                pack_id=str(item["pack_id"]),
                length=int(item.get("length", 0)),
                stamp=str(item.get("registered_at") or item.get("verified_at") or ""),
                condemned_at=item.get("condemned_at"),
            )
        )


# --------------------------------------------------------------------------------------------- mark


class Marker:
    """Walks live manifests' Merkle trees; `live` maps each reachable blob to its latest retain_until."""

    def __init__(self, index: BlobIndex, store: PackStore, deadline: float) -> None:
        self.index = index
        self.store = store
        self.deadline = deadline
        self.live: dict[str, str] = {}
        self.visited_nodes: set[str] = set()
        self.trees_read = 0

    def mark(self, host: str, root: str | None, stream_indexes: Iterable[str], retain_until: str) -> None:
        """Mark one manifest. Call in descending retain_until order: a node is walked only the first time."""
        pending = [(blob, STREAM) for blob in stream_indexes]
        if root is not None:
            pending.append((root, TREE))
        while pending:
            if time.monotonic() > self.deadline:
                raise GcIncomplete("out of time while marking")
            batch, pending = pending[:NODES_PER_STEP], pending[NODES_PER_STEP:]
            pending.extend(self._step(host, batch, retain_until))

    def _note_live(self, blob: str, retain_until: str) -> None:
        if self.live.get(blob, "") < retain_until:
            self.live[blob] = retain_until

    def _step(self, host: str, batch: list[tuple[str, str]], retain_until: str) -> list[tuple[str, str]]:
        for blob, _ in batch:
            self._note_live(blob, retain_until)
        fresh = {blob: kind for blob, kind in batch if blob not in self.visited_nodes}
        self.visited_nodes.update(fresh)
        if not fresh:
            return []
        locations = self._locate(host, fresh)
        unknown = sorted(set(fresh) - set(locations))
        if unknown:
            raise GcIncomplete(f"{len(unknown)} live nodes have no index item, e.g. {unknown[0]}")
        children: list[tuple[str, str]] = []
        for blob, plaintext in self._read(locations).items():
            try:
                if fresh[blob] == TREE:
                    tree = decode_tree(plaintext)
                    self.trees_read += 1
                    for entry in tree.entries:
                        for content in entry.content:
                            self._note_live(content, retain_until)
                        if entry.subtree is not None:
                            children.append((entry.subtree, TREE))
                else:
                    for chunk in decode_stream_index(plaintext):
                        self._note_live(chunk, retain_until)
            except InvalidDocument as error:
                raise GcIncomplete(f"live node {blob} does not decode: {error}") from None
        return children

    def _locate(self, host: str, blobs: Iterable[str]) -> dict[str, BlobLocation]:
        """Where to read each node: the verified copy, else the manifest host's claim (condemned or not)."""
        keys = [{"pk": blob_pk(blob), "sk": sk} for blob in blobs for sk in (VERIFIED_SK, host_sk(host))]
        found: dict[str, BlobLocation] = {}
        for item in batch_get(self.index.client, self.index.table_name, keys):
            blob = item["pk"].removeprefix("blob#")
            if blob not in found or item["sk"] == VERIFIED_SK:
                found[blob] = BlobLocation.from_item(item)
        return found

    def _read(self, locations: dict[str, BlobLocation]) -> dict[str, bytes]:
        plaintexts: dict[str, bytes] = {}
        for blob, location, stored in read_stored_blobs(self.store, locations):
            try:
                plaintexts[blob] = open_blob(location.entry(blob), stored)
            except CorruptBlob as error:
                raise GcIncomplete(f"live node {blob} is corrupt: {error}") from None
        return plaintexts


# --------------------------------------------------------------------------------------------- the run


def _pack_needs(snapshot: IndexSnapshot, live: dict[str, str]) -> dict[str, str]:
    """Live packs -> the latest retain_until of the manifests whose blobs they hold."""
    need: dict[str, str] = {}
    for item in snapshot.blob_items:
        until = live.get(item.blob)
        if until is not None and need.get(item.pack_id, "") < until:
            need[item.pack_id] = until
    return need


def _redundant_claim(item: BlobItem, verified_in: dict[str, str], young: str) -> bool:
    """A host's old claim on a copy in another pack than the blob's verified one: every lookup prefers the
    verified copy, so the claim only keeps a redundant pack alive (two hosts uploaded the same blob)."""
    return (
        item.sk.startswith("host#")
        and verified_in.get(item.blob, item.pack_id) != item.pack_id
        and bool(item.stamp)
        and item.stamp <= young
    )


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _status(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class GarbageCollector:
    def __init__(
        self,
        index: BlobIndex,
        store: PackStore,
        catalogue: Catalogue,
        jobs_table: str,
        policy: GcPolicy,
        lock_mode: str,
        retention_queue: RetentionQueue | None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.index = index
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

    def _collect(self, report: GcReport, started: datetime, dry_run: bool, deadline: float) -> None:
        live_manifests = self._forget(report, started, dry_run)
        marker = Marker(self.index, self.store, deadline)
        self._mark_all(marker, live_manifests)
        snapshot = scan_index(self.index)
        if not dry_run:
            self._open_condemning_window(self.clock())
        try:
            # Commits that landed before the window opened are catalogued now: mark them too. Later ones
            # are refused by their transaction's epoch check and walk again after the window.
            known = {(m.host, m.manifest_id) for m in live_manifests} | {
                (host, manifest_id) for host, ids in report.forgotten.items() for manifest_id in ids
            }
            late = [m for m in self._all_summaries() if (m.host, m.manifest_id) not in known]
            self._mark_all(marker, late)
            report.trees_read = marker.trees_read
            report.blobs_live = len(marker.live)
            settling = self._sweep_items(report, snapshot, marker.live, started, dry_run)
        finally:
            if not dry_run:
                self._close_condemning_window()
        # Packs that just lost claims wait a run: an item the scan did not see might still point to them.
        self._delete_dead_packs(report, snapshot, marker.live, started, dry_run, settling)
        repacked = self._repack(report, snapshot, marker.live, started, dry_run)
        # A repacked pack's live blobs have moved (the new pack is locked as they need): never extend it.
        self._request_locks(report, snapshot, marker.live, dry_run, skip=repacked)
        report.complete = True

    # ----------------------------------------------------------------------------------- lease
    def _take_lease(self, owner: str, now: datetime) -> bool:
        epoch = int(now.timestamp())
        try:
            self.index.client.put_item(
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
            self.index.client.delete_item(
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
        current = read_gc_epoch(self.index)
        opened = current.number + (2 if current.number % 2 else 1)
        self._set_epoch(current.number, opened, iso_utc(now + timedelta(seconds=LEASE_SECONDS)))

    def _close_condemning_window(self) -> None:
        current = read_gc_epoch(self.index)
        self._set_epoch(current.number, current.number + 1, None)

    def _set_epoch(self, expected: int, number: int, condemning_until: str | None) -> None:
        """Conditional on `expected`: only the lease holder moves the epoch, so a failure here is a bug."""
        values: dict[str, Any] = {":number": number}
        update = "SET #number = :number"
        if condemning_until is None:
            update += " REMOVE condemning_until"
        else:
            update += ", condemning_until = :until"
            values[":until"] = condemning_until
        if expected == 0:
            condition = "attribute_not_exists(#number) OR #number = :expected"
        else:
            condition = "#number = :expected"
        values[":expected"] = expected
        self.index.client.update_item(
            TableName=self.index.table_name,
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
        deleted, _, _ = self._delete_versions(summary.key)
        report.manifest_versions_deleted += deleted
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

    # ----------------------------------------------------------------------------------- phase one
    def _sweep_items(
        self, report: GcReport, snapshot: IndexSnapshot, live: dict[str, str], now: datetime, dry_run: bool
    ) -> set[str]:
        """Condemn, revive, drop redundant claims; returns the packs whose claims were dropped."""
        young = iso_utc(now - self.policy.grace)
        condemned_blobs: set[str] = set()
        verified_in = {
            item.blob: item.pack_id
            for item in snapshot.blob_items
            if item.sk == VERIFIED_SK and item.condemned_at is None
        }
        redundant: list[BlobItem] = []
        for item in snapshot.blob_items:
            if item.blob in live:
                if _redundant_claim(item, verified_in, young):
                    if dry_run or self._drop_claim(item):
                        redundant.append(item)
                elif item.condemned_at is not None:
                    report.blobs_revived += 1
                    if not dry_run:
                        self._revive(item)
                continue
            if item.condemned_at is not None:
                condemned_blobs.add(item.blob)
                continue
            if item.stamp and item.stamp > young:
                continue  # may belong to a backup in flight
            report.blobs_condemned += 1
            condemned_blobs.add(item.blob)
            if not dry_run:
                self._condemn(item, now)
        # The later steps see the index as it is now: a dropped claim no longer keeps its pack alive.
        report.redundant_claims_dropped = len(redundant)
        dropped = {(item.blob, item.sk) for item in redundant}
        snapshot.blob_items = [item for item in snapshot.blob_items if (item.blob, item.sk) not in dropped]
        for blob in sorted(condemned_blobs):
            for sort_key in snapshot.closed.get(blob, []):
                report.closed_marks_dropped += 1
                if not dry_run:
                    self.index.client.delete_item(
                        TableName=self.index.table_name, Key={"pk": blob_pk(blob), "sk": sort_key}
                    )
        return {item.pack_id for item in redundant}

    def _drop_claim(self, item: BlobItem) -> bool:
        """Conditional on the claim being unchanged since the scan (a re-registration keeps it)."""
        try:
            self.index.client.delete_item(
                TableName=self.index.table_name,
                Key={"pk": blob_pk(item.blob), "sk": item.sk},
                ConditionExpression="pack_id = :pack AND registered_at = :stamp",
                ExpressionAttributeValues={":pack": item.pack_id, ":stamp": item.stamp},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise
            return False
        return True

    def _condemn(self, item: BlobItem, now: datetime) -> None:
        """Conditional on the item being unchanged since the scan (a re-registration wins)."""
        try:
            self.index.client.update_item(
                TableName=self.index.table_name,
                Key={"pk": blob_pk(item.blob), "sk": item.sk},
                UpdateExpression="SET condemned_at = :now",
                ConditionExpression=(
                    "attribute_exists(pk) AND attribute_not_exists(condemned_at) AND pack_id = :pack"
                    " AND (registered_at = :stamp OR verified_at = :stamp)"
                ),
                ExpressionAttributeValues={":now": iso_utc(now), ":pack": item.pack_id, ":stamp": item.stamp},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    def _revive(self, item: BlobItem) -> None:
        try:
            self.index.client.update_item(
                TableName=self.index.table_name,
                Key={"pk": blob_pk(item.blob), "sk": item.sk},
                UpdateExpression="REMOVE condemned_at",
                ConditionExpression="attribute_exists(pk) AND pack_id = :pack",
                ExpressionAttributeValues={":pack": item.pack_id},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    # ----------------------------------------------------------------------------------- phase two
    def _dead_packs(
        self, snapshot: IndexSnapshot, live: dict[str, str], now: datetime
    ) -> Iterator[tuple[str, list[BlobItem]]]:
        """Packs every item of which was condemned over the grace period ago, and old orphans."""
        ripe = iso_utc(now - self.policy.grace)
        items_by_pack: dict[str, list[BlobItem]] = defaultdict(list)
        for item in snapshot.blob_items:
            items_by_pack[item.pack_id].append(item)
        for pack_id, pack_item in sorted(snapshot.packs.items()):
            items = items_by_pack.get(pack_id, [])
            if any(
                item.blob in live or item.condemned_at is None or item.condemned_at > ripe for item in items
            ):
                continue
            if str(pack_item.get("created_at", "")) > ripe:
                continue  # a presigned pack of a backup in flight
            yield pack_id, items

    def _delete_dead_packs(
        self,
        report: GcReport,
        snapshot: IndexSnapshot,
        live: dict[str, str],
        now: datetime,
        dry_run: bool,
        settling: set[str],
    ) -> None:
        dead = dict(self._dead_packs(snapshot, live, now))
        if not dry_run:
            self._release_stale_deletions(snapshot, set(dead) - settling)
        for pack_id, items in dead.items():
            if pack_id in settling:
                continue
            if dry_run:
                report.packs_deleted += 1
                report.bytes_freed += int(snapshot.packs[pack_id].get("size", 0))
                continue
            seen = snapshot.packs[pack_id]
            if not self._begin_deleting(pack_id, seen, now):
                logger.info("pack indexed into since the scan: kept", extra={"pack_id": pack_id})
                continue
            if not self._still_condemned(items):
                self._stop_deleting(pack_id)
                continue
            deleted, freed, waiting = self._delete_versions(pack_key(pack_id))
            report.pack_versions_deleted += deleted
            report.bytes_freed += freed
            if waiting:
                report.packs_waiting_for_lock += 1
                self._stop_deleting(pack_id)
                continue
            for item in items:
                self._drop_condemned_item(item)
            self._drop_pack_item(pack_id)
            report.packs_deleted += 1
            if len(report.deleted_packs) < MAX_LISTED_PACKS:
                report.deleted_packs.append(pack_id)
            if not items:
                report.orphan_packs_deleted += 1
            logger.info("pack deleted", extra={"pack_id": pack_id, "bytes": freed, "versions": deleted})

    def _release_stale_deletions(self, snapshot: IndexSnapshot, deleting_now: set[str]) -> None:
        """A crashed run's `deleting` pack that is no longer dead goes back to its state (else it would refuse
        registrations for good); one still dead is deleted by this run."""
        for pack_id, pack_item in snapshot.packs.items():
            if pack_item.get("state") == PACK_DELETING and pack_id not in deleting_now:
                self._stop_deleting(pack_id)

    def _begin_deleting(self, pack_id: str, seen: dict[str, Any], now: datetime) -> bool:
        """Move the pack item to `deleting` if nothing was indexed into the pack since the scan saw it.

        From then on register, adopt and the verifier refuse the pack (BlobIndex.claim_pack), and claims on
        it do not count as stored. `version` equal to the scan's means no writer announced itself since;
        `indexed_at` older than the grace period means none that announced itself before is still writing
        items the scan may have missed (a scan is not a snapshot). A crashed run's `deleting` is resumed.
        """
        names = {"#state": "state", "#version": "version"}
        values: dict[str, Any] = {
            ":deleting": PACK_DELETING,
            ":now": iso_utc(self.clock()),
            ":ripe": iso_utc(now - self.policy.grace),
            ":before": seen.get("state") or PACK_REGISTERED,
        }
        conditions = ["attribute_exists(pk)", "(attribute_not_exists(indexed_at) OR indexed_at < :ripe)"]
        if "version" in seen:
            conditions.append("#version = :version")
            values[":version"] = seen["version"]
        else:
            conditions.append("attribute_not_exists(#version)")
        if "state" in seen:
            conditions.append("#state = :seen_state")
            values[":seen_state"] = seen["state"]
        try:
            self.index.client.update_item(
                TableName=self.index.table_name,
                Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
                UpdateExpression=(
                    "SET #state = :deleting, deleting_at = :now,"
                    " state_before_deleting = if_not_exists(state_before_deleting, :before)"
                ),
                ConditionExpression=" AND ".join(conditions),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise
            return False
        return True

    def _stop_deleting(self, pack_id: str) -> None:
        """The pack stays (a version is still locked, or an item changed): back to its state before."""
        try:
            self.index.client.update_item(
                TableName=self.index.table_name,
                Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
                UpdateExpression=(
                    "SET #state = if_not_exists(state_before_deleting, :registered)"
                    " REMOVE deleting_at, state_before_deleting"
                ),
                ConditionExpression="#state = :deleting",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={":deleting": PACK_DELETING, ":registered": PACK_REGISTERED},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    def _still_condemned(self, items: list[BlobItem]) -> bool:
        """Re-read the items right before deleting: a re-registration since the scan keeps the pack."""
        if not items:
            return True
        keys = [{"pk": blob_pk(item.blob), "sk": item.sk} for item in items]
        current = batch_get(self.index.client, self.index.table_name, keys)
        return len(current) == len(items) and all(
            "condemned_at" in found and found.get("pack_id") == items[0].pack_id for found in current
        )

    def _delete_versions(self, key: str) -> tuple[int, int, bool]:
        """Delete every version (and delete marker) of `key` whose lock has lapsed.

        Returns (versions deleted, bytes freed, whether a locked version had to stay).
        """
        s3 = self.store.client
        deleted = freed = 0
        waiting = False
        paginator = s3.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.store.bucket, Prefix=key):
            entries = [(v, True) for v in page.get("Versions", [])] + [
                (m, False) for m in page.get("DeleteMarkers", [])
            ]
            for entry, is_version in entries:
                if entry["Key"] != key:
                    continue
                bypass = False
                if is_version:
                    until = self._lock_until(key, entry["VersionId"])
                    if until is not None and until > self.clock():
                        if self.lock_mode == "GOVERNANCE" and self.policy.bypass_governance:
                            bypass = True
                        else:
                            waiting = True
                            continue
                try:
                    s3.delete_object(
                        Bucket=self.store.bucket,
                        Key=key,
                        VersionId=entry["VersionId"],
                        **({"BypassGovernanceRetention": True} if bypass else {}),
                    )
                except ClientError as error:
                    if _status(error) in ("AccessDenied", "InvalidRequest"):
                        waiting = True  # still locked after all (clock skew, COMPLIANCE)
                        continue
                    raise
                if is_version:
                    deleted += 1
                    freed += int(entry.get("Size", 0))
        return deleted, freed, waiting

    def _lock_until(self, key: str, version_id: str) -> datetime | None:
        """The version's lock end, from HEAD (S3 reports it to callers holding s3:GetObjectRetention)."""
        response = self.store.client.head_object(Bucket=self.store.bucket, Key=key, VersionId=version_id)
        until = response.get("ObjectLockRetainUntilDate")
        return until.astimezone(timezone.utc) if isinstance(until, datetime) else None

    def _drop_condemned_item(self, item: BlobItem) -> None:
        try:
            self.index.client.delete_item(
                TableName=self.index.table_name,
                Key={"pk": blob_pk(item.blob), "sk": item.sk},
                ConditionExpression="attribute_exists(condemned_at) AND pack_id = :pack",
                ExpressionAttributeValues={":pack": item.pack_id},
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    def _drop_pack_item(self, pack_id: str) -> None:
        self.index.client.delete_item(
            TableName=self.index.table_name, Key={"pk": pack_pk(pack_id), "sk": PACK_SK}
        )

    # ----------------------------------------------------------------------------------- repack
    def _mostly_dead(self, snapshot: IndexSnapshot, live: dict[str, str]) -> dict[str, list[BlobItem]]:
        """Live packs whose live bytes are a small share, every other item of which is condemned."""
        items_by_pack: dict[str, list[BlobItem]] = defaultdict(list)
        for item in snapshot.blob_items:
            items_by_pack[item.pack_id].append(item)
        candidates: dict[str, list[BlobItem]] = {}
        for pack_id, items in sorted(items_by_pack.items()):
            live_items = [item for item in items if item.blob in live]
            dead_items = [item for item in items if item.blob not in live]
            if not live_items or not dead_items or any(item.condemned_at is None for item in dead_items):
                continue  # all live, all dead (deleted instead), or not yet condemned
            # Shares of blob bytes (trailer aside: it would dominate the share of a small pack).
            live_bytes = sum({item.blob: item.length for item in live_items}.values())
            dead_bytes = sum({item.blob: item.length for item in dead_items}.values())
            if live_bytes <= (live_bytes + dead_bytes) * self.policy.repack_live_ratio:
                candidates[pack_id] = live_items
        return candidates

    def _repack(
        self, report: GcReport, snapshot: IndexSnapshot, live: dict[str, str], now: datetime, dry_run: bool
    ) -> set[str]:
        """Rewrite mostly-dead packs: a new pack of the live blobs, the index moved to it, the old pack left
        to its condemned items (deleted once they ripen). The index moves only after the new pack is stored.
        """
        candidates = self._mostly_dead(snapshot, live)
        report.packs_mostly_dead = len(candidates)
        if dry_run:
            return set()
        need = _pack_needs(snapshot, live)
        repacker = Repacker(self.index, self.store, self.lock_mode)
        for pack_id, live_items in candidates.items():
            lock = max(parse_iso_utc(need[pack_id]), now) + self.policy.fold_window
            report.bytes_repacked += repacker.repack(pack_id, live_items, lock)
            report.packs_repacked += 1
            logger.info("pack repacked", extra={"pack_id": pack_id, "live_blobs": len(live_items)})
        return set(candidates)

    # ----------------------------------------------------------------------------------- locks
    def _request_locks(
        self,
        report: GcReport,
        snapshot: IndexSnapshot,
        live: dict[str, str],
        dry_run: bool,
        skip: set[str],
    ) -> None:
        """Live packs whose recorded lock ends before their manifests' latest retain_until."""
        need = {
            pack_id: until for pack_id, until in _pack_needs(snapshot, live).items() if pack_id not in skip
        }
        report.packs_live = len(need)
        short: dict[str, list[str]] = defaultdict(list)
        for pack_id, until in need.items():
            recorded = snapshot.packs.get(pack_id, {}).get("retain_until")
            current = parse_iso_utc(recorded) if recorded else None
            if lock_extension(parse_iso_utc(until), current, self.policy.fold_window) is not None:
                short[until].append(pack_id)
        report.lock_extensions_requested = sum(len(packs) for packs in short.values())
        if dry_run or self.retention_queue is None:
            return
        for until, pack_ids in short.items():
            self.retention_queue.request(pack_ids, parse_iso_utc(until), "gc")


class Repacker:
    """Copies a pack's live blobs into a new pack (same lock headers and If-None-Match as a host's upload)."""

    def __init__(self, index: BlobIndex, store: PackStore, lock_mode: str) -> None:
        self.index = index
        self.store = store
        self.lock_mode = lock_mode

    def repack(self, old_pack: str, live_items: list[BlobItem], lock_until: datetime) -> int:
        """Returns the new pack's size."""
        plaintexts = self._read_live(old_pack, live_items)
        writer = PackWriter()
        for blob, (kind, plaintext) in sorted(plaintexts.items()):
            writer.add(blob, kind, plaintext)
        data, entries = writer.finish()
        new_pack = hashlib.sha256(data).hexdigest()
        self._put(new_pack, data, lock_until)
        self.index.record_presigned(new_pack, "gc", len(data), iso_utc(lock_until))
        self._mark_registered(new_pack, len(entries))
        self.index.claim_pack(new_pack)  # like any writer indexing into a pack (see GarbageCollector)
        by_hash = {entry.hash: entry for entry in entries}
        for item in live_items:
            self._move(item, new_pack, by_hash[item.blob])
        return len(data)

    def _read_live(self, pack_id: str, items: list[BlobItem]) -> dict[str, tuple[str, bytes]]:
        keys = [{"pk": blob_pk(item.blob), "sk": item.sk} for item in items]
        locations = {
            found["pk"].removeprefix("blob#"): BlobLocation.from_item(found)
            for found in batch_get(self.index.client, self.index.table_name, keys)
            if found.get("pack_id") == pack_id
        }
        plaintexts: dict[str, tuple[str, bytes]] = {}
        for blob, location in locations.items():
            stored = self.store.read_range(
                pack_key(pack_id), location.offset, location.offset + location.length - 1
            )
            plaintexts[blob] = (location.kind, open_blob(location.entry(blob), stored))
        return plaintexts

    def _put(self, pack_id: str, data: bytes, lock_until: datetime) -> None:
        try:
            self.store.client.put_object(
                Bucket=self.store.bucket,
                Key=pack_key(pack_id),
                Body=data,
                ChecksumAlgorithm="SHA256",
                ChecksumSHA256=pack_checksum(pack_id),
                ObjectLockMode=self.lock_mode,
                ObjectLockRetainUntilDate=lock_until,
                IfNoneMatch="*",
            )
        except ClientError as error:
            if _status(error) != "PreconditionFailed":
                raise  # 412: a crashed earlier run stored this very pack already

    def _mark_registered(self, pack_id: str, blob_count: int) -> None:
        """Like a host's register: the verifier re-hashes it when S3 reports it (state verified then)."""
        try:
            self.index.client.update_item(
                TableName=self.index.table_name,
                Key={"pk": pack_pk(pack_id), "sk": PACK_SK},
                UpdateExpression="SET #state = :registered, blob_count = :count, registered_at = :now",
                ConditionExpression="#state = :presigned",
                ExpressionAttributeNames={"#state": "state"},
                ExpressionAttributeValues={
                    ":registered": PACK_REGISTERED,
                    ":presigned": PACK_PRESIGNED,
                    ":count": blob_count,
                    ":now": iso_utc(datetime.now(timezone.utc)),
                },
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise

    def _move(self, item: BlobItem, new_pack: str, entry: PackEntry) -> None:
        try:
            self.index.client.update_item(
                TableName=self.index.table_name,
                Key={"pk": blob_pk(item.blob), "sk": item.sk},
                UpdateExpression=(
                    "SET pack_id = :new, #offset = :offset, #length = :length, codec = :codec,"
                    " raw_length = :raw REMOVE condemned_at"
                ),
                ConditionExpression="pack_id = :old",
                ExpressionAttributeNames={"#offset": "offset", "#length": "length"},
                ExpressionAttributeValues={
                    ":new": new_pack,
                    ":old": item.pack_id,
                    ":offset": entry.offset,
                    ":length": entry.length,
                    ":codec": entry.codec,
                    ":raw": entry.raw_length,
                },
            )
        except ClientError as error:
            if not is_condition_failure(error):
                raise
