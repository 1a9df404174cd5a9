"""The restore API handler: locations and presigned GETs, own blobs only unless the restore role asks."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from sysbackup_backend.api import Services
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import (
    FakeLambdaContext,
    http_event,
    load_function,
    response_json,
    restore_arn,
    store_claimed,
    store_verified,
    user_arn,
)


@pytest.fixture
def restore_api(backend: Services) -> Any:
    return load_function("restore_api")


def call(module: Any, body: Any, caller: str, query: dict[str, str] | None = None) -> tuple[int, Any]:
    event = http_event("POST", "/downloads", body, caller_arn=caller, query=query)
    response = module.lambda_handler(event, FakeLambdaContext())
    return response["statusCode"], response_json(response)


def test_locations_and_one_url_per_pack(restore_api: Any, backend: Services) -> None:
    pack = store_claimed(backend, "alpha", [("data", b"first"), ("data", b"second")])
    verified = store_verified(backend, [("data", b"everyone's")])
    wanted = [blob_hash(b"first"), blob_hash(b"second"), blob_hash(b"everyone's"), blob_hash(b"absent")]
    status, body = call(restore_api, {"blobs": wanted}, user_arn("alpha"))
    assert status == 200
    assert body["missing"] == [blob_hash(b"absent")]
    first = body["locations"][blob_hash(b"first")]
    expected = next(entry for entry in pack.entries if entry.hash == blob_hash(b"first"))
    assert (first["pack_id"], first["offset"], first["length"]) == (
        pack.pack_id,
        expected.offset,
        expected.length,
    )
    assert set(body["urls"]) == {pack.pack_id, verified.pack_id}
    url = body["urls"][pack.pack_id]
    assert urlparse(url).path.endswith(f"/packs/{pack.pack_id}")
    assert int(parse_qs(urlparse(url).query)["X-Amz-Expires"][0]) <= 300


def test_another_hosts_claims_are_not_located(restore_api: Any, backend: Services) -> None:
    store_claimed(backend, "alpha", [("data", b"alpha's secret")])
    status, body = call(restore_api, {"blobs": [blob_hash(b"alpha's secret")]}, user_arn("beta"))
    assert (status, body["locations"], body["urls"]) == (200, {}, {})


def test_host_query_is_for_the_restore_role_only(restore_api: Any, backend: Services) -> None:
    store_claimed(backend, "alpha", [("data", b"alpha's file")])
    body = {"blobs": [blob_hash(b"alpha's file")]}
    assert call(restore_api, body, user_arn("beta"), query={"host": "alpha"})[0] == 403
    status, answer = call(restore_api, body, restore_arn(), query={"host": "alpha"})
    assert status == 200
    assert list(answer["locations"]) == [blob_hash(b"alpha's file")]
    assert call(restore_api, body, restore_arn(), query={"host": "../etc"})[0] == 400


def test_bad_bodies_are_422(restore_api: Any) -> None:
    for body in ({"blobs": []}, {"blobs": ["x"]}, {"blobs": ["a" * 64] * 1001}):
        assert call(restore_api, body, user_arn("alpha"))[0] == 422
