"""gc against moto: forget, condemn, wait the grace period, delete; never a blob a live manifest needs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.commit import Committer
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.gc import LEASE_ID, GarbageCollector, GcReport, read_gc_epoch
from sysbackup_backend.index import blob_pk, closed_sk, host_sk
from sysbackup_backend.walk import Budget, TreeWalker
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.keep import GcPolicy, KeepRules
from sysbackup_domain.manifest import decode_manifest, decode_stream_index
from sysbackup_domain.packs import PackWriter, open_blob, parse_trailer
from sysbackup_domain.retention import RetentionPolicy, iso_utc
from sysbackup_domain.tree import decode_tree
from sysbackup_testkit import BUCKET, build_pack, file_entry, put_pack_object, tree_bytes

REAL_NOW = datetime.now(timezone.utc)
GRACE = timedelta(hours=1)
KEEP_NEWEST = KeepRules(last=1, daily=0, weekly=0, monthly=0, yearly=0, minimum=1)
POLICY = RetentionPolicy(days_retained=30, max_days_retained=365, lock_mode="GOVERNANCE")


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
) -> GarbageCollector:
    return GarbageCollector(
        index=services.index,
        store=services.store,
        catalogue=services.catalogue,
        jobs_table=services.settings.jobs_table,
        policy=GcPolicy(keep=keep, grace=GRACE, fold_window=timedelta(days=7), bypass_governance=bypass),
        lock_mode=lock_mode,
        retention_queue=queue,  # type: ignore[arg-type]
        clock=lambda: at,
    )


def upload(
    services: Services, host: str, blobs: list[tuple[str, bytes]], lock_until: datetime | None = None
) -> str:
    """A host's upload of the blobs not yet stored for it, as one pack; returns the pack id ("" if none)."""
    stored = services.index.stored_for(host, [blob_hash(plain) for _, plain in blobs])
    fresh = [(kind, plain) for kind, plain in blobs if blob_hash(plain) not in stored]
    if not fresh:
        return ""
    pack = build_pack(fresh)
    if lock_until is None:
        put_pack_object(services, pack)
    else:
        services.store.client.put_object(
            Bucket=BUCKET,
            Key=f"packs/{pack.pack_id}",
            Body=pack.data,
            ChecksumAlgorithm="SHA256",
            ObjectLockMode="GOVERNANCE",
            ObjectLockRetainUntilDate=lock_until,
        )
    services.index.record_presigned(pack.pack_id, host, len(pack.data), iso_utc(lock_until or REAL_NOW))
    services.index.register_pack(host, pack.pack_id, pack.entries)
    return pack.pack_id


def backup(
    services: Services,
    host: str,
    files: dict[str, bytes],
    created: datetime,
    lock_until: datetime | None = None,
) -> str:
    """Upload and commit a one-directory tree; returns the manifest id."""
    upload(services, host, [("data", content) for content in files.values()], lock_until)
    root = tree_bytes([file_entry(name, [blob_hash(content)]) for name, content in files.items()])
    upload(services, host, [("tree", root)], lock_until)
    committer = Committer(
        services.index, services.store, services.catalogue, services.jobs, POLICY, clock=lambda: created
    )
    body = {"parent": services.catalogue.head(host), "root": blob_hash(root), "snapshots": [], "stats": {}}
    outcome = committer.start(host, body, Budget(60))
    assert outcome.status_code == 201, outcome.body
    return str(outcome.body["manifest_id"])


def restorable(services: Services, host: str, manifest_id: str) -> bool:
    """Every blob of the manifest is located for the host, its pack is there and the bytes hash right."""
    summary = services.catalogue.get(host, manifest_id)
    assert summary is not None
    document = decode_manifest(services.store.read(summary.key))
    trees = [document.root] if document.root else []
    streams = [s.content for s in document.snapshots if s.content]
    data: set[str] = set()
    while trees or streams:
        nodes = trees + streams
        located = services.index.locate(host, nodes)
        if set(located) != set(nodes):
            return False
        next_trees: list[str] = []
        for blob in nodes:
            plain = read_blob(services, blob, located[blob])
            if plain is None:
                return False
            if blob in trees:
                tree = decode_tree(plain)
                data.update(c for entry in tree.entries for c in entry.content)
                next_trees.extend(entry.subtree for entry in tree.entries if entry.subtree)
            else:
                data.update(decode_stream_index(plain))
        trees, streams = next_trees, []
    located = services.index.locate(host, data)
    return set(located) == data and all(read_blob(services, blob, located[blob]) is not None for blob in data)


