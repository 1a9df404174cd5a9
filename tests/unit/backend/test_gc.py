"""gc v2 against moto: forget, condemn dead packs, wait the grace period, delete; never a pack a kept manifest
needs. Hosts here do what the v2 upload API and commit let them (`Host`), through the real registry."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.catalogue import ManifestSummary
from sysbackup_backend.commit import CommitOutcome, Committer
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.gc import LEASE_ID, GarbageCollector, GcReport, read_gc_epoch
from sysbackup_backend.registry import (
    PACK_CONDEMNED,
    PACK_DELETING,
    PACK_PRESIGNED,
    PACK_VERIFIED,
    PackRecord,
)
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.keep import GcPolicy, KeepRules
from sysbackup_domain.manifest import decode_manifest, decode_stream_index
from sysbackup_domain.packs import PackEntry, open_blob, parse_trailer
from sysbackup_domain.retention import RetentionPolicy, iso_utc
from sysbackup_domain.tree import decode_tree
from sysbackup_testkit import BUCKET, BuiltPack, build_pack, file_entry, stream_index_bytes, tree_bytes

REAL_NOW = datetime.now(timezone.utc).replace(microsecond=0)
GRACE = timedelta(hours=1)
POLICY = RetentionPolicy(days_retained=30, max_days_retained=365, lock_mode="GOVERNANCE")
KEEP_NEWEST = KeepRules(last=1, daily=0, weekly=0, monthly=0, yearly=0, minimum=1)


class Collecting(Exception):
    """POST /packs/presign answered 409 collecting: gc is deleting the pack; the host waits and retries."""


@dataclass
class Host:
    """A host on index v2: a local index (blob -> pack id), the registry writes presign makes for it, and
    commits through the real commit walk."""

    services: Services
    name: str
    index: dict[str, str] = field(default_factory=dict)
    policy: RetentionPolicy = POLICY

    def upload(self, blobs: Iterable[tuple[str, bytes]], lock_until: datetime | None = None) -> str | None:
        """Upload, as one pack, the blobs the local index lacks; the pack id, or None if nothing was new."""
        fresh = {
            blob_hash(plain): (kind, plain) for kind, plain in blobs if blob_hash(plain) not in self.index
        }
        if not fresh:
            return None
        pack = build_pack(list(fresh.values()))
        self._presign(pack, lock_until)
        self.index.update({entry.hash: pack.pack_id for entry in pack.entries})
        return pack.pack_id

    def _presign(self, pack: BuiltPack, lock_until: datetime | None) -> None:
        """What POST /packs/presign and the PUT that follows do to the registry and the bucket."""
        registry = self.services.registry
        until = lock_until or REAL_NOW
        record = registry.record_presigned(pack.pack_id, self.name, len(pack.data), iso_utc(until))
        if record.state == PACK_DELETING:
            raise Collecting(pack.pack_id)
        if record.state == PACK_CONDEMNED:
            registry.revive(pack.pack_id)
        if self.name not in record.hosts:
            registry.add_host(pack.pack_id, self.name)
        if self.services.store.head_pack(pack.pack_id) is None:
            lock = (
                {"ObjectLockMode": "GOVERNANCE", "ObjectLockRetainUntilDate": lock_until}
                if lock_until
                else {}
            )
            self.services.store.client.put_object(
                Bucket=BUCKET, Key=f"packs/{pack.pack_id}", Body=pack.data, ChecksumAlgorithm="SHA256", **lock
            )

    def body(self, files: dict[str, bytes], snapshot: bytes | None = None) -> dict[str, Any]:
        """Upload what the local index lacks (file data, then the tree apart, as the uploader packs them);
        the POST /manifests body, listing every pack the host knows (an allowed over-approximation)."""
        root = tree_bytes([file_entry(name, [blob_hash(body)]) for name, body in files.items()])
        data = [*files.values(), *([snapshot] if snapshot is not None else [])]
        self.upload(("data", body) for body in data)
        self.upload([("tree", root)])
        snapshots = [] if snapshot is None else [_snapshot(blob_hash(snapshot))]
        return {
            "parent": self.services.catalogue.head(self.name),
            "root": blob_hash(root),
            "snapshots": snapshots,
            "packs": sorted(set(self.index.values())),
        }

    def committer(self, created: datetime) -> Committer:
        services = self.services
        return Committer(
            services.registry, services.store, services.catalogue, services.jobs, self.policy, lambda: created
        )

    def commit(
        self, files: dict[str, bytes], created: datetime, snapshot: bytes | None = None
    ) -> CommitOutcome:
        """POST /manifests once (Unprocessable if refused)."""
        return self.committer(created).start(self.name, self.body(files, snapshot), Budget(60))

    def forget_refused(self, refusal: Mapping[str, Any]) -> None:
        """The uploader's answer to a 422 (`refusal` is its body): drop the refused packs and missing blobs
        from its local index."""
        packs, missing = set(refusal.get("packs", {})), set(refusal.get("missing", []))
        self.index = {
            blob: pack for blob, pack in self.index.items() if pack not in packs and blob not in missing
        }

    def backup(self, files: dict[str, bytes], created: datetime, snapshot: bytes | None = None) -> str:
        """Upload and commit a one-directory tree, sending refused blobs again; the manifest id."""
        for _ in range(3):
            try:
                outcome = self.commit(files, created, snapshot)
            except Unprocessable as refused:
                self.forget_refused(refused.details)
                continue
            assert outcome.status_code == 201, outcome.body
            return str(outcome.body["manifest_id"])
        raise AssertionError("the commit was still refused after sending everything again")


def _snapshot(content: str) -> dict[str, Any]:
    return {"name": "db", "description": "a dump", "restore_through": None, "size": 1, "content": content,
            "exit_status": 0}  # fmt: skip


# --------------------------------------------------------------------------------------------- checks


@dataclass
class Bucket:
    """The registry and the packs in the bucket as they are now: each pack's record, bytes and entries."""

    records: dict[str, PackRecord]
    data: dict[str, bytes]
    holders: dict[str, list[tuple[str, PackEntry]]]  # blob -> (pack id, entry) of every pack holding it

    @classmethod
    def read(cls, services: Services) -> Bucket:
        records = {record.pack_id: record for record in services.registry.scan()}
        bucket = cls(records, {}, {})
        for pack_id in records:
            if services.store.head_pack(pack_id) is not None:
                bucket.data[pack_id] = services.store.read(f"packs/{pack_id}")
                for entry in parse_trailer(bucket.data[pack_id]):
                    bucket.holders.setdefault(entry.hash, []).append((pack_id, entry))
        return bucket

    def packs_of(self, blob: str) -> list[PackRecord]:
        return [self.records[pack_id] for pack_id, _ in self.holders.get(blob, [])]

    def read_blob(self, host: str, blob: str) -> bytes:
        """The blob as `host` may download it (from a pack holding the host, not being deleted)."""
        for pack_id, entry in self.holders.get(blob, []):
            record = self.records[pack_id]
            if host in record.hosts and record.state != PACK_DELETING:
                return open_blob(entry, self.data[pack_id][entry.offset : entry.offset + entry.length])
        raise AssertionError(f"blob {blob} is in no pack {host} can download")


