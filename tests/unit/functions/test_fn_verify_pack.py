"""The pack verifier: SQS batches of `{"packs", "source"}`; presigned packs re-hashed and recorded verified
or corrupt, anything else left alone."""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime, timezone
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import MAGIC, PackEntry, encode_trailer
from sysbackup_testkit import ACCOUNT, BUCKET, TEST_RETAIN_UNTIL, FakeLambdaContext, load_function, store_pack


@pytest.fixture
def verifier(backend: Services) -> Any:
    return load_function("verify_pack")


def sqs_event(*bodies: Any) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": f"message-{number}",
                "receiptHandle": "handle",
                "body": body if isinstance(body, str) else json.dumps(body),
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1763769000000",
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": "1763769000001",
                },
                "messageAttributes": {},
                "md5OfBody": "0" * 32,
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:us-east-1:{ACCOUNT}:VerifyQueue",
                "awsRegion": "us-east-1",
            }
            for number, body in enumerate(bodies)
        ]
    }


def message(*pack_ids: str) -> dict[str, Any]:
    return {"packs": list(pack_ids), "source": "20261122T021500Z-abcdef01"}


def run(verifier: Any, *bodies: Any) -> list[str]:
    """The ids of the messages SQS must deliver again."""
    result = verifier.lambda_handler(sqs_event(*bodies), FakeLambdaContext())
    return [failure["itemIdentifier"] for failure in result["batchItemFailures"]]


def state_of(backend: Services, pack_id: str) -> str | None:
    record = backend.registry.get(pack_id)
    return record.state if record else None


def put_raw_pack(backend: Services, data: bytes, host: str = "alpha") -> str:
    """A presigned pack of arbitrary bytes, stored under their SHA-256 (what a lying host can upload)."""
    pack_id = hashlib.sha256(data).hexdigest()
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{pack_id}", Body=data)
    backend.registry.record_presigned(pack_id, host, len(data), TEST_RETAIN_UNTIL)
    return pack_id


def test_presigned_packs_are_verified_with_their_blob_count(verifier: Any, backend: Services) -> None:
    first = store_pack(backend, "alpha", [("data", b"good one"), ("tree", b'{"version":1,"entries":[]}')])
    second = store_pack(backend, "beta", [("data", b"another good one")])
    assert run(verifier, message(first.pack_id, second.pack_id)) == []
    for pack in (first, second):
        record = backend.registry.get(pack.pack_id)
        assert record is not None
        assert (record.state, record.blob_count) == ("verified", len(pack.entries))
        assert record.verified_at is not None


def test_a_pack_altered_after_its_trailer_was_written_is_corrupt(verifier: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"original bytes of a blob")])
    tampered = bytearray(pack.data)
    tampered[pack.entries[0].offset] ^= 0xFF
    pack_id = put_raw_pack(backend, bytes(tampered))
    assert run(verifier, message(pack_id)) == []
    record = backend.registry.get(pack_id)
    assert record is not None and record.state == "corrupt" and record.corrupt_reason


def test_a_pack_whose_trailer_lies_about_a_hash_is_corrupt(verifier: Any, backend: Services) -> None:
    # Self-consistent bytes (the key is the pack's real SHA-256) whose trailer names a wrong hash.
    honest = store_pack(backend, "alpha", [("data", b"real content")])
    forged = PackEntry(**{**honest.entries[0].to_json(), "hash": blob_hash(b"what it pretends to be")})
    trailer = encode_trailer([forged])
    lying = honest.data[: forged.offset + forged.length] + trailer + struct.pack(">I", len(trailer)) + MAGIC
    pack_id = put_raw_pack(backend, lying)
    run(verifier, message(pack_id))
    assert state_of(backend, pack_id) == "corrupt"


def test_bytes_stored_under_another_packs_id_are_corrupt(verifier: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"the real pack")])
    impostor = store_pack(backend, "alpha", [("data", b"a valid pack, but another one")])
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{pack.pack_id}", Body=impostor.data)
    run(verifier, message(pack.pack_id))
    record = backend.registry.get(pack.pack_id)
    assert record is not None and record.state == "corrupt"
    assert "hash to its key" in (record.corrupt_reason or "")


