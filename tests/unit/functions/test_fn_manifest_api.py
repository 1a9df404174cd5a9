"""The manifest API handler: commit, poll, list, read; identity and refusals over HTTP events."""

from __future__ import annotations

from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import (
    FakeLambdaContext,
    dir_entry,
    file_entry,
    http_event,
    load_function,
    response_json,
    restore_arn,
    store_claimed,
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


def commit_body(root: str | None, parent: str | None = None) -> dict[str, Any]:
    return {
        "parent": parent,
        "root": root,
        "snapshots": [],
        "warnings": ["one warning"],
        "stats": {"files": 3},
    }


def stored_root(backend: Services, host: str = "alpha") -> str:
    content = b"etc/hosts contents"
    inner = tree_bytes([file_entry("hosts", [blob_hash(content)])])
    root = tree_bytes([dir_entry("etc", blob_hash(inner))])
    store_claimed(backend, host, [("data", content)])
    store_claimed(backend, host, [("tree", inner)])
    store_claimed(backend, host, [("tree", root)])
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
    assert call(manifest_api, "GET", "/manifests", caller=user_arn("beta"))[1] == {"manifests": []}
    assert answer["message"]


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