def read_blob(services: Services, blob: str, location: Any) -> bytes | None:
    try:
        stored = services.store.read_range(
            f"packs/{location.pack_id}", location.offset, location.offset + location.length - 1
        )
    except Exception:
        return None
    plain = open_blob(location.entry(blob), stored)
    return plain if hashlib.sha256(plain).hexdigest() == blob else None


def item(services: Services, pk: str, sk: str) -> dict[str, Any] | None:
    response = services.index.client.get_item(TableName=services.index.table_name, Key={"pk": pk, "sk": sk})
    return response.get("Item")


def pack_exists(services: Services, pack_id: str) -> bool:
    return services.store.head_pack(pack_id) is not None


def two_backups(services: Services) -> tuple[str, str, dict[str, bytes], dict[str, bytes]]:
    """m1: {a, b}; m2 (a day later): {b, c}. Both locks lapsed long ago."""
    first = {"a": b"only in the first backup " * 40, "b": b"in both backups " * 30}
    second = {"b": first["b"], "c": b"only in the second backup " * 50}
    m1 = backup(services, "alpha", first, REAL_NOW - timedelta(days=41))
    m2 = backup(services, "alpha", second, REAL_NOW - timedelta(days=40))
    return m1, m2, first, second


def test_a_forgotten_manifest_is_condemned_then_deleted_after_the_grace_period(backend: Services) -> None:
    m1, m2, first, _ = two_backups(backend)
    m1_root = blob_hash(tree_bytes([file_entry(n, [blob_hash(c)]) for n, c in first.items()]))
    m1_tree_pack = item(backend, blob_pk(m1_root), host_sk("alpha"))["pack_id"]  # type: ignore[index]

    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.complete and report.forgotten == {"alpha": [m1]}
    assert backend.catalogue.get("alpha", m1) is None
    # a and m1's root are unreachable now: condemned, not yet deleted (the grace period starts now)
    assert report.blobs_condemned == 2
    assert "condemned_at" in item(backend, blob_pk(blob_hash(first["a"])), host_sk("alpha"))  # type: ignore[operator]
    assert pack_exists(backend, m1_tree_pack) and report.packs_deleted == 0
    assert restorable(backend, "alpha", m2)

    later = collector(backend, REAL_NOW + 4 * GRACE).run()
    # m1's tree pack held only m1's root: deleted, bytes reported; the shared data pack stays (b is live)
    assert later.deleted_packs == [m1_tree_pack]
    assert backend.index.get_pack(m1_tree_pack) is None and later.bytes_freed > 0
    assert not pack_exists(backend, m1_tree_pack)
    assert item(backend, blob_pk(m1_root), host_sk("alpha")) is None
    assert restorable(backend, "alpha", m2)


def test_bytes_freed_are_the_deleted_versions_sizes(backend: Services) -> None:
    _, _, first, _ = two_backups(backend)
    m1_root = tree_bytes([file_entry(n, [blob_hash(c)]) for n, c in first.items()])
    size = backend.store.head_pack(
        item(backend, blob_pk(blob_hash(m1_root)), host_sk("alpha"))["pack_id"]
    ).size  # type: ignore[index, union-attr]
    collector(backend, REAL_NOW + 2 * GRACE).run()
    assert collector(backend, REAL_NOW + 4 * GRACE).run().bytes_freed == size


def test_a_dry_run_reports_the_same_and_writes_nothing(backend: Services) -> None:
    m1, _, first, _ = two_backups(backend)
    dry = collector(backend, REAL_NOW + 2 * GRACE).run(dry_run=True)
    assert dry.dry_run and dry.forgotten == {"alpha": [m1]} and dry.blobs_condemned == 2
    assert backend.catalogue.get("alpha", m1) is not None
    assert "condemned_at" not in item(backend, blob_pk(blob_hash(first["a"])), host_sk("alpha"))  # type: ignore[operator]
    real = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert (real.forgotten, real.blobs_condemned) == (dry.forgotten, dry.blobs_condemned)