def test_packs_not_presigned_are_not_read(verifier: Any, backend: Services) -> None:
    verified = store_pack(backend, "alpha", [("data", b"verified inline")], state="verified")
    corrupt = store_pack(backend, "alpha", [("data", b"already corrupt")])
    assert backend.registry.mark_corrupt(corrupt.pack_id, "found by the commit")
    unregistered = "f" * 64
    gets: list[str] = []
    backend.store.client.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )
    assert run(verifier, message(verified.pack_id, corrupt.pack_id, unregistered)) == []
    assert gets == []
    assert (state_of(backend, verified.pack_id), state_of(backend, corrupt.pack_id)) == (
        "verified",
        "corrupt",
    )
    assert state_of(backend, unregistered) is None


def test_a_presigned_pack_missing_from_the_bucket_stays_presigned(verifier: Any, backend: Services) -> None:
    backend.registry.record_presigned("e" * 64, "alpha", 1000, TEST_RETAIN_UNTIL)
    assert run(verifier, message("e" * 64)) == []
    assert state_of(backend, "e" * 64) == "presigned"


def test_malformed_messages_fail_alone_for_redelivery(verifier: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"verified despite its neighbours")])
    failed = run(
        verifier,
        "not json at all",
        {"packs": ["not-a-hash"], "source": "x"},
        {"packs": [], "source": "x"},
        {"packs": [pack.pack_id]},
        message(pack.pack_id),
    )
    assert failed == ["message-0", "message-1", "message-2", "message-3"]
    assert state_of(backend, pack.pack_id) == "verified"


def test_a_transient_failure_fails_only_its_message(verifier: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"bucket unreachable")])
    other = store_pack(backend, "alpha", [("data", b"fine")])
    failing_key = f"packs/{pack.pack_id}"

    def refuse(params: dict[str, Any], **_: Any) -> None:
        if params["Key"] == failing_key:
            raise ConnectionError("S3 unreachable")

    backend.store.client.meta.events.register("provide-client-params.s3.GetObject", refuse)
    assert run(verifier, message(pack.pack_id), message(other.pack_id)) == ["message-0"]
    assert (state_of(backend, pack.pack_id), state_of(backend, other.pack_id)) == ("presigned", "verified")


def test_a_pack_gc_condemns_while_it_is_read_stays_condemned(verifier: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"dead by the time it is checked")])

    def condemn_during_read(**_: Any) -> None:
        backend.registry.condemn(pack.pack_id, datetime.now(timezone.utc))

    backend.store.client.meta.events.register("before-call.s3.GetObject", condemn_during_read)
    assert run(verifier, message(pack.pack_id)) == []
    assert state_of(backend, pack.pack_id) == "condemned"


def test_packs_of_one_message_are_verified_in_order_up_to_a_failure(verifier: Any, backend: Services) -> None:
    # The next pack is read while one is re-hashed; a read failure still fails the message (redelivered,
    # and the packs already verified are skipped then), and no pack after it is recorded.
    packs = [store_pack(backend, "alpha", [("data", b"pack %d" % number)]) for number in range(5)]
    other = message(store_pack(backend, "alpha", [("data", b"another message")]).pack_id)  # a batch that
    # fails whole is an exception, not a partial response
    failing_key = f"packs/{packs[3].pack_id}"
    gets: list[str] = []

    def refuse(params: dict[str, Any], **_: Any) -> None:
        gets.append(params["Key"])
        if params["Key"] == failing_key:
            raise ConnectionError("S3 unreachable")

    backend.store.client.meta.events.register("provide-client-params.s3.GetObject", refuse)
    assert run(verifier, message(*(pack.pack_id for pack in packs)), other) == ["message-0"]
    assert [state_of(backend, pack.pack_id) for pack in packs] == [
        "verified",
        "verified",
        "verified",
        "presigned",
        "presigned",
    ]
    assert gets[:4] == [f"packs/{pack.pack_id}" for pack in packs[:4]]
    assert run(verifier, message(*(pack.pack_id for pack in packs)), other) == ["message-0"]  # still failing
    backend.store.client.meta.events.unregister("provide-client-params.s3.GetObject", refuse)
    assert run(verifier, message(*(pack.pack_id for pack in packs))) == []
    assert {state_of(backend, pack.pack_id) for pack in packs} == {"verified"}
