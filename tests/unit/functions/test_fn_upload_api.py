"""The upload API handler (POST /packs/presign v2), driven with HTTP API (payload 2.0) events."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.registry import PACK_CONDEMNED, PACK_PRESIGNED, PACK_VERIFIED, PackRecord
from sysbackup_domain.packs import MAX_PACK_BYTES
from sysbackup_testkit import (
    BUCKET,
    BuiltPack,
    FakeLambdaContext,
    S3CallCounter,
    build_pack,
    http_event,
    load_function,
    put_pack_object,
    response_json,
    restore_arn,
    store_pack,
    user_arn,
)

NOW = datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc)


@pytest.fixture
def upload_api(backend: Services) -> Any:
    return load_function("upload_api")


def call(module: Any, path: str, body: Any, host: str | None = "alpha", **kwargs: Any) -> tuple[int, Any]:
    event = http_event("POST", path, body, caller_arn=user_arn(host) if host else None, **kwargs)
    response = module.lambda_handler(event, FakeLambdaContext())
    return response["statusCode"], response_json(response)


def presign(module: Any, packs: list[BuiltPack], host: str = "alpha") -> tuple[int, Any]:
    body = {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)} for pack in packs]}
    return call(module, "/packs/presign", body, host=host)


def uploaded(body: Any) -> list[str]:
    return [upload["pack_id"] for upload in body["uploads"]]


def record(backend: Services, pack: BuiltPack) -> PackRecord:
    found = backend.registry.get(pack.pack_id)
    assert found is not None
    return found


def test_presign_signs_exactly_the_headers_it_returns(upload_api: Any, backend: Services) -> None:
    pack = build_pack([("data", b"to upload")])
    status, body = presign(upload_api, [pack])
    assert status == 200
    assert body["stored"] == []
    (upload,) = body["uploads"]
    assert upload["pack_id"] == pack.pack_id and upload["method"] == "PUT"
    signed = parse_qs(urlparse(upload["url"]).query)["X-Amz-SignedHeaders"][0].split(";")
    assert sorted(name.lower() for name in upload["headers"]) == sorted(set(signed) - {"host"})
    headers = {name.lower(): value for name, value in upload["headers"].items()}
    assert headers["if-none-match"] == "*"
    assert headers["content-length"] == str(len(pack.data))
    assert headers["x-amz-object-lock-mode"] == "GOVERNANCE"
    assert urlparse(upload["url"]).path.endswith(f"/packs/{pack.pack_id}")
    created = record(backend, pack)
    assert (created.state, created.host, created.hosts, created.size) == (
        PACK_PRESIGNED,
        "alpha",
        {"alpha"},
        len(pack.data),
    )


def test_a_new_pack_needs_no_head(upload_api: Any, backend: Services) -> None:
    heads = S3CallCounter(backend.store.client, "HeadObject")
    packs = [build_pack([("data", f"new {number}".encode())]) for number in range(3)]
    status, body = presign(upload_api, packs)
    assert (status, sorted(uploaded(body))) == (200, sorted(pack.pack_id for pack in packs))
    assert heads.count == 0


def test_own_pack_that_landed_is_stored_and_one_that_did_not_gets_a_fresh_url(
    upload_api: Any, backend: Services
) -> None:
    landed = store_pack(backend, "alpha", [("data", b"put before a crash")])
    never_put = build_pack([("data", b"presigned, never put")])
    assert presign(upload_api, [never_put])[0] == 200
    status, body = presign(upload_api, [landed, never_put])
    assert status == 200
    assert (body["stored"], uploaded(body)) == ([landed.pack_id], [never_put.pack_id])


def test_own_verified_pack_is_stored_without_a_head(upload_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"verified already")], state="verified")
    heads = S3CallCounter(backend.store.client, "HeadObject")
    assert presign(upload_api, [pack]) == (200, {"uploads": [], "stored": [pack.pack_id]})
    assert heads.count == 0


def test_an_impostor_object_does_not_count_as_the_pack(upload_api: Any, backend: Services) -> None:
    promised = build_pack([("data", b"promised bytes")])
    presign(upload_api, [promised])
    impostor = build_pack([("data", b"other bytes, same length")])
    backend.store.client.put_object(Bucket=BUCKET, Key=f"packs/{promised.pack_id}", Body=impostor.data)
    status, body = presign(upload_api, [promised])
    assert (status, body["stored"], uploaded(body)) == (200, [], [promised.pack_id])


def test_another_hosts_uploaded_pack_is_stored_for_the_caller_too(upload_api: Any, backend: Services) -> None:
    """Byte-identical packs: the object is what beta holds (the id is its SHA-256), so beta uses it."""
    pack = store_pack(backend, "alpha", [("data", b"both hosts have this")])
    assert presign(upload_api, [pack], host="beta") == (200, {"uploads": [], "stored": [pack.pack_id]})
    shared = record(backend, pack)
    assert shared.hosts == {"alpha", "beta"} and shared.usable_by("beta")
    assert shared.host == "alpha"
    # beta's GET /packs lists it: a beta that lost its cache rebuilds its index with it.
    assert [record.pack_id for record in backend.registry.list_host("beta", 10)[0]] == [pack.pack_id]


def test_another_hosts_pack_not_uploaded_yet_gets_the_caller_a_url(
    upload_api: Any, backend: Services
) -> None:
    pack = build_pack([("data", b"alpha presigned, nobody put")])
    presign(upload_api, [pack], host="alpha")
    status, body = presign(upload_api, [pack], host="beta")
    assert (status, body["stored"], uploaded(body)) == (200, [], [pack.pack_id])
    assert record(backend, pack).hosts == {"alpha", "beta"}


def test_a_condemned_pack_is_revived(upload_api: Any, backend: Services) -> None:
    verified = store_pack(backend, "alpha", [("data", b"condemned, then needed")], state="verified")
    not_put = build_pack([("data", b"condemned orphan, never put")])
    presign(upload_api, [not_put])
    for pack in (verified, not_put):
        assert backend.registry.condemn(pack.pack_id, NOW)
    status, body = presign(upload_api, [verified, not_put])
    assert (status, body["stored"], uploaded(body)) == (200, [verified.pack_id], [not_put.pack_id])
    assert (record(backend, verified).state, record(backend, not_put).state) == (
        PACK_VERIFIED,
        PACK_PRESIGNED,
    )
    assert record(backend, verified).condemned_at is None


def test_a_pack_gc_is_deleting_is_a_conflict_naming_it(upload_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"being collected")])
    fine = build_pack([("data", b"a new one in the same call")])
    backend.registry.condemn(pack.pack_id, NOW)
    assert backend.registry.start_deleting(pack.pack_id, record(backend, pack).condemned_at or "")
    status, body = presign(upload_api, [fine, pack], host="beta")
    assert (status, body["collecting"]) == (409, [pack.pack_id])
    assert body["message"]
    assert record(backend, pack).hosts == {"alpha"}  # nothing written for a refused call
    assert backend.registry.get(fine.pack_id) is None


def test_a_corrupt_pack_is_refused(upload_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"found corrupt")])
    backend.registry.mark_corrupt(pack.pack_id, "blob 0 does not hash to its name")
    status, body = presign(upload_api, [pack])
    assert (status, body["corrupt"]) == (422, [pack.pack_id])


def test_a_size_unlike_the_recorded_one_is_refused(upload_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"sized once")])
    body = {"packs": [{"sha256": pack.pack_id, "size": len(pack.data) + 1}]}
    status, answer = call(upload_api, "/packs/presign", body)
    assert (status, answer["wrong_size"]) == (422, [pack.pack_id])


def test_a_presign_of_a_pack_locked_longer_asks_for_at_least_that_lock(
    upload_api: Any, backend: Services
) -> None:
    pack = build_pack([("data", b"its lock was extended")])
    presign(upload_api, [pack])
    assert backend.registry.raise_retain_until(pack.pack_id, "2099-01-01T00:00:00Z")
    (upload,) = presign(upload_api, [pack])[1]["uploads"]
    headers = {name.lower(): value for name, value in upload["headers"].items()}
    assert headers["x-amz-object-lock-retain-until-date"].startswith("2099-01-01T00:00:00")


@pytest.mark.parametrize(
    "pack",
    [
        {"sha256": "a" * 64, "size": MAX_PACK_BYTES + 1},
        {"sha256": "a" * 64, "size": 0},
        {"sha256": "a" * 64, "size": 12},
        {"sha256": "A" * 64, "size": 100},
        {"sha256": "a" * 63, "size": 100},
    ],
)
def test_presign_refuses_bad_packs(upload_api: Any, pack: dict[str, Any]) -> None:
    status, answer = call(upload_api, "/packs/presign", {"packs": [pack]})
    assert status == 422 and answer["message"].startswith("invalid request")


@pytest.mark.parametrize("body", [{"packs": []}, {"packs": [{"sha256": "a" * 64, "size": 100}] * 101}, {}])
def test_presign_body_limits(upload_api: Any, body: Any) -> None:
    status, answer = call(upload_api, "/packs/presign", body)
    assert status == 422 and answer["message"].startswith("invalid request")


def test_body_that_is_not_json_is_a_client_error(upload_api: Any) -> None:
    status, answer = call(upload_api, "/packs/presign", None, raw_body="{not json")
    assert 400 <= status < 500
    assert answer["message"]


def test_request_without_iam_caller_is_forbidden(upload_api: Any) -> None:
    status, body = call(upload_api, "/packs/presign", {"packs": [{"sha256": "a" * 64, "size": 100}]}, None)
    assert status == 403
    assert "caller" in body["message"]


def test_the_restore_role_cannot_upload(upload_api: Any, backend: Services) -> None:
    body = {"packs": [{"sha256": "a" * 64, "size": 100}]}
    event = http_event("POST", "/packs/presign", body, caller_arn=restore_arn())
    assert upload_api.lambda_handler(event, FakeLambdaContext())["statusCode"] == 403
    assert backend.registry.get("a" * 64) is None


@pytest.mark.parametrize("path", ["/blobs/check", "/packs/register", "/packs/adopt"])
def test_the_v1_routes_are_gone(upload_api: Any, path: str) -> None:
    status, _ = call(upload_api, path, {"packs": []})
    assert status == 404


def test_a_pack_uploaded_through_its_url_is_stored_on_the_next_presign(
    upload_api: Any, backend: Services
) -> None:
    pack = build_pack([("data", b"the normal path")])
    assert uploaded(presign(upload_api, [pack])[1]) == [pack.pack_id]
    put_pack_object(backend, pack)
    assert presign(upload_api, [pack])[1] == {"uploads": [], "stored": [pack.pack_id]}
    assert record(backend, pack).state == PACK_PRESIGNED  # verification is the commit's or the verifier's


def test_condemned_state_is_left_alone_by_a_refused_call(upload_api: Any, backend: Services) -> None:
    """A corrupt pack in the call refuses it before anything is revived."""
    condemned = store_pack(backend, "alpha", [("data", b"condemned bystander")])
    corrupt = store_pack(backend, "alpha", [("data", b"corrupt one")])
    backend.registry.condemn(condemned.pack_id, NOW)
    backend.registry.mark_corrupt(corrupt.pack_id, "bad")
    assert presign(upload_api, [condemned, corrupt])[0] == 422
    assert record(backend, condemned).state == PACK_CONDEMNED