def reachable(services: Services, host: str, manifest_id: str, bucket: Bucket | None = None) -> set[str]:
    """Every blob the manifest reaches, each read (and hash-checked) as `host` can download it;
    AssertionError if one cannot be."""
    bucket = bucket or Bucket.read(services)
    summary = services.catalogue.get(host, manifest_id)
    assert summary is not None
    document = decode_manifest(services.store.read(summary.key))
    pending = [(document.root, "tree")] + [(s.content, "stream") for s in document.snapshots if s.content]
    found: set[str] = set()
    while pending:
        blob, kind = pending.pop()
        plain = bucket.read_blob(host, blob)
        found.add(blob)
        if kind == "tree":
            for entry in decode_tree(plain).entries:
                pending.extend((content, "data") for content in entry.content)
                if entry.subtree:
                    pending.append((entry.subtree, "tree"))
        elif kind == "stream":
            pending.extend((chunk, "data") for chunk in decode_stream_index(plain))
    return found


def restorable(services: Services, host: str, manifest_id: str, bucket: Bucket | None = None) -> bool:
    try:
        reachable(services, host, manifest_id, bucket)
    except AssertionError:
        return False
    return True


def usable_for_every_kept_manifest(services: Services) -> bool:
    """gc's promise: each blob a catalogued manifest reaches has a holder its host may use (not condemned)."""
    bucket = Bucket.read(services)
    for summary in all_manifests(services):
        for blob in reachable(services, summary.host, summary.manifest_id, bucket):
            if not any(record.usable_by(summary.host) for record in bucket.packs_of(blob)):
                return False
    return True


