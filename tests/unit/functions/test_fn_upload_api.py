"""The upload API handler, driven with HTTP API (payload 2.0) events as API Gateway sends them."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from sysbackup_backend.api import Services
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import MAX_PACK_BYTES
from sysbackup_testkit import (
    BUCKET,
    FakeLambdaContext,
    build_pack,
    http_event,
    load_function,
    put_pack_object,
    response_json,
    restore_arn,
    store_claimed,
    user_arn,
)


@pytest.fixture
def upload_api(backend: Services) -> Any:
    return load_function("upload_api")


def call(module: Any, path: str, body: Any, host: str | None = "alpha", **kwargs: Any) -> tuple[int, Any]:
    event = http_event("POST", path, body, caller_arn=user_arn(host) if host else None, **kwargs)
    response = module.lambda_handler(event, FakeLambdaContext())
    return response["statusCode"], response_json(response)


def test_check_answers_from_the_callers_identity_not_the_body(upload_api: Any, backend: Services) -> None:
    store_claimed(backend, "alpha", [("data", b"alpha only")])
    blob = blob_hash(b"alpha only")
    assert call(upload_api, "/blobs/check", {"hashes": [blob]}, host="alpha") == (200, {"stored": [blob]})
    status, body = call(upload_api, "/blobs/check", {"hashes": [blob], "host": "alpha"}, host="beta")
    assert (status, body) == (200, {"stored": []})


def test_request_without_iam_caller_is_forbidden(upload_api: Any) -> None:
    status, body = call(upload_api, "/blobs/check", {"hashes": []}, host=None)
    assert status == 403
    assert "caller" in body["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"hashes": ["a" * 64] * 1001},
        {"hashes": ["NOT-A-HASH"]},
        {"hashes": "a" * 64},
        {},
    ],
)
def test_bad_check_bodies_are_refused_with_a_message(upload_api: Any, body: Any) -> None:
    status, answer = call(upload_api, "/blobs/check", body)
    assert status == 422
    assert answer["message"].startswith("invalid request")


def test_body_that_is_not_json_is_a_client_error(upload_api: Any) -> None:
    status, answer = call(upload_api, "/blobs/check", None, raw_body="{not json")
    assert 400 <= status < 500
    assert answer["message"]


def test_presign_signs_exactly_the_headers_it_returns(upload_api: Any, backend: Services) -> None:
    pack = build_pack([("data", b"to upload")])
    status, body = call(
        upload_api, "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    )
    assert status == 200
    assert body["registered"] == []
    (upload,) = body["uploads"]
    assert upload["pack_id"] == pack.pack_id and upload["method"] == "PUT"
    signed = parse_qs(urlparse(upload["url"]).query)["X-Amz-SignedHeaders"][0].split(";")
    assert sorted(name.lower() for name in upload["headers"]) == sorted(set(signed) - {"host"})
    headers = {name.lower(): value for name, value in upload["headers"].items()}
    assert headers["if-none-match"] == "*"
    assert headers["content-length"] == str(len(pack.data))
    assert headers["x-amz-object-lock-mode"] == "GOVERNANCE"
    assert urlparse(upload["url"]).path.endswith(f"/packs/{pack.pack_id}")
    assert backend.index.get_pack(pack.pack_id)["state"] == "presigned"


def test_presign_reports_registered_packs_instead_of_a_url(upload_api: Any, backend: Services) -> None:
    pack = store_claimed(backend, "alpha", [("data", b"already here")])
    status, body = call(
        upload_api, "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    )
    assert (status, body["uploads"], body["registered"]) == (200, [], [pack.pack_id])


def test_another_hosts_unverified_pack_is_presigned_so_the_caller_can_claim_it(
    upload_api: Any, backend: Services
) -> None:
    """Identical packs from two hosts before the verifier ran: beta must register its own claim,
    or its commit would name blobs that are stored only for alpha."""
    pack = store_claimed(backend, "alpha", [("data", b"both hosts have this")])
    request = {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}

    status, body = call(upload_api, "/packs/presign", request, host="beta")
    assert (status, [u["pack_id"] for u in body["uploads"]], body["registered"]) == (200, [pack.pack_id], [])

    register = {"packs": [{"pack_id": pack.pack_id, "blobs": [entry.to_json() for entry in pack.entries]}]}
    assert call(upload_api, "/packs/register", register, host="beta") == (200, {"registered": [pack.pack_id]})
    blob = blob_hash(b"both hosts have this")
    assert call(upload_api, "/blobs/check", {"hashes": [blob]}, host="beta")[1]["stored"] == [blob]
    assert call(upload_api, "/packs/presign", request, host="beta")[1]["registered"] == [pack.pack_id]


@pytest.mark.parametrize(
    "pack",
    [
        {"sha256": "a" * 64, "size": MAX_PACK_BYTES + 1},
        {"sha256": "a" * 64, "size": 0},
        {"sha256": "A" * 64, "size": 100},
        {"sha256": "a" * 63, "size": 100},
    ],
)
def test_presign_refuses_bad_packs(upload_api: Any, pack: dict[str, Any]) -> None:
    status, _ = call(upload_api, "/packs/presign", {"packs": [pack]})
    assert status == 422


def _presign_and_upload(upload_api: Any, backend: Services, blobs: list[tuple[str, bytes]]) -> Any:
    pack = build_pack(blobs)
    status, _ = call(
        upload_api, "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    )
    assert status == 200
    put_pack_object(backend, pack)
    return pack


def test_register_indexes_the_pack_as_the_callers_claim(upload_api: Any, backend: Services) -> None:
    pack = _presign_and_upload(upload_api, backend, [("data", b"one"), ("data", b"two")])
    body = {"packs": [{"pack_id": pack.pack_id, "blobs": [entry.to_json() for entry in pack.entries]}]}
    assert call(upload_api, "/packs/register", body) == (200, {"registered": [pack.pack_id]})
    hashes = [blob_hash(b"one"), blob_hash(b"two")]
    assert call(upload_api, "/blobs/check", {"hashes": hashes})[1]["stored"] == sorted(hashes)
    assert call(upload_api, "/blobs/check", {"hashes": hashes}, host="beta")[1]["stored"] == []
    assert backend.index.get_pack(pack.pack_id)["state"] == "registered"


def test_register_of_a_pack_not_uploaded_is_a_conflict(upload_api: Any) -> None:
    pack = build_pack([("data", b"never sent")])
    call(upload_api, "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]})
    body = {"packs": [{"pack_id": pack.pack_id, "blobs": [entry.to_json() for entry in pack.entries]}]}
    status, answer = call(upload_api, "/packs/register", body)
    assert status == 409
    assert "not been uploaded" in answer["message"]


def test_register_of_an_object_that_does_not_match_the_pack_id_is_refused(
    upload_api: Any, backend: Services
) -> None:
    pack = build_pack([("data", b"promised")])
    call(upload_api, "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]})
    impostor = build_pack([("data", b"delivered instead")])
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{pack.pack_id}", Body=impostor.data)
    body = {"packs": [{"pack_id": pack.pack_id, "blobs": [entry.to_json() for entry in pack.entries]}]}
    status, _ = call(upload_api, "/packs/register", body)
    assert status == 422
    assert call(upload_api, "/blobs/check", {"hashes": [blob_hash(b"promised")]})[1]["stored"] == []


@pytest.mark.parametrize(
    "mangle",
    [
        lambda entry: {**entry, "offset": 10**9},
        lambda entry: {**entry, "codec": "lzma"},
        lambda entry: {**entry, "hash": "xyz"},
        lambda entry: {key: value for key, value in entry.items() if key != "length"},
    ],
)
def test_register_refuses_malformed_entries_and_indexes_nothing(
    upload_api: Any, backend: Services, mangle: Any
) -> None:
    pack = _presign_and_upload(upload_api, backend, [("data", b"entry check")])
    blobs = [mangle(entry.to_json()) for entry in pack.entries]
    status, answer = call(
        upload_api, "/packs/register", {"packs": [{"pack_id": pack.pack_id, "blobs": blobs}]}
    )
    assert status == 422, answer
    assert call(upload_api, "/blobs/check", {"hashes": [blob_hash(b"entry check")]})[1]["stored"] == []


def test_register_body_limits(upload_api: Any) -> None:
    too_many_packs = {"packs": [{"pack_id": "a" * 64, "blobs": [{}]}] * 101}
    too_many_blobs = {"packs": [{"pack_id": "a" * 64, "blobs": [{}] * 20_001}]}
    for body in (too_many_packs, too_many_blobs, {"packs": "nope"}):
        status, answer = call(upload_api, "/packs/register", body)
        assert status == 422
        assert json.dumps(answer).count("message") == 1


def test_the_restore_role_cannot_upload(upload_api: Any) -> None:
    event = http_event("POST", "/blobs/check", {"hashes": []}, caller_arn=restore_arn())
    assert upload_api.lambda_handler(event, FakeLambdaContext())["statusCode"] == 403


# --- POST /packs/adopt: packs a crashed run PUT but never registered ------------------------------------


def test_adopt_registers_a_put_pack_from_its_own_trailer(upload_api: Any, backend: Services) -> None:
    pack = _presign_and_upload(upload_api, backend, [("data", b"put before the crash"), ("tree", b"{}")])
    hashes = sorted(entry.hash for entry in pack.entries)
    assert call(upload_api, "/blobs/check", {"hashes": hashes})[1]["stored"] == []

    status, body = call(upload_api, "/packs/adopt", {"packs": [pack.pack_id]})

    assert (status, body) == (200, {"adopted": [pack.pack_id], "registered": [], "skipped": {}})
    assert call(upload_api, "/blobs/check", {"hashes": hashes})[1]["stored"] == hashes
    assert call(upload_api, "/blobs/check", {"hashes": hashes}, host="beta")[1]["stored"] == []
    item = backend.index.get_pack(pack.pack_id)
    assert item["state"] == "registered" and item["hosts"] == {"alpha"}
    assert item["blob_count"] == 2
    location = backend.index.locate("alpha", [blob_hash(b"put before the crash")])
    assert (
        location[blob_hash(b"put before the crash")].entry(blob_hash(b"put before the crash")) in pack.entries
    )
    # Adopting again changes nothing and says the pack is already the caller's.
    assert call(upload_api, "/packs/adopt", {"packs": [pack.pack_id]})[1]["registered"] == [pack.pack_id]


def test_adopt_skips_what_it_must_not_register(upload_api: Any, backend: Services) -> None:
    not_uploaded = build_pack([("data", b"presigned, never PUT")])
    call(
        upload_api,
        "/packs/presign",
        {"packs": [{"sha256": not_uploaded.pack_id, "size": len(not_uploaded.data)}]},
    )
    never_presigned = build_pack([("data", b"PUT without a presign")])
    put_pack_object(backend, never_presigned)
    betas = build_pack([("data", b"beta's crashed pack")])
    call(
        upload_api,
        "/packs/presign",
        {"packs": [{"sha256": betas.pack_id, "size": len(betas.data)}]},
        host="beta",
    )
    put_pack_object(backend, betas)
    promised = build_pack([("data", b"promised bytes")])
    call(upload_api, "/packs/presign", {"packs": [{"sha256": promised.pack_id, "size": len(promised.data)}]})
    impostor = build_pack([("data", b"other bytes")])
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{promised.pack_id}", Body=impostor.data)
    ids = [not_uploaded.pack_id, never_presigned.pack_id, betas.pack_id, promised.pack_id]

    status, body = call(upload_api, "/packs/adopt", {"packs": ids})

    assert status == 200 and body["adopted"] == [] and body["registered"] == []
    assert body["skipped"] == {
        not_uploaded.pack_id: "not uploaded",
        never_presigned.pack_id: "never presigned",
        betas.pack_id: "presigned by another host",
        promised.pack_id: "the object does not match its presigned size and SHA-256",
    }
    every_blob = [
        entry.hash for pack in (not_uploaded, never_presigned, betas, promised) for entry in pack.entries
    ]
    assert call(upload_api, "/blobs/check", {"hashes": every_blob})[1]["stored"] == []
    assert backend.index.get_pack(betas.pack_id)["state"] == "presigned"


def test_adopt_skips_a_pack_whose_trailer_is_invalid(upload_api: Any, backend: Services) -> None:
    # A matching checksum but bytes that are not a pack: the presign pinned this size and SHA-256.
    garbage = b"not a pack at all, no trailer here" * 10
    pack_id = hashlib.sha256(garbage).hexdigest()
    call(upload_api, "/packs/presign", {"packs": [{"sha256": pack_id, "size": len(garbage)}]})
    backend.store.client.put_object(
        Bucket=BUCKET,
        Key=f"packs/{pack_id}",
        Body=garbage,
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=base64.b64encode(bytes.fromhex(pack_id)).decode(),
    )
    status, body = call(upload_api, "/packs/adopt", {"packs": [pack_id]})
    assert status == 200 and body["adopted"] == []
    assert body["skipped"][pack_id].startswith("invalid trailer: not a pack")
    assert backend.index.get_pack(pack_id)["state"] == "presigned"


def test_adopt_body_limits_and_the_restore_role(upload_api: Any) -> None:
    for body in ({"packs": []}, {"packs": ["a" * 64] * 26}, {"packs": ["NOT-A-HASH"]}, {}):
        status, answer = call(upload_api, "/packs/adopt", body)
        assert status == 422 and answer["message"].startswith("invalid request"), body
    event = http_event("POST", "/packs/adopt", {"packs": ["a" * 64]}, caller_arn=restore_arn())
    assert upload_api.lambda_handler(event, FakeLambdaContext())["statusCode"] == 403


def test_adopt_skips_a_pack_presigned_too_long_ago(upload_api: Any, backend: Services) -> None:
    # gc may delete a never-registered pack after its grace period: adoption stays well inside it.
    pack = _presign_and_upload(upload_api, backend, [("data", b"crashed a week ago")])
    backend.index.client.update_item(
        TableName=backend.index.table_name,
        Key={"pk": f"pack#{pack.pack_id}", "sk": "pack"},
        UpdateExpression="SET created_at = :old",
        ExpressionAttributeValues={":old": "2020-01-01T00:00:00Z"},
    )
    status, body = call(upload_api, "/packs/adopt", {"packs": [pack.pack_id]})
    assert status == 200 and body["adopted"] == []
    assert "too long ago" in body["skipped"][pack.pack_id]
