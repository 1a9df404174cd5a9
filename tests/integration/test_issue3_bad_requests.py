"""Issue 3: bad requests over HTTP, as a host, each get a clear 4xx and change nothing.

"Nothing" is checked where a refused request could leave a trace: the host's manifest list, its HEAD
item, the manifest documents in the bucket and the pack registry (one item per pack, docs/PACK_INDEX.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from s3_sysbackup.api import ApiClient, ApiError
from sysbackup_local.stack import LocalHost, LocalStack
from test_api_identity import as_host, send, signed
from test_issue3_support import (
    api_client,
    archive,
    head_of,
    object_versions,
    pack_registry,
    pick,
    quiet_directory,
)

GATEWAY_BODY_LIMIT = 10 * 1024 * 1024


def unknown_hash(label: str) -> str:
    return hashlib.sha256(f"never stored: {label} {os.urandom(8).hex()}".encode()).hexdigest()


@pytest.fixture
def committed(host_config: LocalHost, tmp_path: Path) -> Iterator[LocalHost]:
    """A host with one real manifest, so a refused commit has a HEAD and a parent to leave alone."""
    with quiet_directory() as source:
        (source / "file").write_bytes(b"committed before the bad requests\n")
        pick(host_config, [source], tmp_path / "cache")
        first = archive(host_config, tmp_path / "stats.json")
        assert first.returncode == 0, first.process.stderr
        yield host_config


def state_of(stack: LocalStack, api: ApiClient, host: str) -> dict[str, Any]:
    return {
        "manifests": api.list_manifests(),
        "head": head_of(stack, host),
        "documents": sorted(
            (version["Key"], version["VersionId"]) for version in object_versions(stack, f"manifests/{host}/")
        ),
        "packs": pack_registry(stack),
    }


def refusal(call: Any) -> ApiError:
    with pytest.raises(ApiError) as refused:
        call()
    assert 400 <= refused.value.status < 500, refused.value
    assert refused.value.message.strip(), "a refusal says why"
    return refused.value


def test_bad_requests_get_clear_4xx_and_change_nothing(stack: LocalStack, committed: LocalHost) -> None:
    api = api_client(stack, committed.identity)
    before = state_of(stack, api, committed.name)
    head = before["head"]
    assert head is not None and [m["manifest_id"] for m in before["manifests"]] == [head]
    root = before["manifests"][0]["root"]

    # A manifest naming a blob nobody stored: 422 listing exactly that blob.
    ghost = unknown_hash("root")
    missing = refusal(
        lambda: api.call("POST", "/manifests", {"parent": head, "root": ghost, "snapshots": []})
    )
    assert missing.status == 422
    assert missing.body["missing"] == [ghost]

    # A snapshot whose stream index nobody stored: same, the index named.
    ghost_index = unknown_hash("stream index")
    snapshot = {
        "name": "db", "description": "d", "restore_through": "cat", "size": 1,
        "content": ghost_index, "exit_status": 0, "error": None,
    }  # fmt: skip
    missing = refusal(
        lambda: api.call("POST", "/manifests", {"parent": head, "root": root, "snapshots": [snapshot]})
    )
    assert missing.status == 422 and ghost_index in missing.body["missing"]

    # Wrong types, a missing field, not a hash: 422 with what is wrong.
    for body, named in [
        ({"parent": head, "root": 12, "snapshots": []}, "root"),
        ({"parent": head, "root": "not-a-hash", "snapshots": []}, "root"),
        ({"parent": head, "root": root, "snapshots": "none"}, "snapshots"),
        ({"parent": head, "root": root, "snapshots": [], "days_retained": "forever"}, "days_retained"),
        ({"parent": ["x"], "root": root, "snapshots": []}, "parent"),
        (["not", "an", "object"], ""),
    ]:
        wrong = refusal(lambda body=body: api.call("POST", "/manifests", body))
        assert wrong.status in (400, 422), (body, wrong)
        assert named in wrong.message, (body, wrong.message)

    # Under the gateway's limit but too large to serve back through GET /manifests/{id} (Lambda's 6 MB
    # response cap): refused, or `restore latest` would fail for good.
    unservable = {"parent": head, "root": root, "snapshots": [], "warnings": ["w" * 1000] * 9000}
    too_large = refusal(lambda: api.call("POST", "/manifests", unservable))
    assert too_large.status == 422 and "bytes" in too_large.message

    # A parent that is not the host's head: 409 naming the real one.
    stale = refusal(lambda: api.call("POST", "/manifests", {"parent": None, "root": root, "snapshots": []}))
    assert stale.status == 409 and stale.body["current"] == head

    # Not JSON at all: 400 (sent raw: the client only sends JSON).
    url = f"{stack.endpoints['api']}/manifests"
    not_json = send(signed("POST", url, b'{"parent": ', *as_host(committed.identity)))
    assert not_json.status_code == 400 and "JSON" in not_json.json()["message"]

    # Over the gateway's 10 MB: 413 before any function runs.
    huge = json.dumps({"parent": head, "root": root, "snapshots": [], "warnings": ["x" * GATEWAY_BODY_LIMIT]})
    too_big = send(signed("POST", url, huge.encode(), *as_host(committed.identity)))
    assert too_big.status_code == 413 and too_big.json()["message"]

    # A listed pack nobody presigned: refused with its reason, the blob it was to hold missing.
    ghost_pack = unknown_hash("pack")
    unknown = refusal(
        lambda: api.call(
            "POST", "/manifests", {"parent": head, "root": ghost, "snapshots": [], "packs": [ghost_pack]}
        )
    )
    assert unknown.status == 422 and unknown.body["packs"] == {ghost_pack: "unknown"}, unknown.body
    assert unknown.body["missing"] == [ghost]
    wrong_location = {"pack_id": "x", "offset": -1, "length": 0, "codec": "none", "raw_length": 0}
    for body, named in [
        ({"parent": head, "root": root, "snapshots": [], "packs": "all"}, "packs"),
        ({"parent": head, "root": root, "snapshots": [], "locations": {ghost: wrong_location}}, "locations"),
    ]:
        wrong = refusal(lambda body=body: api.call("POST", "/manifests", body))
        assert wrong.status == 422 and named in wrong.message, (body, wrong.message)

    # More than the routes take at once.
    too_many_packs = [unknown_hash(f"m{i}") for i in range(2001)]
    too_many = refusal(
        lambda: api.call(
            "POST", "/manifests", {"parent": head, "root": root, "snapshots": [], "packs": too_many_packs}
        )
    )
    assert too_many.status == 422 and "packs" in too_many.message
    packs = [{"sha256": unknown_hash(f"p{i}"), "size": 1000} for i in range(101)]
    too_many = refusal(lambda: api.call("POST", "/packs/presign", {"packs": packs}))
    assert too_many.status == 422 and "packs" in too_many.message
    tiny = refusal(
        lambda: api.call("POST", "/packs/presign", {"packs": [{"sha256": unknown_hash("t"), "size": 5}]})
    )
    assert tiny.status == 422 and "size" in tiny.message
    downloads = [unknown_hash(f"d{i}") for i in range(201)]
    too_many = refusal(lambda: api.call("POST", "/downloads", {"packs": downloads}))
    assert too_many.status == 422 and "packs" in too_many.message
    none = refusal(lambda: api.call("POST", "/downloads", {"packs": []}))
    assert none.status == 422 and "packs" in none.message
    for limit in ("0", "1001", "many"):
        bad_limit = refusal(lambda limit=limit: api.call("GET", "/packs", query={"limit": limit}))
        assert bad_limit.status in (400, 422) and "limit" in bad_limit.message, (limit, bad_limit)

    after = state_of(stack, api, committed.name)
    assert after == before


def test_an_unsigned_or_foreign_request_changes_nothing_either(
    stack: LocalStack, committed: LocalHost
) -> None:
    api = api_client(stack, committed.identity)
    before = state_of(stack, api, committed.name)
    url = f"{stack.endpoints['api']}/manifests"
    body = json.dumps({"parent": before["head"], "root": before["manifests"][0]["root"], "snapshots": []})

    unsigned = requests.post(url, data=body, timeout=30)
    restore = stack.identity("restore")
    as_restore = send(signed("POST", url, body.encode(), restore.access_key, restore.secret_key))

    assert unsigned.status_code == 403
    assert as_restore.status_code == 403 and "restore" in as_restore.json()["message"]
    assert state_of(stack, api, committed.name) == before


def test_a_host_with_many_large_manifests_can_still_list_them(
    stack: LocalStack, committed: LocalHost
) -> None:
    """~6.6 MB of stats made every list a 500 (over 6 MB): summaries are capped, pages bounded."""
    api = api_client(stack, committed.identity)
    [first] = api.list_manifests()
    parent, stats = first["manifest_id"], {"note": "s" * 60_000, "files": 7}
    committed_ids = [parent]
    for _ in range(110):
        body = {"parent": parent, "root": first["root"], "snapshots": [], "stats": stats}
        parent = api.call("POST", "/manifests", body).body["manifest_id"]
        committed_ids.append(parent)

    listed = api.list_manifests()
    assert sorted(m["manifest_id"] for m in listed) == sorted(committed_ids)
    capped = [m["stats"] for m in listed if m["manifest_id"] != first["manifest_id"]]
    assert capped == [{"files": 7, "truncated": True}] * 110
    assert api.latest_manifest()["manifest_id"] == parent  # type: ignore[index]
    assert api.get_manifest(parent)["stats"] == stats  # the document keeps what the host sent
    pages = api.manifest_page(None, 50), api.manifest_page(None, 50, api.manifest_page(None, 50)["next"])
    assert [len(page["manifests"]) for page in pages] == [50, 50]
    assert not {m["manifest_id"] for m in pages[0]["manifests"]} & {
        m["manifest_id"] for m in pages[1]["manifests"]
    }