def test_blobs_of_a_backup_in_flight_are_spared_until_the_grace_period_passed(backend: Services) -> None:
    backup(backend, "alpha", {"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    in_flight = b"uploaded, not committed yet " * 20
    upload(backend, "alpha", [("data", in_flight)])
    soon = collector(backend, REAL_NOW + GRACE / 2).run()
    assert soon.blobs_condemned == 0
    assert backend.index.stored_for("alpha", [blob_hash(in_flight)])
    # An orphan of a crashed run: condemned once old enough, and then no commit may reference it.
    assert collector(backend, REAL_NOW + 2 * GRACE).run().blobs_condemned == 1
    root = tree_bytes([file_entry("late", [blob_hash(in_flight)])])
    upload(backend, "alpha", [("tree", root)])
    committer = Committer(backend.index, backend.store, backend.catalogue, backend.jobs, POLICY)
    body = {"parent": backend.catalogue.head("alpha"), "root": blob_hash(root), "snapshots": [], "stats": {}}
    with pytest.raises(Unprocessable) as refused:
        committer.start("alpha", body, Budget(60))
    assert refused.value.details["condemned"] == [blob_hash(in_flight)]


def test_orphan_packs_of_crashed_runs_are_collected(backend: Services) -> None:
    backup(backend, "alpha", {"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    orphan = upload(backend, "alpha", [("data", b"a crashed run's upload " * 30)])
    never_uploaded = "ab" * 32
    backend.index.record_presigned(never_uploaded, "alpha", 1000, iso_utc(REAL_NOW))
    # Never uploaded: nothing to condemn, gone once older than the grace period. Uploaded: condemned first.
    first = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert first.deleted_packs == [never_uploaded] and first.orphan_packs_deleted == 1
    second = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert second.deleted_packs == [orphan] and second.bytes_freed > 0
    assert backend.index.get_pack(never_uploaded) is None and not pack_exists(backend, orphan)


def test_closed_marks_of_condemned_trees_are_dropped(backend: Services) -> None:
    _, _, first, second = two_backups(backend)
    m1_root = blob_hash(tree_bytes([file_entry(n, [blob_hash(c)]) for n, c in first.items()]))
    m2_root = blob_hash(tree_bytes([file_entry(n, [blob_hash(c)]) for n, c in second.items()]))
    assert item(backend, blob_pk(m1_root), closed_sk("alpha")) is not None
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.closed_marks_dropped == 1
    assert item(backend, blob_pk(m1_root), closed_sk("alpha")) is None
    assert item(backend, blob_pk(m2_root), closed_sk("alpha")) is not None


def test_a_live_blob_condemned_by_a_race_is_revived(backend: Services) -> None:
    _, m2, _, second = two_backups(backend)
    key = {"pk": blob_pk(blob_hash(second["c"])), "sk": host_sk("alpha")}
    backend.index.client.update_item(
        TableName=backend.index.table_name, Key=key, UpdateExpression="SET condemned_at = :t",
        ExpressionAttributeValues={":t": iso_utc(REAL_NOW)},
    )  # fmt: skip
    assert not restorable(backend, "alpha", m2)
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.blobs_revived == 1 and restorable(backend, "alpha", m2)


def test_locked_dead_packs_wait_unless_governance_may_be_bypassed(backend: Services) -> None:
    first = {"a": b"locked for a while " * 30}
    locked = REAL_NOW + timedelta(days=3)
    backup(backend, "alpha", first, REAL_NOW - timedelta(days=41), lock_until=locked)
    backup(backend, "alpha", {"z": b"newer " * 10}, REAL_NOW - timedelta(days=40))
    collector(backend, REAL_NOW + 2 * GRACE).run()
    waiting = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert waiting.packs_deleted == 0 and waiting.packs_waiting_for_lock == 2
    compliance = collector(backend, REAL_NOW + 4 * GRACE, bypass=True, lock_mode="COMPLIANCE").run()
    assert compliance.packs_deleted == 0 and compliance.packs_waiting_for_lock == 2
    bypassed = collector(backend, REAL_NOW + 4 * GRACE, bypass=True).run()
    assert bypassed.packs_deleted == 2 and bypassed.bytes_freed > 0


def test_live_packs_locked_short_of_their_manifests_are_sent_to_the_extender(backend: Services) -> None:
    recorder = Recorder()
    # Locked until REAL_NOW (recorded at presign); the manifest committed now wants 30 days.
    m1 = backup(backend, "alpha", {"a": b"fresh " * 10}, REAL_NOW)
    summary = backend.catalogue.get("alpha", m1)
    assert summary is not None
    report = collector(backend, REAL_NOW + 2 * GRACE, queue=recorder).run()
    assert report.lock_extensions_requested == 2  # its data pack and its tree pack
    ((packs, until, source),) = recorder.requests
    assert iso_utc(until) == summary.retain_until and source == "gc" and len(packs) == 2


def test_a_second_run_while_one_holds_the_lease_does_nothing(backend: Services) -> None:
    m1, _, _, _ = two_backups(backend)
    holder = collector(backend, REAL_NOW)
    assert holder._take_lease("someone-else", REAL_NOW)
    skipped = collector(backend, REAL_NOW + timedelta(minutes=5)).run()
    assert skipped.skipped and not skipped.complete and backend.catalogue.get("alpha", m1) is not None
    # A crashed holder's lease expires; the next run goes ahead and leaves no lease behind.
    after = collector(backend, REAL_NOW + timedelta(hours=1)).run()
    assert after.complete and after.forgotten == {"alpha": [m1]}
    assert backend.jobs.client.get_item(TableName="jobs", Key={"job_id": LEASE_ID}).get("Item") is None


def test_an_unreadable_live_manifest_stops_gc_before_it_condemns(backend: Services) -> None:
    _, _, first, second = two_backups(backend)
    m2_root = blob_hash(tree_bytes([file_entry(n, [blob_hash(c)]) for n, c in second.items()]))
    backend.index.client.delete_item(
        TableName=backend.index.table_name, Key={"pk": blob_pk(m2_root), "sk": host_sk("alpha")}
    )
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert not report.complete and report.errors and report.blobs_condemned == 0
    assert "condemned_at" not in item(backend, blob_pk(blob_hash(first["a"])), host_sk("alpha"))  # type: ignore[operator]


def test_the_keep_rules_never_forget_the_minimum_or_locked_manifests(backend: Services) -> None:
    ids = [
        backup(backend, "alpha", {"f": bytes([n]) * 50}, REAL_NOW - timedelta(days=60 - n)) for n in range(4)
    ]
    locked = backup(backend, "alpha", {"f": b"locked " * 9}, REAL_NOW)
    report = collector(
        backend,
        REAL_NOW + 2 * GRACE,
        keep=KeepRules(last=0, daily=0, weekly=0, monthly=0, yearly=0, minimum=3),
    ).run()
    kept = {s.manifest_id for s in backend.catalogue.list("alpha")}
    # the newest three (minimum) include the locked one; the two oldest go
    assert kept == {ids[2], ids[3], locked} and report.forgotten == {"alpha": ids[:2]}
    assert all(restorable(backend, "alpha", manifest_id) for manifest_id in kept)


def test_hosts_sharing_content_keep_it_while_either_needs_it(backend: Services) -> None:
    shared = {"s": b"the same file on two hosts " * 20}
    a1 = backup(backend, "alpha", shared, REAL_NOW - timedelta(days=41))
    backup(backend, "alpha", {"n": b"alpha moved on " * 20}, REAL_NOW - timedelta(days=40))
    b1 = backup(backend, "beta", shared, REAL_NOW - timedelta(days=40))
    report = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert report.forgotten == {"alpha": [a1]}
    collector(backend, REAL_NOW + 4 * GRACE).run()
    assert restorable(backend, "beta", b1)


def report_counts(report: GcReport) -> dict[str, int]:
    return {k: v for k, v in report.to_json().items() if isinstance(v, int) and not isinstance(v, bool)}


def test_running_again_at_once_changes_nothing(backend: Services) -> None:
    two_backups(backend)
    collector(backend, REAL_NOW + 2 * GRACE).run()
    collector(backend, REAL_NOW + 4 * GRACE).run()
    again = collector(backend, REAL_NOW + 4 * GRACE).run()
    counts = report_counts(again)
    assert counts["manifests_forgotten"] == counts["blobs_condemned"] == counts["packs_deleted"] == 0


def test_a_mostly_dead_pack_is_repacked_then_collected(backend: Services) -> None:
    big, small = os.urandom(20_000), b"small and still needed " * 4
    backup(backend, "alpha", {"big": big, "small": small}, REAL_NOW - timedelta(days=41))
    m2 = backup(backend, "alpha", {"small": small}, REAL_NOW - timedelta(days=40))
    old_pack = item(backend, blob_pk(blob_hash(small)), host_sk("alpha"))["pack_id"]  # type: ignore[index]
    collector(backend, REAL_NOW + 2 * GRACE).run()  # forgets m1, condemns big

    second = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert second.packs_repacked == 1 and second.packs_deleted == 1  # the old root's tree pack went too
    new_pack = item(backend, blob_pk(blob_hash(small)), host_sk("alpha"))["pack_id"]  # type: ignore[index]
    assert new_pack != old_pack and pack_exists(backend, old_pack)
    head = backend.store.client.head_object(Bucket=BUCKET, Key=f"packs/{new_pack}")
    assert head["ObjectLockMode"] == "GOVERNANCE" and head["ContentLength"] < 1000
    assert restorable(backend, "alpha", m2)

    third = collector(backend, REAL_NOW + 6 * GRACE).run()
    assert third.deleted_packs == [old_pack] and third.bytes_freed > 20_000
    assert restorable(backend, "alpha", m2)


def pending_commit(
    services: Services, host: str, files: dict[str, bytes]
) -> tuple[Committer, Any, Any, dict[str, Any]]:
    """A commit whose walk has run (seeing every blob stored) but whose transaction has not."""
    upload(services, host, [("data", body) for body in files.values()])
    root = tree_bytes([file_entry(name, [blob_hash(body)]) for name, body in files.items()])
    upload(services, host, [("tree", root)])
    committer = Committer(services.index, services.store, services.catalogue, services.jobs, POLICY)
    body = {"parent": services.catalogue.head(host), "root": blob_hash(root), "snapshots": []}
    request = committer._parse(body)
    state = committer._fresh_state(request)
    TreeWalker(services.index, services.store, host).run(state, Budget(60))
    assert state.done and not state.problem_count
    return committer, request, state, body


def test_a_commit_whose_walk_gc_overtook_walks_again_and_is_refused(backend: Services) -> None:
    backup(backend, "alpha", {"x": b"committed " * 20}, REAL_NOW - timedelta(days=40))
    committer, request, state, _ = pending_commit(backend, "alpha", {"orphan": b"not yet referenced " * 9})
    # gc runs between the walk and the transaction, and condemns the blob the walk found stored.
    assert collector(backend, REAL_NOW + 2 * GRACE).run().blobs_condemned >= 1
    with pytest.raises(Unprocessable) as refused:
        committer._walk_and_commit("alpha", request, {}, state, None, Budget(60))
    assert refused.value.details["condemned"]


def test_a_walk_begun_while_gc_condemns_waits_for_the_window_to_close(backend: Services) -> None:
    gc = collector(backend, REAL_NOW)
    gc._open_condemning_window(REAL_NOW)
    committer, request, state, body = pending_commit(backend, "alpha", {"f": b"during the window " * 9})
    assert state.gc_epoch == -1
    deferred = committer._walk_and_commit("alpha", request, body, state, None, Budget(60))
    assert deferred.status_code == 202
    gc._close_condemning_window()
    assert committer.resume("alpha", deferred.body["job_id"], Budget(60)).status_code == 201


def test_a_crashed_runs_window_does_not_block_commits_once_it_expired(backend: Services) -> None:
    collector(backend, REAL_NOW).run()  # epoch 2
    collector(backend, REAL_NOW - timedelta(hours=1))._open_condemning_window(REAL_NOW - timedelta(hours=1))
    _, _, state, _ = pending_commit(backend, "alpha", {"f": b"after a crash " * 9})
    assert state.gc_epoch == 3
    # the next run moves an odd epoch on by two: it stays a window, and commits walked in 3 are refused
    after = collector(backend, REAL_NOW + timedelta(hours=1))
    after._open_condemning_window(REAL_NOW + timedelta(hours=1))
    assert read_gc_epoch(backend.index).number == 5


def test_a_second_hosts_copy_of_a_verified_blob_is_collected(backend: Services) -> None:
    """alpha and beta uploaded the same file before either was verified; the verified copy serves both."""
    shared = b"the same file on two hosts, uploaded twice " * 40
    backup(backend, "alpha", {"s": shared}, REAL_NOW - timedelta(days=2))
    alpha_pack = item(backend, blob_pk(blob_hash(shared)), host_sk("alpha"))["pack_id"]  # type: ignore[index]
    backend.index.record_verified(alpha_pack, parse_trailer(backend.store.read(f"packs/{alpha_pack}")))
    # beta's copy: the same blob stored uncompressed, so another pack
    writer = PackWriter()
    writer.add_stored(blob_hash(shared), "data", "none", shared, len(shared))
    data, entries = writer.finish()
    beta_pack = hashlib.sha256(data).hexdigest()
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{beta_pack}", Body=data)
    backend.index.record_presigned(beta_pack, "beta", len(data), iso_utc(REAL_NOW))
    backend.index.register_pack("beta", beta_pack, entries)
    b1 = backup(backend, "beta", {"s": shared}, REAL_NOW - timedelta(days=2))

    first = collector(backend, REAL_NOW + 2 * GRACE).run()
    assert first.redundant_claims_dropped == 1 and first.blobs_condemned == 0
    assert backend.index.locate("beta", [blob_hash(shared)])[blob_hash(shared)].pack_id == alpha_pack
    assert restorable(backend, "beta", b1)
    second = collector(backend, REAL_NOW + 4 * GRACE).run()
    assert second.deleted_packs == [beta_pack] and second.orphan_packs_deleted == 1, second.to_json()
    assert restorable(backend, "beta", b1)