def all_manifests(services: Services) -> list[ManifestSummary]:
    items = services.catalogue.client.scan(TableName=services.catalogue.table_name)["Items"]
    return [ManifestSummary.from_item(item) for item in items if item["manifest_id"] != "HEAD"]


def state(services: Services, pack_id: str) -> str | None:
    record = services.registry.get(pack_id)
    return None if record is None else record.state


def pack_exists(services: Services, pack_id: str) -> bool:
    return services.store.head_pack(pack_id) is not None


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Recorder:
    """Stands in for RetentionQueue: keeps what gc asked for."""

    requests: list[tuple[list[str], datetime, str]] = field(default_factory=list)

    def request(self, pack_ids: Iterable[str], retain_until: datetime, source: str) -> int:
        self.requests.append((sorted(pack_ids), retain_until, source))
        return 1


def collector(
    services: Services,
    at: datetime,
    keep: KeepRules = KEEP_NEWEST,
    bypass: bool = False,
    lock_mode: str = "GOVERNANCE",
    queue: Recorder | None = None,
    grace: timedelta = GRACE,
) -> GarbageCollector:
    return GarbageCollector(
        registry=services.registry,
        store=services.store,
        catalogue=services.catalogue,
        jobs_table=services.settings.jobs_table,
        policy=GcPolicy(keep=keep, grace=grace, fold_window=timedelta(days=7), bypass_governance=bypass),
        lock_mode=lock_mode,
        retention_queue=queue,  # type: ignore[arg-type]
        clock=lambda: at,
    )


# Incompressible, b the larger: the data pack of a and b is not mostly dead once only b is live.
FIRST = {"a": os.urandom(500), "b": os.urandom(1000)}
SECOND = {"b": FIRST["b"], "c": os.urandom(700)}


def two_backups(services: Services) -> tuple[Host, str, str]:
    """m1: {a, b} in one data pack and a tree pack; m2 (a day later): c's pack and its tree pack.
    Both manifests' locks lapsed long ago."""
    alpha = Host(services, "alpha")
    m1 = alpha.backup(FIRST, REAL_NOW - timedelta(days=41))
    m2 = alpha.backup(SECOND, REAL_NOW - timedelta(days=40))
    return alpha, m1, m2


def root_of(files: dict[str, bytes]) -> str:
    return blob_hash(tree_bytes([file_entry(name, [blob_hash(body)]) for name, body in files.items()]))


# --------------------------------------------------------------------------------------------- tests


def test_a_forgotten_manifests_packs_are_condemned_then_deleted_after_the_grace_period(
    backend: Services,
) -> None:
    alpha, m1, m2 = two_backups(backend)
    m1_tree_pack, shared_pack = alpha.index[root_of(FIRST)], alpha.index[blob_hash(FIRST["a"])]

    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.complete and report.forgotten == {"alpha": [m1]}
    assert backend.catalogue.get("alpha", m1) is None
    # m1's tree pack is dead; the data pack of a and b lives on (b is m2's)
    assert state(backend, m1_tree_pack) == PACK_CONDEMNED and report.packs_condemned == 1
    assert report.blobs_condemned == 1 and state(backend, shared_pack) == PACK_VERIFIED
    assert report.packs_deleted == 0 and pack_exists(backend, m1_tree_pack)
    assert restorable(backend, "alpha", m2)

    size = backend.store.head_pack(m1_tree_pack).size  # type: ignore[union-attr]
    later = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert later.deleted_packs == [m1_tree_pack] and later.bytes_freed == size
    assert later.pack_versions_deleted == 1 and later.orphan_packs_deleted == 0  # the commit verified it
    assert backend.registry.get(m1_tree_pack) is None and not pack_exists(backend, m1_tree_pack)
    assert restorable(backend, "alpha", m2) and usable_for_every_kept_manifest(backend)


