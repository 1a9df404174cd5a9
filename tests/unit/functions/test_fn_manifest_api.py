"""The manifest API handler: commit, poll, list, read; identity and refusals over HTTP events."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.catalogue import SUMMARY_STATS_BYTES, summary_stats
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import (
    FakeLambdaContext,
    dir_entry,
    file_entry,
    http_event,
    load_function,
    response_json,
    restore_arn,
    store_pack,
    tree_bytes,
    user_arn,
)


@pytest.fixture
def manifest_api(backend: Services) -> Any:
    return load_function("manifest_api")


def call(
    module: Any,
    method: str,
    path: str,
    body: Any = None,
    caller: str | None = None,
    remaining_ms: int = 30_000,
    **kwargs: Any,
) -> tuple[int, Any]:
    event = http_event(method, path, body, caller_arn=caller or user_arn("alpha"), **kwargs)
    response = module.lambda_handler(event, FakeLambdaContext(remaining_ms))
    return response["statusCode"], response_json(response)


# The packs stored_root uploaded, by root: what the host lists when it commits that root.
PACKS: dict[str, list[str]] = {}


def commit_body(root: str | None, parent: str | None = None) -> dict[str, Any]:
    return {
        "parent": parent,
        "root": root,
        "snapshots": [],
        "warnings": ["one warning"],
        "stats": {"files": 3},
        "packs": PACKS.get(root or "", []),
    }


def stored_root(backend: Services, host: str = "alpha") -> str:
    content = f"etc/hosts contents of {host}".encode()
    inner = tree_bytes([file_entry("hosts", [blob_hash(content)])])
    root = tree_bytes([dir_entry("etc", blob_hash(inner))])
    packs = [
        store_pack(backend, host, [("data", content)]),
        store_pack(backend, host, [("tree", inner)]),
        store_pack(backend, host, [("tree", root)]),
    ]
    PACKS[blob_hash(root)] = [pack.pack_id for pack in packs]
    return blob_hash(root)


def test_commit_list_and_read_back(manifest_api: Any, backend: Services) -> None:
    root = stored_root(backend)
    status, created = call(manifest_api, "POST", "/manifests", commit_body(root))
    assert status == 201
    manifest_id = created["manifest_id"]
    status, listing = call(manifest_api, "GET", "/manifests")
    assert status == 200
    assert [(m["manifest_id"], m["root"], m["stats"]) for m in listing["manifests"]] == [
        (manifest_id, root, {"files": 3})
    ]
    status, document = call(
        manifest_api, "GET", f"/manifests/{manifest_id}", path_parameters={"manifest_id": manifest_id}
    )
    assert status == 200
    assert (document["id"], document["host"], document["root"]) == (manifest_id, "alpha", root)
    assert document["warnings"] == ["one warning"]


def test_body_host_field_does_not_choose_the_host(manifest_api: Any, backend: Services) -> None:
    root = stored_root(backend, host="beta")
    body = {**commit_body(root), "host": "beta"}
    status, answer = call(manifest_api, "POST", "/manifests", body, caller=user_arn("alpha"))
    assert status == 422  # a field the request format does not know, and alpha does not hold beta's blobs
    assert call(manifest_api, "GET", "/manifests", caller=user_arn("beta"))[1]["manifests"] == []
    assert answer["message"]


def test_a_refusal_names_the_missing_blobs_and_the_refused_packs(
    manifest_api: Any, backend: Services
) -> None:
    root = stored_root(backend, host="beta")
    status, answer = call(manifest_api, "POST", "/manifests", commit_body(root), caller=user_arn("alpha"))
    assert status == 422
    assert answer["missing"] == [root]
    assert answer["packs"] == {pack_id: "not_yours" for pack_id in PACKS[root]}
    assert answer["message"].startswith("the manifest cannot be committed")


def test_wrong_parent_is_409(manifest_api: Any, backend: Services) -> None:
    root = stored_root(backend)
    call(manifest_api, "POST", "/manifests", commit_body(root))
    status, answer = call(manifest_api, "POST", "/manifests", commit_body(root))
    assert status == 409
    assert "parent" in answer["message"]


def test_malformed_bodies_are_4xx(manifest_api: Any) -> None:
    assert call(manifest_api, "POST", "/manifests", raw_body="{oops")[0] == 400
    assert call(manifest_api, "POST", "/manifests", {"root": 5})[0] == 422


def test_slow_commit_is_polled_through_jobs(manifest_api: Any, backend: Services) -> None:
    root = stored_root(backend)
    # A Lambda with almost no time left walks one step per call.
    status, started = call(manifest_api, "POST", "/manifests", commit_body(root), remaining_ms=1000)
    assert status == 202
    job_id = started["job_id"]
    path = f"/jobs/{job_id}"
    for _ in range(10):
        status, polled = call(
            manifest_api, "GET", path, path_parameters={"job_id": job_id}, remaining_ms=1000
        )
        if status != 202:
            break
    assert status == 201
    assert call(manifest_api, "GET", "/manifests")[1]["manifests"][0]["manifest_id"] == polled["manifest_id"]
    other = call(manifest_api, "GET", path, path_parameters={"job_id": job_id}, caller=user_arn("beta"))
    assert other[0] == 404


def test_other_hosts_manifests_need_the_restore_role(manifest_api: Any, backend: Services) -> None:
    root = stored_root(backend)
    _, created = call(manifest_api, "POST", "/manifests", commit_body(root))
    query = {"host": "alpha"}
    assert call(manifest_api, "GET", "/manifests", caller=user_arn("beta"), query=query)[0] == 403
    status, listing = call(manifest_api, "GET", "/manifests", caller=restore_arn(), query=query)
    assert status == 200
    assert [m["manifest_id"] for m in listing["manifests"]] == [created["manifest_id"]]
    manifest_id = created["manifest_id"]
    read = call(
        manifest_api,
        "GET",
        f"/manifests/{manifest_id}",
        caller=user_arn("beta"),
        path_parameters={"manifest_id": manifest_id},
    )
    assert read[0] == 404  # beta's own catalogue has no such manifest


def test_unknown_manifest_is_404(manifest_api: Any) -> None:
    for manifest_id in ("20260101T000000Z-00000000", "not-an-id"):
        status, _ = call(
            manifest_api, "GET", f"/manifests/{manifest_id}", path_parameters={"manifest_id": manifest_id}
        )
        assert status == 404


def test_the_restore_role_cannot_commit(manifest_api: Any) -> None:
    status, answer = call(manifest_api, "POST", "/manifests", commit_body(None), caller=restore_arn())
    assert status == 403
    assert "restore role" in answer["message"]


def commit_chain(manifest_api: Any, root: str, count: int, stats: dict[str, Any] | None = None) -> list[str]:
    ids: list[str] = []
    for _ in range(count):
        body = {**commit_body(root, parent=ids[-1] if ids else None), "stats": stats or {"files": 3}}
        status, created = call(manifest_api, "POST", "/manifests", body)
        assert status == 201, created
        ids.append(created["manifest_id"])
    return ids


def list_pages(manifest_api: Any, limit: int, caller: str | None = None) -> list[dict[str, Any]]:
    pages: list[dict[str, Any]] = []
    query: dict[str, str] = {"limit": str(limit)}
    while True:
        status, page = call(manifest_api, "GET", "/manifests", caller=caller, query=query)
        assert status == 200, page
        pages.append(page)
        if page["next"] is None:
            return pages
        query = {"limit": str(limit), "next": page["next"]}


def test_list_pages_newest_first_and_names_the_head(manifest_api: Any, backend: Services) -> None:
    ids = commit_chain(manifest_api, stored_root(backend), 5)
    pages = list_pages(manifest_api, limit=2)
    listed = [m["manifest_id"] for page in pages for m in page["manifests"]]
    assert listed == sorted(ids, reverse=True)
    assert [len(page["manifests"]) for page in pages] == [2, 2, 1]
    assert {page["head"] for page in pages} == {ids[-1]}
    _, everything = call(manifest_api, "GET", "/manifests")
    assert everything["next"] is None and len(everything["manifests"]) == 5


def test_an_empty_host_lists_nothing_and_has_no_head(manifest_api: Any) -> None:
    status, page = call(manifest_api, "GET", "/manifests", query={"limit": "1"})
    assert (status, page) == (200, {"manifests": [], "next": None, "head": None})


def test_bad_limits_and_tampered_tokens_are_400(manifest_api: Any, backend: Services) -> None:
    commit_chain(manifest_api, stored_root(backend), 2)
    for limit in ("0", "-1", "1001", "ten", "1.5"):
        assert call(manifest_api, "GET", "/manifests", query={"limit": limit})[0] == 400
    _, first = call(manifest_api, "GET", "/manifests", query={"limit": "1"})
    token = first["next"]
    assert token is not None
    forged = base64.urlsafe_b64encode(json.dumps({"host": "alpha", "after": "HEAD"}).encode()).decode()
    for bad in ("!!!", token[:-3], "e30", forged, base64.urlsafe_b64encode(b"\xff\xfe").decode()):
        status, answer = call(manifest_api, "GET", "/manifests", query={"next": bad})
        assert status == 400, (bad, answer)
        assert "next" in answer["message"]


def test_a_token_does_not_page_another_hosts_list(manifest_api: Any, backend: Services) -> None:
    commit_chain(manifest_api, stored_root(backend), 2)
    _, alpha_page = call(manifest_api, "GET", "/manifests", query={"limit": "1"})
    status, answer = call(
        manifest_api, "GET", "/manifests", caller=user_arn("beta"), query={"next": alpha_page["next"]}
    )
    assert status == 400 and "another host" in answer["message"]
    # The restore role reading alpha may follow alpha's token.
    query = {"host": "alpha", "next": alpha_page["next"]}
    status, rest = call(manifest_api, "GET", "/manifests", caller=restore_arn(), query=query)
    assert status == 200 and len(rest["manifests"]) == 1


def test_large_stats_are_capped_in_summaries_only(manifest_api: Any, backend: Services) -> None:
    stats = {"files": 3, "run_id": "run-1", "note": "s" * 60_000, "nested": {"a": 1}}
    [manifest_id] = commit_chain(manifest_api, stored_root(backend), 1, stats=stats)
    _, page = call(manifest_api, "GET", "/manifests")
    assert page["manifests"][0]["stats"] == {"files": 3, "run_id": "run-1", "truncated": True}
    _, document = call(
        manifest_api, "GET", f"/manifests/{manifest_id}", path_parameters={"manifest_id": manifest_id}
    )
    assert document["stats"] == stats


def test_summary_stats_stay_within_the_cap_whatever_the_host_sends() -> None:
    many = {f"figure_{index:05d}": index for index in range(5000)}
    capped = summary_stats(many)
    assert len(json.dumps(capped)) <= SUMMARY_STATS_BYTES
    assert capped["truncated"] is True and capped["figure_00000"] == 0
    small = {"files": 1, "bytes": 2}
    assert summary_stats(small) == small
