"""The restore API handler: a host's packs page by page and presigned GETs, own packs only unless the
restore role asks."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from sysbackup_backend.api import Services
from sysbackup_testkit import (
    FakeLambdaContext,
    http_event,
    load_function,
    response_json,
    restore_arn,
    store_pack,
    user_arn,
)


@pytest.fixture
def restore_api(backend: Services) -> Any:
    return load_function("restore_api")


def call(
    module: Any, method: str, path: str, caller: str, body: Any = None, query: dict[str, str] | None = None
) -> tuple[int, Any]:
    event = http_event(method, path, body, caller_arn=caller, query=query)
    response = module.lambda_handler(event, FakeLambdaContext())
    return response["statusCode"], response_json(response)


def list_all(module: Any, caller: str, query: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Every page of `GET /packs`; (packs, pages)."""
    packs: list[dict[str, Any]] = []
    pages = 0
    token: str | None = None
    while True:
        status, body = call(
            module, "GET", "/packs", caller, query={**query, **({"next": token} if token else {})}
        )
        assert status == 200, body
        packs.extend(body["packs"])
        pages += 1
        token = body["next"]
        if token is None:
            return packs, pages


# --- GET /packs ------------------------------------------------------------------------------------------


def test_lists_the_callers_packs_with_size_and_state(restore_api: Any, backend: Services) -> None:
    fresh = store_pack(backend, "alpha", [("data", b"first")])
    checked = store_pack(backend, "alpha", [("data", b"second")], state="verified")
    store_pack(backend, "beta", [("data", b"beta's own")])
    status, body = call(restore_api, "GET", "/packs", user_arn("alpha"))
    assert status == 200
    assert body["next"] is None
    assert sorted(body["packs"], key=lambda pack: pack["pack_id"]) == sorted(
        [
            {"pack_id": fresh.pack_id, "size": len(fresh.data), "state": "presigned"},
            {"pack_id": checked.pack_id, "size": len(checked.data), "state": "verified"},
        ],
        key=lambda pack: pack["pack_id"],
    )


def test_pages_follow_the_next_token_without_repeats(restore_api: Any, backend: Services) -> None:
    stored = {store_pack(backend, "alpha", [("data", f"blob {n}".encode())]).pack_id for n in range(5)}
    packs, pages = list_all(restore_api, user_arn("alpha"), {"limit": "2"})
    assert [pack["pack_id"] for pack in packs] == sorted(stored)
    assert pages >= 3


def test_a_token_is_for_its_own_host_only(restore_api: Any, backend: Services) -> None:
    for n in range(3):
        store_pack(backend, "alpha", [("data", f"alpha {n}".encode())])
    _, first = call(restore_api, "GET", "/packs", user_arn("alpha"), query={"limit": "1"})
    assert first["next"] is not None
    status, body = call(restore_api, "GET", "/packs", user_arn("beta"), query={"next": first["next"]})
    assert status == 400 and "another host" in body["message"]
    for bad in ("%%%", "bm90IGpzb24", first["next"][:-4]):
        assert call(restore_api, "GET", "/packs", user_arn("alpha"), query={"next": bad})[0] == 400


def test_limit_is_checked(restore_api: Any, backend: Services) -> None:
    for limit in ("0", "1001", "ten", "-1"):
        assert call(restore_api, "GET", "/packs", user_arn("alpha"), query={"limit": limit})[0] == 400


def test_restore_role_lists_any_host_and_hosts_only_their_own(restore_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"alpha's file")])
    assert call(restore_api, "GET", "/packs", user_arn("beta"), query={"host": "alpha"})[0] == 403
    status, body = call(restore_api, "GET", "/packs", restore_arn(), query={"host": "alpha"})
    assert status == 200 and [entry["pack_id"] for entry in body["packs"]] == [pack.pack_id]
    assert call(restore_api, "GET", "/packs", restore_arn(), query={"host": "../etc"})[0] == 400


# --- POST /downloads -------------------------------------------------------------------------------------


def test_urls_and_sizes_for_own_packs_and_reasons_for_the_rest(restore_api: Any, backend: Services) -> None:
    own = store_pack(backend, "alpha", [("data", b"first"), ("data", b"second")])
    theirs = store_pack(backend, "beta", [("data", b"beta's secret")])
    unknown = "0" * 64
    status, body = call(
        restore_api,
        "POST",
        "/downloads",
        user_arn("alpha"),
        {"packs": [own.pack_id, theirs.pack_id, unknown]},
    )
    assert status == 200
    assert set(body["urls"]) == {own.pack_id}
    assert body["sizes"] == {own.pack_id: len(own.data)}
    assert body["missing"] == {theirs.pack_id: "not_yours", unknown: "unknown"}
    url = urlparse(body["urls"][own.pack_id])
    assert url.path.endswith(f"/packs/{own.pack_id}")
    assert int(parse_qs(url.query)["X-Amz-Expires"][0]) <= 300


def test_a_host_added_to_a_pack_may_download_it(restore_api: Any, backend: Services) -> None:
    shared = store_pack(backend, "alpha", [("data", b"byte-identical pack")])
    assert backend.registry.add_host(shared.pack_id, "beta")
    _, body = call(restore_api, "POST", "/downloads", user_arn("beta"), {"packs": [shared.pack_id]})
    assert list(body["urls"]) == [shared.pack_id] and body["missing"] == {}


def test_any_state_but_deleting_is_readable(restore_api: Any, backend: Services) -> None:
    corrupt = store_pack(backend, "alpha", [("data", b"salvage what re-hashes")])
    going = store_pack(backend, "alpha", [("data", b"gc is deleting this")])
    assert backend.registry.mark_corrupt(corrupt.pack_id, "blob 0 hashes wrong")
    condemned_at = "2026-11-01T00:00:00Z"
    backend.registry.client.update_item(  # condemned long ago, now being deleted by gc
        TableName=backend.registry.table_name,
        Key={"pk": f"pack#{going.pack_id}", "sk": "pack"},
        UpdateExpression="SET #state = :condemned, condemned_at = :at",
        ExpressionAttributeNames={"#state": "state"},
        ExpressionAttributeValues={":condemned": "condemned", ":at": condemned_at},
    )
    assert backend.registry.start_deleting(going.pack_id, condemned_at)
    _, body = call(
        restore_api, "POST", "/downloads", user_arn("alpha"), {"packs": [corrupt.pack_id, going.pack_id]}
    )
    assert list(body["urls"]) == [corrupt.pack_id]
    assert body["missing"] == {going.pack_id: "deleting"}


def test_download_host_query_is_for_the_restore_role_only(restore_api: Any, backend: Services) -> None:
    pack = store_pack(backend, "alpha", [("data", b"alpha's file")])
    body = {"packs": [pack.pack_id]}
    assert call(restore_api, "POST", "/downloads", user_arn("beta"), body, query={"host": "alpha"})[0] == 403
    status, answer = call(restore_api, "POST", "/downloads", restore_arn(), body, query={"host": "alpha"})
    assert status == 200 and list(answer["urls"]) == [pack.pack_id]
    # The restore role reading as another host gets that host's view, not everything.
    _, as_beta = call(restore_api, "POST", "/downloads", restore_arn(), body, query={"host": "beta"})
    assert as_beta["missing"] == {pack.pack_id: "not_yours"}


def test_bad_download_bodies_are_422(restore_api: Any) -> None:
    for body in ({"packs": []}, {"packs": ["x"]}, {"packs": ["a" * 64] * 201}, {"blobs": ["a" * 64]}):
        assert call(restore_api, "POST", "/downloads", user_arn("alpha"), body)[0] == 422