def test_a_dry_run_reports_the_same_and_writes_nothing(backend: Services) -> None:
    alpha, m1, _ = two_backups(backend)
    before = {record.pack_id: record for record in backend.registry.scan()}
    dry = collector(backend, REAL_NOW + 2 * GRACE).run(dry_run=True)
    assert dry.dry_run and dry.complete and dry.forgotten == {"alpha": [m1]} and dry.packs_condemned == 1
    assert backend.catalogue.get("alpha", m1) is not None
    assert {record.pack_id: record for record in backend.registry.scan()} == before
    assert read_gc_epoch(backend.registry).number == 0
    real = collector(backend, REAL_NOW + 2 * GRACE).run()
    counts = ("forgotten", "packs_condemned", "blobs_condemned", "packs_live", "blobs_live")
    assert [getattr(real, name) for name in counts] == [getattr(dry, name) for name in counts]
    # and a dry run of the deletion reports the bytes the real one frees
    dry_delete = collector(backend, REAL_NOW + 4 * GRACE).run(dry_run=True)
    assert pack_exists(backend, alpha.index[root_of(FIRST)])
    real_delete = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert (dry_delete.deleted_packs, dry_delete.bytes_freed) == (
        real_delete.deleted_packs,
        real_delete.bytes_freed,
    )


