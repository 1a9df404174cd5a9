"""The commit: refuses anything not stored, writes nothing on refusal, and costs what changed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sysbackup_backend.api import Services
from sysbackup_backend.errors import Conflict, NotFound, Unprocessable
from sysbackup_backend.index import blob_pk, host_sk
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import decode_manifest
from sysbackup_domain.packs import PackEntry
from sysbackup_domain.retention import parse_iso_utc
from sysbackup_testkit import (
    BUCKET,
    build_pack,
    dir_entry,
    file_entry,
    put_pack_object,
    store_claimed,
    store_verified,
    stream_index_bytes,
    tree_bytes,
)

PLENTY = 60.0


class KeyedGets:
    """Records the key of every S3 GetObject the backend makes."""

    def __init__(self, services: Services) -> None:
        self.keys: list[str] = []
        services.store.client.meta.events.register("provide-client-params.s3.GetObject", self._record)

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        self.keys.append(params["Key"])


def commit_body(root: str | None, parent: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"parent": parent, "root": root, "snapshots": [], "warnings": [], "stats": {}, **extra}


def snapshot(content: str | None) -> dict[str, Any]:
    return {
        "name": "db",
        "description": "database dump",
        "restore_through": "psql",
        "size": 10,
        "content": content,
        "exit_status": 0,
    }


class HostTree:
    """/top, /etc/{a,b}, /var/{c}: every blob claimed by one host, trees in their own pack."""

    def __init__(self, services: Services, host: str = "alpha", etc_a: bytes = b"a contents") -> None:
        self.files = {"top": b"top contents", "a": etc_a, "b": b"b contents", "c": b"c contents"}
        self.data_pack = store_claimed(services, host, [("data", content) for content in self.files.values()])
        self.etc = tree_bytes(
            [file_entry("a", [blob_hash(self.files["a"])]), file_entry("b", [blob_hash(self.files["b"])])]
        )
        self.var = tree_bytes([file_entry("c", [blob_hash(self.files["c"])])])
        self.root = tree_bytes(
            [
                file_entry("top", [blob_hash(self.files["top"])]),
                dir_entry("etc", blob_hash(self.etc)),
                dir_entry("var", blob_hash(self.var)),
            ]
        )
        self.tree_pack = store_claimed(services, host, [("tree", t) for t in (self.root, self.etc, self.var)])
        self.root_hash = blob_hash(self.root)


def manifest_keys(services: Services) -> list[str]:
    listing = services.store.client.list_objects_v2(Bucket=BUCKET, Prefix="manifests/")
    return [item["Key"] for item in listing.get("Contents", [])]


def test_commit_of_stored_tree_writes_manifest_and_moves_head(backend: Services) -> None:
    tree = HostTree(backend)
    outcome = backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    assert outcome.status_code == 201
    manifest_id = outcome.body["manifest_id"]
    assert backend.catalogue.head("alpha") == manifest_id
    stored = decode_manifest(backend.store.read(f"manifests/alpha/{manifest_id}.json"))
    assert (stored.host, stored.root, stored.parent) == ("alpha", tree.root_hash, None)
    expected_until = datetime.now(timezone.utc) + timedelta(days=30)
    assert abs(parse_iso_utc(outcome.body["retain_until"]) - expected_until) < timedelta(minutes=1)
    head = backend.store.client.head_object(Bucket=BUCKET, Key=f"manifests/alpha/{manifest_id}.json")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] == parse_iso_utc(outcome.body["retain_until"])
    assert [summary.manifest_id for summary in backend.catalogue.list("alpha")] == [manifest_id]


def test_unchanged_root_reads_no_tree_on_second_commit(backend: Services) -> None:
    tree = HostTree(backend)
    gets = KeyedGets(backend)
    first = backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    assert gets.keys, "the first commit must read the trees"
    gets.keys.clear()
    second = backend.committer.start(
        "alpha", commit_body(tree.root_hash, parent=first.body["manifest_id"]), Budget(PLENTY)
    )
    assert second.status_code == 201
    assert gets.keys == []


def test_changed_subtree_is_read_and_unchanged_one_is_not(backend: Services) -> None:
    old = HostTree(backend)
    first = backend.committer.start("alpha", commit_body(old.root_hash), Budget(PLENTY))
    new = HostTree(backend, etc_a=b"a contents, edited")
    gets = KeyedGets(backend)
    second = backend.committer.start(
        "alpha", commit_body(new.root_hash, parent=first.body["manifest_id"]), Budget(PLENTY)
    )
    assert second.status_code == 201
    # The new root and /etc are read (from the new tree pack); /var is closed already and is not.
    assert gets.keys and set(gets.keys) == {f"packs/{new.tree_pack.pack_id}"}
    closed = backend.index.lookup("alpha", [blob_hash(new.root)], with_closed=True)[blob_hash(new.root)]
    assert closed.closed


def test_wrong_parent_is_a_conflict_and_writes_nothing(backend: Services) -> None:
    tree = HostTree(backend)
    first = backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    for parent in (None, "20260101T000000Z-0000abcd"):
        with pytest.raises(Conflict) as refused:
            backend.committer.start("alpha", commit_body(tree.root_hash, parent=parent), Budget(PLENTY))
        assert refused.value.details["current"] == first.body["manifest_id"]
    assert len(manifest_keys(backend)) == 1
    assert backend.catalogue.head("alpha") == first.body["manifest_id"]


def test_unknown_blob_is_refused_and_nothing_written(backend: Services) -> None:
    missing = blob_hash(b"never uploaded")
    root = tree_bytes([file_entry("lost", [missing])])
    store_claimed(backend, "alpha", [("tree", root)])
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", commit_body(blob_hash(root)), Budget(PLENTY))
    assert refused.value.details["missing"] == [missing]
    assert manifest_keys(backend) == []
    assert backend.catalogue.head("alpha") is None


def test_missing_root_is_refused(backend: Services) -> None:
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", commit_body(blob_hash(b"no such tree")), Budget(PLENTY))
    assert refused.value.details["missing"] == [blob_hash(b"no such tree")]


def test_another_hosts_unverified_claims_do_not_satisfy_a_commit(backend: Services) -> None:
    tree = HostTree(backend, host="alpha")
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("beta", commit_body(tree.root_hash), Budget(PLENTY))
    assert refused.value.details["missing"] == [tree.root_hash]


def test_verified_blobs_satisfy_any_hosts_commit(backend: Services) -> None:
    content = b"shared file"
    root = tree_bytes([file_entry("shared", [blob_hash(content)])])
    store_verified(backend, [("data", content), ("tree", root)])
    outcome = backend.committer.start("beta", commit_body(blob_hash(root)), Budget(PLENTY))
    assert outcome.status_code == 201


def test_condemned_blob_is_refused(backend: Services) -> None:
    tree = HostTree(backend)
    doomed = blob_hash(tree.files["c"])
    backend.index.client.update_item(
        TableName=backend.index.table_name,
        Key={"pk": blob_pk(doomed), "sk": host_sk("alpha")},
        UpdateExpression="SET condemned_at = :now",
        ExpressionAttributeValues={":now": "2026-11-21T00:00:00Z"},
    )
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    assert refused.value.details["condemned"] == [doomed]
    assert manifest_keys(backend) == []


def test_closed_root_that_was_condemned_since_is_refused(backend: Services) -> None:
    tree = HostTree(backend)
    first = backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    backend.index.client.update_item(
        TableName=backend.index.table_name,
        Key={"pk": blob_pk(tree.root_hash), "sk": host_sk("alpha")},
        UpdateExpression="SET condemned_at = :now",
        ExpressionAttributeValues={":now": "2026-11-21T00:00:00Z"},
    )
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start(
            "alpha", commit_body(tree.root_hash, parent=first.body["manifest_id"]), Budget(PLENTY)
        )
    assert refused.value.details["condemned"] == [tree.root_hash]


def test_tree_that_is_not_a_tree_is_corrupt(backend: Services) -> None:
    not_a_tree = b'{"version":1,"entries":[{"name":"../escape"}]}'
    store_claimed(backend, "alpha", [("tree", not_a_tree)])
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", commit_body(blob_hash(not_a_tree)), Budget(PLENTY))
    assert list(refused.value.details["corrupt"]) == [blob_hash(not_a_tree)]
    assert manifest_keys(backend) == []


def test_tree_whose_bytes_do_not_match_its_hash_is_corrupt(backend: Services) -> None:
    real = tree_bytes([file_entry("x", [])])
    claimed_hash = blob_hash(b"what the host pretends the tree is")
    pack = build_pack([("tree", real)])
    put_pack_object(backend, pack)
    forged = PackEntry(**{**pack.entries[0].to_json(), "hash": claimed_hash})
    backend.index.record_presigned(pack.pack_id, "alpha", len(pack.data), "2030-01-01T00:00:00Z")
    backend.index.register_pack("alpha", pack.pack_id, [forged])
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", commit_body(claimed_hash), Budget(PLENTY))
    assert list(refused.value.details["corrupt"]) == [claimed_hash]


def test_malformed_manifest_is_refused(backend: Services) -> None:
    for body in ({"parent": None}, {"parent": None, "root": "not-a-hash", "snapshots": []}, [], "text"):
        with pytest.raises(Unprocessable, match="malformed manifest"):
            backend.committer.start("alpha", body, Budget(PLENTY))
    assert manifest_keys(backend) == []


def test_snapshot_stream_index_chunks_are_checked(backend: Services) -> None:
    chunks = [b"chunk one", b"chunk two"]
    stored_index = stream_index_bytes([blob_hash(chunk) for chunk in chunks])
    store_claimed(backend, "alpha", [("data", chunks[0]), ("data", stored_index)])
    body = commit_body(None, snapshots=[snapshot(blob_hash(stored_index))])
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", body, Budget(PLENTY))
    assert refused.value.details["missing"] == [blob_hash(chunks[1])]
    store_claimed(backend, "alpha", [("data", chunks[1])])
    assert backend.committer.start("alpha", body, Budget(PLENTY)).status_code == 201


def test_host_may_lengthen_retention_but_not_shorten_it(backend: Services) -> None:
    longer = backend.committer.start("alpha", commit_body(None, days_retained=100), Budget(PLENTY))
    shorter = backend.committer.start(
        "alpha", commit_body(None, parent=longer.body["manifest_id"], days_retained=1), Budget(PLENTY)
    )
    now = datetime.now(timezone.utc)
    assert parse_iso_utc(longer.body["retain_until"]) > now + timedelta(days=99)
    assert parse_iso_utc(shorter.body["retain_until"]) > now + timedelta(days=29)


def _deep_tree(services: Services, depth: int) -> str:
    """A chain of `depth` nested directories, each tree in its own pack: one walk step per level."""
    leaf_content = b"deep leaf"
    store_claimed(services, "alpha", [("data", leaf_content)])
    tree = tree_bytes([file_entry("leaf", [blob_hash(leaf_content)])])
    store_claimed(services, "alpha", [("tree", tree)])
    for level in range(depth):
        tree = tree_bytes([dir_entry(f"level{level}", blob_hash(tree))])
        store_claimed(services, "alpha", [("tree", tree)])
    return blob_hash(tree)


def test_walk_longer_than_budget_becomes_a_job_that_polls_to_commit(backend: Services) -> None:
    root = _deep_tree(backend, depth=4)
    started = backend.committer.start("alpha", commit_body(root), Budget(0))
    assert started.status_code == 202
    job_id = started.body["job_id"]
    assert backend.catalogue.head("alpha") is None
    polls = 0
    outcome = started
    while outcome.status_code == 202:
        polls += 1
        assert polls < 20
        outcome = backend.committer.resume("alpha", job_id, Budget(0))
    assert polls >= 3, "each zero budget poll makes exactly one step"
    assert outcome.status_code == 201
    assert backend.catalogue.head("alpha") == outcome.body["manifest_id"]
    again = backend.committer.resume("alpha", job_id, Budget(0))
    assert (again.status_code, again.body["manifest_id"]) == (201, outcome.body["manifest_id"])
    with pytest.raises(NotFound):
        backend.committer.resume("beta", job_id, Budget(0))


def test_job_that_finds_a_missing_blob_fails_with_details(backend: Services) -> None:
    missing = blob_hash(b"absent leaf")
    inner = tree_bytes([file_entry("lost", [missing])])
    root = tree_bytes([dir_entry("inner", blob_hash(inner))])
    store_claimed(backend, "alpha", [("tree", inner)])
    store_claimed(backend, "alpha", [("tree", root)])
    started = backend.committer.start("alpha", commit_body(blob_hash(root)), Budget(0))
    assert started.status_code == 202
    outcome = backend.committer.resume("alpha", started.body["job_id"], Budget(PLENTY))
    assert outcome.status_code == 422
    assert outcome.body["missing"] == [missing]
    assert outcome.body["state"] == "failed"
    assert backend.committer.resume("alpha", started.body["job_id"], Budget(PLENTY)).status_code == 422
    assert manifest_keys(backend) == []


def test_claim_on_a_corrupt_pack_is_refused(backend: Services) -> None:
    tree = HostTree(backend)
    backend.index.record_corrupt(tree.data_pack.pack_id, "verifier found a bad blob")
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    assert set(refused.value.details["corrupt"]) == {blob_hash(content) for content in tree.files.values()}


def test_shared_subtree_closes_every_parent(backend: Services) -> None:
    content = b"same file in two places"
    shared = tree_bytes([file_entry("f", [blob_hash(content)])])
    left = tree_bytes([dir_entry("x", blob_hash(shared))])
    right = tree_bytes([dir_entry("x", blob_hash(shared)), dir_entry("y", blob_hash(shared))])
    root = tree_bytes([dir_entry("left", blob_hash(left)), dir_entry("right", blob_hash(right))])
    store_claimed(backend, "alpha", [("data", content)])
    store_claimed(backend, "alpha", [("tree", t) for t in (shared, left, right, root)])
    assert backend.committer.start("alpha", commit_body(blob_hash(root)), Budget(PLENTY)).status_code == 201
    hashes = [blob_hash(t) for t in (shared, left, right, root)]
    statuses = backend.index.lookup("alpha", hashes, with_closed=True)
    assert all(statuses[h].closed for h in hashes)
    assert not backend.index.lookup("beta", hashes, with_closed=True)[hashes[-1]].closed


def test_subtree_with_a_missing_blob_is_not_closed(backend: Services) -> None:
    good = tree_bytes([file_entry("ok", [blob_hash(b"present")])])
    bad = tree_bytes([file_entry("lost", [blob_hash(b"absent")])])
    root = tree_bytes([dir_entry("bad", blob_hash(bad)), dir_entry("good", blob_hash(good))])
    store_claimed(backend, "alpha", [("data", b"present")])
    store_claimed(backend, "alpha", [("tree", t) for t in (good, bad, root)])
    with pytest.raises(Unprocessable):
        backend.committer.start("alpha", commit_body(blob_hash(root)), Budget(PLENTY))
    statuses = backend.index.lookup("alpha", [blob_hash(t) for t in (good, bad, root)], with_closed=True)
    assert statuses[blob_hash(good)].closed
    assert not statuses[blob_hash(bad)].closed
    assert not statuses[blob_hash(root)].closed
    # Once the host uploads what was missing, the retry reads only the trees that were not closed.
    store_claimed(backend, "alpha", [("data", b"absent")])
    assert backend.committer.start("alpha", commit_body(blob_hash(root)), Budget(PLENTY)).status_code == 201


def test_root_condemned_during_the_commit_stops_the_transaction(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = HostTree(backend)
    write_manifest = backend.store.put_manifest

    def condemn_root_then_write(*args: Any, **kwargs: Any) -> None:
        # gc condemns the root between the walk and the catalogue transaction.
        backend.index.client.update_item(
            TableName=backend.index.table_name,
            Key={"pk": blob_pk(tree.root_hash), "sk": host_sk("alpha")},
            UpdateExpression="SET condemned_at = :now",
            ExpressionAttributeValues={":now": "2026-11-21T00:00:00Z"},
        )
        write_manifest(*args, **kwargs)

    monkeypatch.setattr(backend.store, "put_manifest", condemn_root_then_write)
    with pytest.raises(Unprocessable, match="condemned while committing"):
        backend.committer.start("alpha", commit_body(tree.root_hash), Budget(PLENTY))
    assert backend.catalogue.head("alpha") is None
    assert backend.catalogue.list("alpha") == []


class CallCounter:
    """Counts every AWS call a client makes, by operation name."""

    def __init__(self, *clients: Any) -> None:
        self.calls: list[str] = []
        for client in clients:
            client.meta.events.register("before-call.*.*", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        self.calls.append(model.name)


def test_no_change_commit_of_a_wide_tree_costs_a_handful_of_requests(backend: Services) -> None:
    # 400 directories of 3 files: more nodes than one walk step takes.
    contents = [f"file {number}".encode() for number in range(1200)]
    store_claimed(backend, "alpha", [("data", content) for content in contents])
    subtrees = [
        tree_bytes([file_entry(f"f{i}", [blob_hash(contents[3 * d + i])]) for i in range(3)])
        for d in range(400)
    ]
    root = tree_bytes([dir_entry(f"d{d:03}", blob_hash(subtree)) for d, subtree in enumerate(subtrees)])
    store_claimed(backend, "alpha", [("tree", t) for t in [*subtrees, root]])
    first = backend.committer.start("alpha", commit_body(blob_hash(root)), Budget(PLENTY))
    assert first.status_code == 201
    counter = CallCounter(backend.store.client, backend.index.client)
    second = backend.committer.start(
        "alpha", commit_body(blob_hash(root), parent=first.body["manifest_id"]), Budget(PLENTY)
    )
    assert second.status_code == 201
    # HEAD, gc's epoch, the root's index items, its pack's state, the manifest PUT, the transaction.
    assert sorted(counter.calls) == sorted(
        ["GetItem", "GetItem", "BatchGetItem", "BatchGetItem", "PutObject", "TransactWriteItems"]
    )
