"""Pack lock extension: commits enqueue their packs in few messages; the worker only ever lengthens locks."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.commit import Committer
from sysbackup_backend.retention_worker import (
    PACKS_PER_MESSAGE,
    ExtensionRequest,
    LockExtender,
    RetentionQueue,
)
from sysbackup_backend.walk import Budget
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.retention import RetentionPolicy, iso_utc, parse_iso_utc
from sysbackup_testkit import BUCKET, REGION, build_pack, file_entry, tree_bytes

NOW = datetime.now(timezone.utc).replace(microsecond=0)
FOLD = timedelta(days=7)


def sqs_queue() -> tuple[Any, str]:
    sqs = boto3.client("sqs", region_name=REGION)
    return sqs, sqs.create_queue(QueueName="retention")["QueueUrl"]


def drain(sqs: Any, url: str) -> list[dict[str, Any]]:
    bodies = []
    while True:
        messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
        if not messages:
            return bodies
        for message in messages:
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])


def locked_pack(services: Services, until: datetime, content: bytes = b"pack content " * 10) -> str:
    pack = build_pack([("data", content)])
    services.store.client.put_object(
        Bucket=BUCKET,
        Key=f"packs/{pack.pack_id}",
        Body=pack.data,
        ChecksumAlgorithm="SHA256",
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=until,
    )
    services.index.record_presigned(pack.pack_id, "alpha", len(pack.data), iso_utc(until))
    services.index.register_pack("alpha", pack.pack_id, pack.entries)
    return pack.pack_id


def lock_of(services: Services, pack_id: str) -> datetime:
    head = services.store.client.head_object(Bucket=BUCKET, Key=f"packs/{pack_id}")
    return head["ObjectLockRetainUntilDate"].astimezone(timezone.utc).replace(microsecond=0)


def extender(services: Services) -> LockExtender:
    return LockExtender(services.index, services.store.client, BUCKET, "GOVERNANCE", FOLD)


def test_many_packs_travel_in_few_messages(backend: Services) -> None:
    sqs, url = sqs_queue()
    pack_ids = [f"{n:064x}" for n in range(2 * PACKS_PER_MESSAGE + 5)]
    sent = RetentionQueue(url, sqs).request(pack_ids + pack_ids[:10], NOW, "m1")
    bodies = drain(sqs, url)
    assert sent == len(bodies) == 3
    requests = [ExtensionRequest.from_json(body) for body in bodies]
    assert sorted(p for r in requests for p in r.pack_ids) == sorted(pack_ids)
    assert {(r.retain_until, r.source) for r in requests} == {(NOW, "m1")}


def test_a_short_lock_is_extended_a_fold_window_past_the_need(backend: Services) -> None:
    pack_id = locked_pack(backend, NOW + timedelta(days=1))
    need = NOW + timedelta(days=30)
    report = extender(backend).apply(ExtensionRequest((pack_id,), need, "m1"))
    assert report.extended == [pack_id]
    assert lock_of(backend, pack_id) == need + FOLD
    assert parse_iso_utc(backend.index.get_pack(pack_id)["retain_until"]) == need + FOLD  # type: ignore[index]


def test_a_sufficient_lock_costs_no_s3_call_and_is_never_shortened(backend: Services) -> None:
    until = NOW + timedelta(days=60)
    pack_id = locked_pack(backend, until)
    calls: list[str] = []
    backend.store.client.meta.events.register(
        "before-call.s3.PutObjectRetention", lambda **_: calls.append("x")
    )
    report = extender(backend).apply(ExtensionRequest((pack_id,), NOW + timedelta(days=30), "m2"))
    assert report.already_locked == [pack_id] and calls == []
    assert lock_of(backend, pack_id) == until


def test_requests_for_unknown_or_vanished_packs_are_reported_not_retried(backend: Services) -> None:
    presigned_only = "cd" * 32
    backend.index.record_presigned(presigned_only, "alpha", 100, iso_utc(NOW))
    report = extender(backend).apply(
        ExtensionRequest((presigned_only, "ef" * 32), NOW + timedelta(days=5), "gc")
    )
    assert sorted(report.not_uploaded) == sorted([presigned_only, "ef" * 32])


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"packs": [], "retain_until": "2026-12-01T00:00:00Z", "source": "gc"},
        {"packs": ["nothex"], "retain_until": "2026-12-01T00:00:00Z", "source": "gc"},
        {"packs": ["ab" * 32], "retain_until": "tomorrow", "source": "gc"},
        {"packs": ["ab" * 32], "retain_until": "2026-12-01T00:00:00Z", "source": ""},
        {
            "packs": ["ab" * 32] * (PACKS_PER_MESSAGE + 1),
            "retain_until": "2026-12-01T00:00:00Z",
            "source": "gc",
        },
    ],
)
def test_malformed_requests_are_refused(document: object) -> None:
    with pytest.raises(InvalidDocument):
        ExtensionRequest.from_json(document)


def test_a_commit_asks_to_lock_its_new_packs_as_long_as_the_manifest(backend: Services) -> None:
    sqs, url = sqs_queue()
    data = build_pack([("data", b"file body " * 20)])
    root = tree_bytes([file_entry("f", [blob_hash(b"file body " * 20)])])
    tree = build_pack([("tree", root)])
    for pack in (data, tree):
        backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{pack.pack_id}", Body=pack.data)
        backend.index.record_presigned(pack.pack_id, "alpha", len(pack.data), iso_utc(NOW))
        backend.index.register_pack("alpha", pack.pack_id, pack.entries)
    policy = RetentionPolicy(days_retained=30, max_days_retained=365, lock_mode="GOVERNANCE")
    committer = Committer(
        backend.index,
        backend.store,
        backend.catalogue,
        backend.jobs,
        policy,
        retention_queue=RetentionQueue(url, sqs),
    )
    body = {"parent": None, "root": blob_hash(root), "snapshots": [], "stats": {}}
    outcome = committer.start("alpha", body, Budget(60))
    ((request,),) = [[ExtensionRequest.from_json(b) for b in drain(sqs, url)]]
    assert sorted(request.pack_ids) == sorted([data.pack_id, tree.pack_id])
    assert iso_utc(request.retain_until) == outcome.body["retain_until"]
    assert request.source == outcome.body["manifest_id"]


def test_a_commit_succeeds_even_when_the_queue_is_unreachable(backend: Services) -> None:
    root = tree_bytes([])
    tree = build_pack([("tree", root)])
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{tree.pack_id}", Body=tree.data)
    backend.index.record_presigned(tree.pack_id, "alpha", len(tree.data), iso_utc(NOW))
    backend.index.register_pack("alpha", tree.pack_id, tree.entries)
    sqs = boto3.client("sqs", region_name=REGION)
    missing_queue = RetentionQueue(f"https://sqs.{REGION}.amazonaws.com/123456789012/no-such-queue", sqs)
    policy = RetentionPolicy(days_retained=30, max_days_retained=365, lock_mode="GOVERNANCE")
    committer = Committer(
        backend.index, backend.store, backend.catalogue, backend.jobs, policy, retention_queue=missing_queue
    )
    body = {"parent": None, "root": blob_hash(root), "snapshots": [], "stats": {}}
    assert committer.start("alpha", body, Budget(60)).status_code == 201