def test_packs_of_a_backup_in_flight_are_spared_until_the_grace_period_passed(backend: Services) -> None:
    alpha = Host(backend, "alpha")
    alpha.backup({"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    body = b"uploaded, not committed yet " * 20
    in_flight = alpha.upload([("data", body)])
    assert in_flight is not None
    soon = collector(backend, REAL_NOW + GRACE / 2).run()
    assert soon.packs_condemned == 0 and state(backend, in_flight) == PACK_PRESIGNED
    # An orphan of a crashed run: condemned once old enough; a commit using it then is refused.
    assert collector(backend, REAL_NOW + 2 * GRACE).run().packs_condemned == 1
    with pytest.raises(Unprocessable) as refused:
        alpha.commit({"late": body}, REAL_NOW)
    assert refused.value.details["packs"] == {in_flight: "condemned"}


def test_orphan_packs_are_collected_uploaded_or_not(backend: Services) -> None:
    alpha = Host(backend, "alpha")
    alpha.backup({"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    orphan = alpha.upload([("data", b"a crashed run's upload " * 30)])
    never_uploaded = "ab" * 32
    backend.registry.record_presigned(never_uploaded, "alpha", 1000, iso_utc(REAL_NOW))
    first = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert first.packs_condemned == 2 and first.packs_deleted == 0
    second = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert sorted(second.deleted_packs) == sorted([orphan, never_uploaded])
    assert second.orphan_packs_deleted == 2 and second.pack_versions_deleted == 1
    assert second.bytes_freed == len(build_pack([("data", b"a crashed run's upload " * 30)]).data)
    assert backend.registry.get(never_uploaded) is None and not pack_exists(backend, orphan)  # type: ignore[arg-type]


def test_a_condemned_pack_a_kept_manifest_needs_is_revived(backend: Services) -> None:
    alpha, _, m2 = two_backups(backend)
    c_pack = alpha.index[blob_hash(SECOND["c"])]
    assert backend.registry.condemn(c_pack, REAL_NOW)  # as if a commit had raced gc
    report = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert report.packs_revived == 1 and report.blobs_revived == 1
    assert state(backend, c_pack) == PACK_VERIFIED and pack_exists(backend, c_pack)
    assert restorable(backend, "alpha", m2) and usable_for_every_kept_manifest(backend)


def test_locked_dead_packs_wait_unless_governance_may_be_bypassed(backend: Services) -> None:
    alpha = Host(backend, "alpha")
    locked = alpha.upload([("data", b"locked for a while " * 30)], lock_until=REAL_NOW + timedelta(days=3))
    assert locked is not None
    collector(backend, REAL_NOW + 2 * GRACE).run()
    waiting = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert waiting.packs_deleted == 0 and waiting.packs_waiting_for_lock == 1
    assert state(backend, locked) == PACK_CONDEMNED and pack_exists(backend, locked)
    compliance = collector(backend, REAL_NOW + 4 * GRACE, bypass=True, lock_mode="COMPLIANCE").run()
    assert compliance.packs_deleted == 0 and compliance.packs_waiting_for_lock == 1
    bypassed = collector(backend, REAL_NOW + 4 * GRACE, bypass=True).run()
    assert bypassed.deleted_packs == [locked] and bypassed.bytes_freed > 0
    assert not pack_exists(backend, locked)


def test_live_packs_locked_short_of_their_manifests_are_sent_to_the_extender(backend: Services) -> None:
    recorder = Recorder()
    alpha = Host(backend, "alpha")
    m1 = alpha.backup({"a": b"fresh " * 10}, REAL_NOW)  # packs locked until REAL_NOW; it wants 30 days
    summary = backend.catalogue.get("alpha", m1)
    assert summary is not None
    report = collector(backend, REAL_NOW + 2 * GRACE, queue=recorder).run()
    assert report.lock_extensions_requested == 2 and report.packs_live == 2
    ((packs, until, source),) = recorder.requests
    assert iso_utc(until) == summary.retain_until and source == "gc"
    assert packs == sorted(
        {alpha.index[root_of({"a": b"fresh " * 10})], alpha.index[blob_hash(b"fresh " * 10)]}
    )


def test_a_second_run_while_one_holds_the_lease_does_nothing(backend: Services) -> None:
    _, m1, _ = two_backups(backend)
    holder = collector(backend, REAL_NOW)
    assert holder._take_lease("someone-else", REAL_NOW)
    skipped = collector(backend, REAL_NOW + timedelta(minutes=5)).run()
    assert skipped.skipped and not skipped.complete and backend.catalogue.get("alpha", m1) is not None
    # A crashed holder's lease expires; the next run goes ahead and leaves no lease behind.
    after = collector(backend, REAL_NOW + timedelta(hours=1)).run()
    assert after.complete and after.forgotten == {"alpha": [m1]}
    assert backend.jobs.client.get_item(TableName="jobs", Key={"job_id": LEASE_ID}).get("Item") is None


def test_an_unreadable_live_tree_stops_gc_before_it_condemns(backend: Services) -> None:
    alpha, _, _ = two_backups(backend)
    m2_tree_pack = alpha.index[root_of(SECOND)]
    backend.store.client.delete_object(Bucket=BUCKET, Key=f"packs/{m2_tree_pack}")  # lost (a bug elsewhere)
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert not report.complete and report.errors and report.packs_condemned == 0
    assert all(record.state != PACK_CONDEMNED for record in backend.registry.scan())
    assert read_gc_epoch(backend.registry).number == 0  # the window never opened


def test_the_keep_rules_never_forget_the_minimum_or_locked_manifests(backend: Services) -> None:
    alpha = Host(backend, "alpha")
    ids = [alpha.backup({"f": bytes([n]) * 50}, REAL_NOW - timedelta(days=60 - n)) for n in range(4)]
    locked = alpha.backup({"f": b"locked " * 9}, REAL_NOW)
    minimum_three = KeepRules(last=0, daily=0, weekly=0, monthly=0, yearly=0, minimum=3)
    report = collector(backend, REAL_NOW + 2 * GRACE, keep=minimum_three).run()
    kept = {s.manifest_id for s in backend.catalogue.list("alpha")}
    assert kept == {ids[2], ids[3], locked} and report.forgotten == {"alpha": ids[:2]}
    assert report.manifest_versions_deleted == 2
    assert collector(backend, REAL_NOW + 4 * GRACE, keep=minimum_three).run().packs_deleted == 4
    assert all(restorable(backend, "alpha", manifest_id) for manifest_id in kept)


def test_a_pack_shared_by_two_hosts_stays_while_either_needs_it(backend: Services) -> None:
    shared = {"s": b"the same file on two hosts " * 20}
    alpha, beta = Host(backend, "alpha"), Host(backend, "beta")
    a1 = alpha.backup(shared, REAL_NOW - timedelta(days=41))
    alpha.backup({"n": b"alpha moved on " * 20}, REAL_NOW - timedelta(days=40))
    b1 = beta.backup(shared, REAL_NOW - timedelta(days=40))  # byte-identical packs: beta is added to them
    assert beta.index == {blob: alpha.index[blob] for blob in beta.index}
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.forgotten == {"alpha": [a1]} and report.packs_condemned == 0
    collector(backend, REAL_NOW + 4 * GRACE).run()
    assert restorable(backend, "beta", b1) and usable_for_every_kept_manifest(backend)


def test_a_pack_only_other_hosts_reach_is_dead(backend: Services) -> None:
    """alpha's copy of a file only beta still backs up (in beta's own pack) serves nobody: it goes."""
    body = b"a file both hosts had, alpha deleted it " * 20
    alpha, beta = Host(backend, "alpha"), Host(backend, "beta")
    alpha_pack = alpha.upload([("data", body), ("data", b"pad")])  # another pack id than beta's
    alpha.backup({"f": body, "p": b"pad"}, REAL_NOW - timedelta(days=41))
    alpha.backup({"g": b"alpha's new file " * 9}, REAL_NOW - timedelta(days=40))
    b1 = beta.backup({"f": body}, REAL_NOW - timedelta(days=40))
    assert beta.index[blob_hash(body)] != alpha_pack
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert (
        state(backend, alpha_pack) == PACK_CONDEMNED and report.packs_condemned == 2
    )  # and alpha's old tree
    assert restorable(backend, "beta", b1) and usable_for_every_kept_manifest(backend)


def test_snapshot_streams_keep_their_chunks(backend: Services) -> None:
    alpha = Host(backend, "alpha")
    chunks = [os.urandom(300) for _ in range(3)]
    alpha.upload([("data", chunk) for chunk in chunks])
    stream = stream_index_bytes([blob_hash(chunk) for chunk in chunks])
    m1 = alpha.backup({"f": b"a file " * 9}, REAL_NOW - timedelta(days=40), snapshot=stream)
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.packs_condemned == 0 and report.packs_live == 3  # chunks, file and stream index, tree
    assert set(reachable(backend, "alpha", m1)) >= {blob_hash(chunk) for chunk in chunks}


def report_counts(report: GcReport) -> dict[str, int]:
    return {k: v for k, v in report.to_json().items() if isinstance(v, int) and not isinstance(v, bool)}


def test_running_again_at_once_changes_nothing(backend: Services) -> None:
    two_backups(backend)
    collector(backend, REAL_NOW + 2 * GRACE).run()
    collector(backend, REAL_NOW + 4 * GRACE).run()
    again = report_counts(collector(backend, REAL_NOW + 4 * GRACE).run())
    assert again["manifests_forgotten"] == again["packs_condemned"] == again["packs_deleted"] == 0
    assert again["closed_marks_dropped"] == again["redundant_claims_dropped"] == 0


def test_a_mostly_dead_pack_is_repacked_then_collected(backend: Services) -> None:
    big, small = os.urandom(20_000), b"small and still needed " * 4
    alpha = Host(backend, "alpha")
    alpha.backup({"big": big, "small": small}, REAL_NOW - timedelta(days=41))
    m2 = alpha.backup({"small": small}, REAL_NOW - timedelta(days=40))
    old_pack = alpha.index[blob_hash(small)]
    assert alpha.index[blob_hash(big)] == old_pack

    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.packs_mostly_dead == report.packs_repacked == 1 and report.bytes_repacked > 0
    old = backend.registry.get(old_pack)
    assert old is not None and old.state == PACK_CONDEMNED and old.superseded_by is not None
    new = backend.registry.get(old.superseded_by)
    assert new is not None and new.state == "verified" and new.hosts == old.hosts
    assert new.blob_count == 1 and report.bytes_repacked == new.size < 1000
    head = backend.store.client.head_object(Bucket=BUCKET, Key=f"packs/{new.pack_id}")
    assert (
        head["ObjectLockMode"] == "GOVERNANCE"
        and iso_utc(head["ObjectLockRetainUntilDate"]) == new.retain_until
    )
    assert new.retain_until > backend.catalogue.get("alpha", m2).retain_until  # type: ignore[union-attr]
    assert restorable(backend, "alpha", m2) and usable_for_every_kept_manifest(backend)

    later = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert old_pack in later.deleted_packs and later.bytes_freed > 20_000 and later.packs_repacked == 0
    assert restorable(backend, "alpha", m2)


def test_the_condemning_window_moves_the_epoch_and_a_crashed_ones_moves_on_by_two(backend: Services) -> None:
    two_backups(backend)
    collector(backend, REAL_NOW + 2 * GRACE).run()
    assert read_gc_epoch(backend.registry).number == 2  # opened (1) and closed (2)
    crashed = collector(backend, REAL_NOW)
    crashed._open_condemning_window(REAL_NOW - timedelta(hours=1))
    epoch = read_gc_epoch(backend.registry)
    assert epoch.number == 3 and epoch.stable(REAL_NOW)  # past condemning_until: commits go ahead
    collector(backend, REAL_NOW + 2 * GRACE)._open_condemning_window(REAL_NOW)
    assert read_gc_epoch(backend.registry).number == 5


def test_a_crashed_runs_deletion_is_finished_by_the_next_run(backend: Services) -> None:
    alpha = Host(backend, "alpha")
    orphan = alpha.upload([("data", b"condemned, then the run crashed while deleting " * 9)])
    assert orphan is not None
    collector(backend, REAL_NOW + 2 * GRACE).run()
    record = backend.registry.get(orphan)
    assert record is not None and backend.registry.start_deleting(orphan, record.condemned_at)  # type: ignore[arg-type]
    report = collector(backend, REAL_NOW + 2 * GRACE + timedelta(minutes=1)).run()
    assert report.deleted_packs == [orphan] and backend.registry.get(orphan) is None
    assert not pack_exists(backend, orphan)


def test_blob_contents_read_from_the_map_are_checked(backend: Services) -> None:
    """gc reads trees through trailers; a tree whose bytes do not hash right stops it (nothing condemned)."""
    alpha, _, _ = two_backups(backend)
    tree_pack = alpha.index[root_of(SECOND)]
    data = bytearray(backend.store.read(f"packs/{tree_pack}"))
    entry = parse_trailer(bytes(data))[0]
    data[entry.offset] ^= 0xFF
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{tree_pack}", Body=bytes(data))
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert not report.complete and "corrupt" in report.errors[0] and report.packs_condemned == 0


def test_the_report_keeps_v1_field_names_and_is_a_lambda_result(backend: Services) -> None:
    two_backups(backend)
    report = collector(backend, REAL_NOW + 2 * GRACE).run().to_json()
    assert json.loads(json.dumps(report)) == report
    v1_fields = {"closed_marks_dropped", "redundant_claims_dropped", "blobs_live", "blobs_condemned",
                 "blobs_revived", "packs_live", "packs_mostly_dead", "orphan_packs_deleted"}  # fmt: skip
    assert v1_fields <= set(report) and report["trees_read"] == 1 and report["blobs_live"] == 4


def test_a_condemned_pack_is_revived_for_its_host_even_if_another_hosts_pack_holds_the_blob(
    backend: Services,
) -> None:
    """beta cannot read alpha's packs: a copy there does not serve beta's manifest."""
    body = b"both hosts back this file up, each in its own pack " * 9
    alpha, beta = Host(backend, "alpha"), Host(backend, "beta")
    alpha.upload([("data", body), ("data", b"alpha's other file")])
    alpha.backup({"f": body, "o": b"alpha's other file"}, REAL_NOW - timedelta(days=1))
    b1 = beta.backup({"f": body}, REAL_NOW - timedelta(days=1))
    beta_pack = beta.index[blob_hash(body)]
    assert beta_pack != alpha.index[blob_hash(body)]
    assert backend.registry.condemn(beta_pack, REAL_NOW)  # as if beta's commit had raced gc
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.packs_revived == 1 and state(backend, beta_pack) == PACK_VERIFIED
    assert restorable(backend, "beta", b1) and usable_for_every_kept_manifest(backend)


def test_a_corrupt_pack_is_kept_while_reached_and_condemned_once_not(backend: Services) -> None:
    recorder = Recorder()
    alpha = Host(backend, "alpha")
    alpha.backup({"a": b"fresh " * 10}, REAL_NOW)
    reached = alpha.index[blob_hash(b"fresh " * 10)]
    unreached = alpha.upload([("data", b"a crashed run's upload " * 9)])
    assert unreached is not None
    for pack_id in (reached, unreached):
        assert backend.registry.mark_corrupt(pack_id, "a bit flipped")
    report = collector(backend, REAL_NOW + 2 * GRACE, queue=recorder).run()
    assert state(backend, reached) == "corrupt" and state(backend, unreached) == PACK_CONDEMNED
    assert report.packs_condemned == 1
    # the retention worker would not extend a corrupt pack: gc does not ask
    ((packs, _, _),) = recorder.requests
    assert packs == [alpha.index[root_of({"a": b"fresh " * 10})]]


def test_a_dry_run_repacks_nothing(backend: Services) -> None:
    big, small = os.urandom(20_000), b"small and still needed " * 4
    alpha = Host(backend, "alpha")
    alpha.backup({"big": big, "small": small}, REAL_NOW - timedelta(days=41))
    alpha.backup({"small": small}, REAL_NOW - timedelta(days=40))
    objects = backend.store.client.list_object_versions(Bucket=BUCKET)["Versions"]
    dry = collector(backend, REAL_NOW + 2 * GRACE).run(dry_run=True)
    assert dry.packs_mostly_dead == 1 and dry.packs_repacked == 0 and dry.bytes_repacked == 0
    assert backend.store.client.list_object_versions(Bucket=BUCKET)["Versions"] == objects
    assert state(backend, alpha.index[blob_hash(small)]) == PACK_VERIFIED


def test_a_run_out_of_time_condemns_nothing_and_releases_its_lease(backend: Services) -> None:
    two_backups(backend)
    report = collector(backend, REAL_NOW + 2 * GRACE).run(seconds=-1)
    assert not report.complete and "out of time" in report.errors[0] and report.packs_condemned == 0
    assert all(record.state != PACK_CONDEMNED for record in backend.registry.scan())
    assert backend.jobs.client.get_item(TableName="jobs", Key={"job_id": LEASE_ID}).get("Item") is None
    assert collector(backend, REAL_NOW + 2 * GRACE).run().packs_condemned == 1


def test_a_run_crashing_after_its_repack_is_finished_by_the_next(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    big, small = os.urandom(20_000), b"small and still needed " * 4
    alpha = Host(backend, "alpha")
    alpha.backup({"big": big, "small": small}, REAL_NOW - timedelta(days=41))
    m2 = alpha.backup({"small": small}, REAL_NOW - timedelta(days=40))
    old_pack = alpha.index[blob_hash(small)]
    crashing = collector(backend, REAL_NOW + 2 * GRACE)

    def crash(now: datetime) -> None:
        raise RuntimeError("Lambda timed out")

    monkeypatch.setattr(crashing, "_open_condemning_window", crash)
    with pytest.raises(RuntimeError):
        crashing.run()
    written = {record.pack_id for record in backend.registry.scan()} - set(alpha.index.values())
    assert (
        len(written) == 1 and state(backend, old_pack) == PACK_VERIFIED
    )  # new pack stored, old not condemned
    after = collector(backend, REAL_NOW + 2 * GRACE + timedelta(minutes=30)).run()  # the lease was released
    old = backend.registry.get(old_pack)
    assert after.packs_repacked == 1 and old is not None and old.superseded_by == written.pop()
    assert restorable(backend, "alpha", m2) and usable_for_every_kept_manifest(backend)


def test_a_repacked_pack_is_locked_from_the_time_it_is_written(backend: Services) -> None:
    # A run slower than the fold window (or a window of 0) must not write a retain-until already past:
    # S3 refuses it. The lock runs from the clock at the write, not from the run's start.
    big, small = os.urandom(20_000), b"small and still needed " * 4
    alpha = Host(backend, "alpha")
    alpha.backup({"big": big, "small": small}, REAL_NOW - timedelta(days=41))
    alpha.backup({"small": small}, REAL_NOW - timedelta(days=40))
    old_pack = alpha.index[blob_hash(small)]
    started = REAL_NOW + 2 * GRACE
    readings = iter([started])  # the run's start; every later reading is a minute on
    slow = collector(backend, started)
    slow.clock = lambda: next(readings, started + timedelta(minutes=1))
    assert slow.run().packs_repacked == 1
    old = backend.registry.get(old_pack)
    new = backend.registry.get(old.superseded_by) if old is not None and old.superseded_by else None
    assert new is not None
    assert new.retain_until >= iso_utc(started + timedelta(minutes=1) + timedelta(days=7))
