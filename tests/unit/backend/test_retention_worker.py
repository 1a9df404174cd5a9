"""Pack lock extension: commits enqueue their packs in few messages; the worker only ever lengthens locks."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from sysbackup_backend.api import Services
from sysbackup_backend.retention_worker import (
    PACKS_PER_MESSAGE,
    ExtensionRequest,
    LockExtender,
    RetentionQueue,
)
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.retention import iso_utc, parse_iso_utc
from sysbackup_testkit import BUCKET, REGION, build_pack

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
    services.registry.record_presigned(pack.pack_id, "alpha", len(pack.data), iso_utc(until))
    return pack.pack_id


def lock_of(services: Services, pack_id: str) -> datetime:
    head = services.store.client.head_object(Bucket=BUCKET, Key=f"packs/{pack_id}")
    return head["ObjectLockRetainUntilDate"].astimezone(timezone.utc).replace(microsecond=0)


class S3AsAws:
    """The test bucket's client, answering PutObjectRetention on a missing key with NoSuchKey as S3 does
    (moto raises an AttributeError there)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def put_object_retention(self, **request: Any) -> Any:
        try:
            self.client.head_object(Bucket=request["Bucket"], Key=request["Key"])
        except ClientError:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "PutObjectRetention") from None
        return self.client.put_object_retention(**request)


def extender(services: Services) -> LockExtender:
    return LockExtender(services.registry, S3AsAws(services.store.client), BUCKET, "GOVERNANCE", FOLD)


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
    record = backend.registry.get(pack_id)
    assert record is not None and parse_iso_utc(record.retain_until) == need + FOLD


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


def test_a_presigned_pack_in_use_is_extended_like_a_verified_one(backend: Services) -> None:
    """Big packs stay `presigned` until the verifier reads them, though a commit already uses them."""
    presigned = locked_pack(backend, NOW + timedelta(days=1))
    verified = locked_pack(backend, NOW + timedelta(days=1), b"another pack " * 10)
    assert backend.registry.mark_verified(verified, 1)
    report = extender(backend).apply(ExtensionRequest((presigned, verified), NOW + timedelta(days=9), "m1"))
    assert sorted(report.extended) == sorted([presigned, verified])
    assert lock_of(backend, presigned) == lock_of(backend, verified) == NOW + timedelta(days=9) + FOLD


def test_requests_for_unknown_or_never_uploaded_packs_are_reported_not_retried(backend: Services) -> None:
    presigned_only = "cd" * 32
    backend.registry.record_presigned(presigned_only, "alpha", 100, iso_utc(NOW))
    report = extender(backend).apply(
        ExtensionRequest((presigned_only, "ef" * 32), NOW + timedelta(days=5), "gc")
    )
    assert sorted(report.not_uploaded) == sorted([presigned_only, "ef" * 32])
    record = backend.registry.get(presigned_only)
    assert record is not None and record.retain_until == iso_utc(NOW)  # nothing was locked: nothing recorded


def test_condemned_packs_are_not_locked_longer(backend: Services) -> None:
    """A condemned pack is no kept manifest's: a longer lock would only hold gc back."""
    until = NOW + timedelta(days=1)
    pack_id = locked_pack(backend, until)
    assert backend.registry.condemn(pack_id, NOW)
    report = extender(backend).apply(ExtensionRequest((pack_id,), NOW + timedelta(days=30), "m1"))
    assert report.not_live == [pack_id] and report.extended == []
    assert lock_of(backend, pack_id) == until
    assert report.to_json() == {"extended": 0, "already_locked": 0, "not_uploaded": 0, "not_live": 1}


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
