"""The pack verifier: SQS batches of S3 notifications; good packs verified, tampered ones corrupt."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import MAGIC, PackEntry, encode_trailer
from sysbackup_testkit import ACCOUNT, BUCKET, FakeLambdaContext, build_pack, load_function, put_pack_object


@pytest.fixture
def verify_pack(backend: Services) -> Any:
    return load_function("verify_pack")


def s3_notification(key: str, bucket: str = BUCKET) -> dict[str, Any]:
    return {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "awsRegion": "us-east-1",
                "eventTime": "2026-11-21T23:50:00.000Z",
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "s3SchemaVersion": "1.0",
                    "configurationId": "pack-landed",
                    "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                    "object": {"key": key, "size": 1, "eTag": "0", "sequencer": "0"},
                },
            }
        ]
    }


def sqs_event(*bodies: Any) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"message-{number}",
                "receiptHandle": "handle",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:us-east-1:{ACCOUNT}:PackLandedQueue",
                "awsRegion": "us-east-1",
            }
            for number, body in enumerate(bodies)
        ]
    }


def test_good_pack_is_verified_and_answers_every_hosts_dedup(verify_pack: Any, backend: Services) -> None:
    pack = build_pack([("data", b"good one"), ("tree", b'{"version":1,"entries":[]}')])
    put_pack_object(backend, pack)
    result = verify_pack.lambda_handler(
        sqs_event(s3_notification(f"packs/{pack.pack_id}")), FakeLambdaContext()
    )
    assert result == {"batchItemFailures": []}
    assert backend.index.get_pack(pack.pack_id)["state"] == "verified"
    assert backend.index.stored_for("anyone", [blob_hash(b"good one")]) == {blob_hash(b"good one")}


def test_tampered_pack_is_marked_corrupt_without_retry(verify_pack: Any, backend: Services) -> None:
    pack = build_pack([("data", b"original bytes of a blob")])
    tampered = bytearray(pack.data)
    tampered[pack.entries[0].offset] ^= 0xFF
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{pack.pack_id}", Body=bytes(tampered))
    result = verify_pack.lambda_handler(
        sqs_event(s3_notification(f"packs/{pack.pack_id}")), FakeLambdaContext()
    )
    assert result == {"batchItemFailures": []}
    assert backend.index.get_pack(pack.pack_id)["state"] == "corrupt"
    assert backend.index.stored_for("anyone", [blob_hash(b"original bytes of a blob")]) == set()


def test_pack_whose_trailer_lies_about_a_hash_is_corrupt(verify_pack: Any, backend: Services) -> None:
    # Self-consistent bytes (the key is the pack's real SHA-256) whose trailer names a wrong hash.
    honest = build_pack([("data", b"real content")])
    forged = PackEntry(**{**honest.entries[0].to_json(), "hash": blob_hash(b"what it pretends to be")})
    blob_area = honest.data[: forged.offset + forged.length]
    trailer = encode_trailer([forged])
    lying = blob_area + trailer + struct.pack(">I", len(trailer)) + MAGIC
    pack_id = hashlib.sha256(lying).hexdigest()
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{pack_id}", Body=lying)
    verify_pack.lambda_handler(sqs_event(s3_notification(f"packs/{pack_id}")), FakeLambdaContext())
    assert backend.index.get_pack(pack_id)["state"] == "corrupt"
    assert backend.index.stored_for("anyone", [forged.hash]) == set()


def test_other_keys_and_test_events_are_ignored(verify_pack: Any, backend: Services) -> None:
    event = sqs_event(
        s3_notification("manifests/alpha/x.json"),
        {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": BUCKET},
        s3_notification("packs/not-a-hash"),
        "not json at all",
    )
    assert verify_pack.lambda_handler(event, FakeLambdaContext()) == {"batchItemFailures": []}


def test_repeated_notification_does_not_reread_a_decided_pack(verify_pack: Any, backend: Services) -> None:
    pack = build_pack([("data", b"delivered twice")])
    put_pack_object(backend, pack)
    event = sqs_event(s3_notification(f"packs/{pack.pack_id}"))
    verify_pack.lambda_handler(event, FakeLambdaContext())
    gets: list[str] = []
    backend.store.client.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )
    assert verify_pack.lambda_handler(event, FakeLambdaContext()) == {"batchItemFailures": []}
    assert gets == []


def test_transient_failure_reports_the_message_for_retry(verify_pack: Any, backend: Services) -> None:
    pack = build_pack([("data", b"table gone")])
    put_pack_object(backend, pack)
    backend.index.client.delete_table(TableName=backend.index.table_name)
    event = sqs_event(s3_notification(f"packs/{pack.pack_id}"), s3_notification("other/key"))
    result = verify_pack.lambda_handler(event, FakeLambdaContext())
    # Only the pack's message comes back; the one naming no pack succeeded.
    assert result == {"batchItemFailures": [{"itemIdentifier": "message-0"}]}
