"""The commit: diffs against the parent, proves new blobs from listed packs' trailers, refuses the rest with
reasons, writes nothing on refusal, and costs what changed."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from sysbackup_backend import walk
from sysbackup_backend.api import Services
from sysbackup_backend.commit import Committer, VerifyQueue, verify_queue_from_environment
from sysbackup_backend.errors import Conflict, NotFound, Unprocessable
from sysbackup_backend.gc import EPOCH_KEY
from sysbackup_backend.retention_worker import RetentionQueue
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import decode_manifest
from sysbackup_domain.packs import PackWriter
from sysbackup_domain.retention import parse_iso_utc
from sysbackup_testkit import (
    BUCKET,
    REGION,
    BuiltPack,
    build_pack,
    dir_entry,
    file_entry,
    put_pack_object,
    store_pack,
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


class CallCounter:
    """Counts every AWS call a client makes, by operation name."""

    def __init__(self, *clients: Any) -> None:
        self.calls: list[str] = []
        for client in clients:
            client.meta.events.register("before-call.*.*", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        self.calls.append(model.name)


def commit_body(
    root: str | None,
    parent: str | None = None,
    packs: list[BuiltPack] | None = None,
    locations: dict[str, dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "parent": parent,
        "root": root,
        "snapshots": [],
        "warnings": [],
        "stats": {},
        "packs": [pack.pack_id for pack in packs or []],
        "locations": locations or {},
        **extra,
    }


def locations_of(*packs: BuiltPack, kinds: tuple[str, ...] = ("tree",)) -> dict[str, dict[str, Any]]:
    """The location hints a host sends for the packs' blobs of `kinds` (from its local index)."""
    return {
        entry.hash: {
            "pack_id": pack.pack_id,
            "offset": entry.offset,
            "length": entry.length,
            "codec": entry.codec,
            "raw_length": entry.raw_length,
        }
        for pack in packs
        for entry in pack.entries
        if entry.kind in kinds
    }


def snapshot(content: str | None, name: str = "db") -> dict[str, Any]:
    return {
        "name": name,
        "description": "database dump",
        "restore_through": "psql",
        "size": 10,
        "content": content,
        "exit_status": 0,
    }


class HostTree:
    """/top, /etc/{a,b}, /var/{c}: data in one pack, /var's tree in its own, the root and /etc in a third."""

    def __init__(self, services: Services, host: str = "alpha", etc_a: bytes = b"a contents") -> None:
        self.files = {"top": b"top contents", "a": etc_a, "b": b"b contents", "c": b"c contents"}
        self.data_pack = store_pack(services, host, [("data", content) for content in self.files.values()])
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
        self.var_pack = store_pack(services, host, [("tree", self.var)])
        self.tree_pack = store_pack(services, host, [("tree", t) for t in (self.root, self.etc)])
        self.root_hash = blob_hash(self.root)
        self.packs = [self.data_pack, self.var_pack, self.tree_pack]


def manifest_keys(services: Services) -> list[str]:
    listing = services.store.client.list_objects_v2(Bucket=BUCKET, Prefix="manifests/")
    return [item["Key"] for item in listing.get("Contents", [])]


def first_commit(services: Services, tree: HostTree, host: str = "alpha") -> str:
    outcome = services.committer.start(host, commit_body(tree.root_hash, packs=tree.packs), Budget(PLENTY))
    assert outcome.status_code == 201
    return str(outcome.body["manifest_id"])


def refusal(services: Services, host: str, body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(Unprocessable) as refused:
        services.committer.start(host, body, Budget(PLENTY))
    return refused.value.body()


def test_commit_of_listed_packs_writes_manifest_and_moves_head(backend: Services) -> None:
    tree = HostTree(backend)
    manifest_id = first_commit(backend, tree)
    assert backend.catalogue.head("alpha") == manifest_id
    stored = decode_manifest(backend.store.read(f"manifests/alpha/{manifest_id}.json"))
    assert (stored.host, stored.root, stored.parent) == ("alpha", tree.root_hash, None)
    expected_until = datetime.now(timezone.utc) + timedelta(days=30)
    assert abs(stored.retain_until - expected_until) < timedelta(minutes=1)
    head = backend.store.client.head_object(Bucket=BUCKET, Key=f"manifests/alpha/{manifest_id}.json")
    assert head["ObjectLockMode"] == "GOVERNANCE"
    assert head["ObjectLockRetainUntilDate"] == stored.retain_until
    assert [summary.manifest_id for summary in backend.catalogue.list("alpha")] == [manifest_id]


def test_small_presigned_packs_are_verified_inline_in_the_transaction(backend: Services) -> None:
    tree = HostTree(backend)
    unused = store_pack(backend, "alpha", [("data", b"listed but not referenced")])
    gets = KeyedGets(backend)
    outcome = backend.committer.start(
        "alpha", commit_body(tree.root_hash, packs=[*tree.packs, unused]), Budget(PLENTY)
    )
    assert outcome.status_code == 201
    for pack in [*tree.packs, unused]:
        record = backend.registry.get(pack.pack_id)
        assert record is not None and (record.state, record.blob_count) == ("verified", len(pack.entries))
    # Each pack is read once, whole: its trailer and its blobs come from that one GET.
    assert sorted(gets.keys) == sorted(f"packs/{pack.pack_id}" for pack in [*tree.packs, unused])


def test_parent_diff_reads_only_the_changed_path(backend: Services) -> None:
    old = HostTree(backend)
    parent = first_commit(backend, old)
    edited = b"a contents, edited"
    new_data = store_pack(backend, "alpha", [("data", edited)])
    etc = tree_bytes([file_entry("a", [blob_hash(edited)]), file_entry("b", [blob_hash(old.files["b"])])])
    root = tree_bytes(
        [
            file_entry("top", [blob_hash(old.files["top"])]),
            dir_entry("etc", blob_hash(etc)),
            dir_entry("var", blob_hash(old.var)),
        ]
    )
    new_trees = store_pack(backend, "alpha", [("tree", root), ("tree", etc)])
    body = commit_body(
        blob_hash(root),
        parent=parent,
        packs=[new_data, new_trees],
        locations={**locations_of(new_trees), **locations_of(old.tree_pack)},
    )
    gets = KeyedGets(backend)
    counter = CallCounter(backend.store.client, backend.registry.client)
    outcome = backend.committer.start("alpha", body, Budget(PLENTY))
    assert outcome.status_code == 201
    # The new packs whole (inline verification), the parent's hinted root and /etc in one ranged GET; /var
    # is the parent's, unchanged: its pack is never read, nor the unchanged files' data pack.
    assert sorted(gets.keys) == sorted(
        [f"packs/{new_data.pack_id}", f"packs/{new_trees.pack_id}", f"packs/{old.tree_pack.pack_id}"]
    )
    dynamodb_calls = [call for call in counter.calls if call not in ("GetObject", "PutObject")]
    assert dynamodb_calls == ["BatchGetItem", "TransactWriteItems"]
    assert counter.calls.count("PutObject") == 1  # the manifest


def test_unchanged_root_is_committed_without_reading_anything(backend: Services) -> None:
    tree = HostTree(backend)
    parent = first_commit(backend, tree)
    counter = CallCounter(backend.store.client, backend.registry.client)
    # Even packs listed by an over-approximating host are not read when the parent holds everything.
    body = commit_body(tree.root_hash, parent=parent, packs=tree.packs)
    outcome = backend.committer.start("alpha", body, Budget(PLENTY))
    assert outcome.status_code == 201
    assert sorted(counter.calls) == ["BatchGetItem", "PutObject", "TransactWriteItems"]


def test_a_blob_neither_in_the_parent_nor_in_a_listed_pack_is_refused(backend: Services) -> None:
    tree = HostTree(backend)
    # The data pack exists and is the host's, but it is not listed: its blobs are not proven stored.
    body = refusal(backend, "alpha", commit_body(tree.root_hash, packs=[tree.var_pack, tree.tree_pack]))
    assert body["missing"] == sorted(blob_hash(content) for content in tree.files.values())
    assert body["packs"] == {}
    assert manifest_keys(backend) == []
    assert backend.catalogue.head("alpha") is None


def test_a_root_in_no_listed_pack_is_missing(backend: Services) -> None:
    body = refusal(backend, "alpha", commit_body(blob_hash(b"no such tree")))
    assert body["missing"] == [blob_hash(b"no such tree")]


@pytest.mark.parametrize("reason", ["not_yours", "condemned", "corrupt", "unknown", "deleting"])
def test_a_listed_pack_that_may_not_be_used_is_refused_with_its_reason(
    backend: Services, reason: str
) -> None:
    tree = HostTree(backend, host="beta" if reason == "not_yours" else "alpha")
    data = tree.data_pack.pack_id
    if reason == "condemned":
        assert backend.registry.condemn(data, datetime.now(timezone.utc))
    elif reason == "corrupt":
        assert backend.registry.mark_corrupt(data, "the verifier found a bad blob")
    elif reason == "deleting":
        record = backend.registry.get(data)
        assert record is not None and backend.registry.condemn(data, datetime.now(timezone.utc))
        condemned = backend.registry.get(data)
        assert condemned is not None and backend.registry.start_deleting(data, str(condemned.condemned_at))
    elif reason == "unknown":
        backend.registry.client.delete_item(
            TableName=backend.registry.table_name, Key={"pk": f"pack#{data}", "sk": "pack"}
        )
    if reason == "not_yours":
        # beta's packs listed by alpha: beta's bytes are no proof for alpha.
        for pack in (tree.var_pack, tree.tree_pack):
            assert backend.registry.add_host(pack.pack_id, "alpha")
    body = refusal(backend, "alpha", commit_body(tree.root_hash, packs=tree.packs))
    assert body["packs"] == {data: reason}
    assert body["missing"] == sorted(blob_hash(content) for content in tree.files.values())
    assert manifest_keys(backend) == []


def test_a_damaged_small_pack_is_marked_corrupt_and_refused(backend: Services) -> None:
    content = os.urandom(5000)  # stored as is: a flipped byte still leaves a parseable pack
    intact = build_pack([("data", content)])
    damaged = bytearray(intact.data)
    damaged[10] ^= 0xFF
    bad = BuiltPack(hashlib.sha256(damaged).hexdigest(), bytes(damaged), intact.entries)
    put_pack_object(backend, bad)
    backend.registry.record_presigned(bad.pack_id, "alpha", len(bad.data), "2030-01-01T00:00:00Z")
    root = tree_bytes([file_entry("f", [blob_hash(content)])])
    trees = store_pack(backend, "alpha", [("tree", root)])
    body = refusal(backend, "alpha", commit_body(blob_hash(root), packs=[trees, bad]))
    assert (body["missing"], body["packs"]) == ([blob_hash(content)], {bad.pack_id: "corrupt"})
    record = backend.registry.get(bad.pack_id)
    assert record is not None and record.state == "corrupt" and record.corrupt_reason
    healthy = backend.registry.get(trees.pack_id)
    assert healthy is not None and healthy.state == "presigned"  # nothing committed: no update either


def forged_tree_pack(services: Services, real: bytes, claimed: str, state: str) -> BuiltPack:
    """A pack whose trailer says `claimed` where the bytes of `real` are."""
    writer = PackWriter()
    writer.add_stored(claimed, "tree", "none", real, len(real))
    data, entries = writer.finish()
    pack = BuiltPack(hashlib.sha256(data).hexdigest(), data, entries)
    put_pack_object(services, pack)
    services.registry.record_presigned(pack.pack_id, "alpha", len(data), "2030-01-01T00:00:00Z")
    if state == "verified":
        assert services.registry.mark_verified(pack.pack_id, 1)
    return pack


@pytest.mark.parametrize(("state", "reason"), [("presigned", "corrupt"), ("verified", "unreadable")])
def test_a_trailer_that_lies_refuses_its_pack(backend: Services, state: str, reason: str) -> None:
    claimed = blob_hash(b"what the host pretends the tree is")
    pack = forged_tree_pack(backend, tree_bytes([file_entry("x", [])]), claimed, state)
    body = refusal(backend, "alpha", commit_body(claimed, packs=[pack]))
    assert (body["missing"], body["packs"]) == ([claimed], {pack.pack_id: reason})
    record = backend.registry.get(pack.pack_id)
    assert record is not None and record.state == ("corrupt" if state == "presigned" else "verified")


def test_a_big_presigned_pack_with_a_lying_trailer_is_marked_corrupt(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(walk, "INLINE_VERIFY_MAX_BYTES", 0)  # every pack is "big": read by ranges
    claimed = blob_hash(b"pretend")
    pack = forged_tree_pack(backend, tree_bytes([file_entry("x", [])]), claimed, "presigned")
    body = refusal(backend, "alpha", commit_body(claimed, packs=[pack]))
    assert body["packs"] == {pack.pack_id: "corrupt"}
    record = backend.registry.get(pack.pack_id)
    assert record is not None and record.state == "corrupt"


def test_a_presigned_pack_never_uploaded_is_unreadable(backend: Services) -> None:
    pack = build_pack([("tree", tree_bytes([]))])
    backend.registry.record_presigned(pack.pack_id, "alpha", len(pack.data), "2030-01-01T00:00:00Z")
    body = refusal(backend, "alpha", commit_body(pack.entries[0].hash, packs=[pack]))
    assert (body["missing"], body["packs"]) == ([pack.entries[0].hash], {pack.pack_id: "unreadable"})
    record = backend.registry.get(pack.pack_id)
    assert record is not None and record.state == "presigned"  # not the pack's fault: no mark


def test_a_wrong_location_is_refused_without_harm(backend: Services) -> None:
    old = HostTree(backend)
    parent = first_commit(backend, old)
    new_file = store_pack(backend, "alpha", [("data", b"new file")])
    root = tree_bytes(
        [
            file_entry("top", [blob_hash(old.files["top"])]),
            file_entry("new", [blob_hash(b"new file")]),
            dir_entry("etc", blob_hash(old.etc)),
            dir_entry("var", blob_hash(old.var)),
        ]
    )
    new_trees = store_pack(backend, "alpha", [("tree", root)])
    hints = locations_of(old.tree_pack)
    good = dict(hints[old.root_hash])
    hints[old.root_hash] = {**good, "offset": good["offset"] + 1}  # off by one: does not hash right
    body = commit_body(blob_hash(root), parent=parent, packs=[new_file, new_trees], locations=hints)
    refused = refusal(backend, "alpha", body)
    # The parent's root could not be read: the new root is compared against nothing, and what it shares
    # with the parent (in no listed pack) is missing.
    shared = sorted([blob_hash(old.files["top"]), blob_hash(old.etc), blob_hash(old.var)])
    assert (refused["missing"], refused["packs"]) == (shared, {})
    record = backend.registry.get(old.tree_pack.pack_id)
    assert record is not None and record.state == "verified"
    hints[old.root_hash] = good
    assert backend.committer.start("alpha", body, Budget(PLENTY)).status_code == 201


def test_a_location_in_another_hosts_pack_is_not_read(backend: Services) -> None:
    mine = HostTree(backend, host="alpha")
    parent = first_commit(backend, mine)
    root = tree_bytes([file_entry("top", [blob_hash(mine.files["top"])])])
    new_trees = store_pack(backend, "alpha", [("tree", root)])
    # beta holds alpha's old root too, in a pack of its own; alpha points its hint there.
    theirs = store_pack(backend, "beta", [("tree", mine.root), ("data", b"beta's own file")])
    spy = {mine.root_hash: locations_of(theirs)[mine.root_hash]}
    gets = KeyedGets(backend)
    refused = refusal(
        backend, "alpha", commit_body(blob_hash(root), parent=parent, packs=[new_trees], locations=spy)
    )
    assert refused["missing"] == [blob_hash(mine.files["top"])]
    assert f"packs/{theirs.pack_id}" not in gets.keys


def test_wrong_parent_is_a_conflict_and_writes_nothing(backend: Services) -> None:
    tree = HostTree(backend)
    first = first_commit(backend, tree)
    for parent in (None, "20260101T000000Z-0000abcd"):
        with pytest.raises(Conflict) as refused:
            backend.committer.start("alpha", commit_body(tree.root_hash, parent=parent), Budget(PLENTY))
        assert refused.value.details["current"] == first
    assert len(manifest_keys(backend)) == 1
    assert backend.catalogue.head("alpha") == first


def test_tree_that_is_not_a_tree_is_refused(backend: Services) -> None:
    not_a_tree = b'{"version":1,"entries":[{"name":"../escape"}]}'
    pack = store_pack(backend, "alpha", [("tree", not_a_tree)])
    with pytest.raises(Unprocessable, match="not what they are referenced as") as refused:
        backend.committer.start("alpha", commit_body(blob_hash(not_a_tree), packs=[pack]), Budget(PLENTY))
    assert refused.value.body()["missing"] == []
    assert manifest_keys(backend) == []


def test_malformed_manifest_is_refused(backend: Services) -> None:
    bodies = (
        {"parent": None},
        {"parent": None, "root": "not-a-hash", "snapshots": []},
        {"parent": None, "root": None, "snapshots": [], "packs": ["nothex"]},
        [],
        "text",
    )
    for body in bodies:
        with pytest.raises(Unprocessable, match="malformed manifest"):
            backend.committer.start("alpha", body, Budget(PLENTY))
    assert manifest_keys(backend) == []


def test_snapshot_chunks_are_diffed_against_the_parents_same_named_snapshot(backend: Services) -> None:
    chunks = [b"chunk one", b"chunk two"]
    first_index = stream_index_bytes([blob_hash(chunk) for chunk in chunks])
    first_pack = store_pack(
        backend, "alpha", [("data", chunks[0]), ("data", chunks[1]), ("data", first_index)]
    )
    body = commit_body(None, packs=[first_pack], snapshots=[snapshot(blob_hash(first_index))])
    parent = backend.committer.start("alpha", body, Budget(PLENTY)).body["manifest_id"]
    # The next dump changes one chunk: only the new chunk and index are in the listed pack.
    second_index = stream_index_bytes([blob_hash(chunks[0]), blob_hash(b"chunk three")])
    second_pack = store_pack(backend, "alpha", [("data", b"chunk three"), ("data", second_index)])
    hints = locations_of(first_pack, kinds=("data",))
    body = commit_body(
        None,
        parent=parent,
        packs=[second_pack],
        locations=hints,
        snapshots=[snapshot(blob_hash(second_index))],
    )
    assert backend.committer.start("alpha", body, Budget(PLENTY)).status_code == 201
    # Under another name there is no parent side: the reused chunk must be in a listed pack.
    head = backend.catalogue.head("alpha")
    renamed = commit_body(
        None, parent=head, packs=[second_pack], snapshots=[snapshot(blob_hash(second_index), name="other")]
    )
    assert refusal(backend, "alpha", renamed)["missing"] == [blob_hash(chunks[0])]


def _deep_tree(services: Services, depth: int) -> tuple[str, list[BuiltPack]]:
    """A chain of `depth` nested directories, each tree in its own pack: one walk step per level."""
    leaf_content = b"deep leaf"
    packs = [store_pack(services, "alpha", [("data", leaf_content)])]
    tree = tree_bytes([file_entry("leaf", [blob_hash(leaf_content)])])
    packs.append(store_pack(services, "alpha", [("tree", tree)]))
    for level in range(depth):
        tree = tree_bytes([dir_entry(f"level{level}", blob_hash(tree))])
        packs.append(store_pack(services, "alpha", [("tree", tree)]))
    return blob_hash(tree), packs


def test_walk_longer_than_budget_becomes_a_job_that_polls_to_commit(backend: Services) -> None:
    root, packs = _deep_tree(backend, depth=4)
    started = backend.committer.start("alpha", commit_body(root, packs=packs), Budget(0))
    assert started.status_code == 202
    job_id = started.body["job_id"]
    assert backend.catalogue.head("alpha") is None
    polls = 0
    outcome = started
    while outcome.status_code == 202:
        polls += 1
        assert polls < 20
        outcome = backend.committer.resume("alpha", job_id, Budget(0))
    assert polls >= 4, "each zero budget poll makes exactly one step"
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
    packs = [store_pack(backend, "alpha", [("tree", inner)]), store_pack(backend, "alpha", [("tree", root)])]
    started = backend.committer.start("alpha", commit_body(blob_hash(root), packs=packs), Budget(0))
    assert started.status_code == 202
    outcome = backend.committer.resume("alpha", started.body["job_id"], Budget(PLENTY))
    assert (outcome.status_code, outcome.body["state"]) == (422, "failed")
    assert (outcome.body["missing"], outcome.body["packs"]) == ([missing], {})
    assert backend.committer.resume("alpha", started.body["job_id"], Budget(PLENTY)).status_code == 422
    assert manifest_keys(backend) == []


def set_epoch(services: Services, number: int, condemning_until: str | None = None) -> None:
    item: dict[str, Any] = {**EPOCH_KEY, "number": number}
    if condemning_until is not None:
        item["condemning_until"] = condemning_until
    services.registry.client.put_item(TableName=services.registry.table_name, Item=item)


def test_gc_opening_a_condemning_window_during_the_walk_makes_it_walk_again(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = HostTree(backend)
    set_epoch(backend, 2)
    write_manifest = backend.store.put_manifest
    walks: list[int] = []
    original_run = walk.TreeWalker.run

    def counting_run(self: walk.TreeWalker, state: walk.WalkState, budget: Budget) -> None:
        walks.append(state.gc_epoch)
        original_run(self, state, budget)

    def gc_condemns_then_write(*args: Any, **kwargs: Any) -> None:
        if len(walks) == 1:
            set_epoch(backend, 4)  # a whole gc window opened and closed between the walk and the transaction
        write_manifest(*args, **kwargs)

    monkeypatch.setattr(walk.TreeWalker, "run", counting_run)
    monkeypatch.setattr(backend.store, "put_manifest", gc_condemns_then_write)
    outcome = backend.committer.start("alpha", commit_body(tree.root_hash, packs=tree.packs), Budget(PLENTY))
    assert outcome.status_code == 201
    assert walks == [2, 4]
    assert backend.catalogue.head("alpha") == outcome.body["manifest_id"]


def test_a_walk_begun_while_gc_condemns_does_not_commit(backend: Services) -> None:
    tree = HostTree(backend)
    later = (datetime.now(timezone.utc) + timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    set_epoch(backend, 3, condemning_until=later)
    outcome = backend.committer.start("alpha", commit_body(tree.root_hash, packs=tree.packs), Budget(PLENTY))
    assert outcome.status_code == 202
    assert backend.catalogue.head("alpha") is None
    set_epoch(backend, 4)
    resumed = backend.committer.resume("alpha", outcome.body["job_id"], Budget(PLENTY))
    assert resumed.status_code == 201


def test_a_pack_condemned_between_walk_and_commit_is_refused_on_the_second_walk(
    backend: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = HostTree(backend)
    write_manifest = backend.store.put_manifest

    def gc_condemns_then_write(*args: Any, **kwargs: Any) -> None:
        backend.registry.condemn(tree.data_pack.pack_id, datetime.now(timezone.utc))
        set_epoch(backend, 2)
        write_manifest(*args, **kwargs)

    monkeypatch.setattr(backend.store, "put_manifest", gc_condemns_then_write)
    body = refusal(backend, "alpha", commit_body(tree.root_hash, packs=tree.packs))
    assert body["packs"] == {tree.data_pack.pack_id: "condemned"}
    assert backend.catalogue.head("alpha") is None


def sqs_queue(name: str) -> tuple[Any, str]:
    sqs = boto3.client("sqs", region_name=REGION)
    return sqs, sqs.create_queue(QueueName=name)["QueueUrl"]


def received(sqs: Any, url: str) -> list[dict[str, Any]]:
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    return [json.loads(message["Body"]) for message in messages]


def committer_with_queues(services: Services, **queues: Any) -> Committer:
    return Committer(
        services.registry,
        services.store,
        services.catalogue,
        services.jobs,
        services.settings.retention,
        **queues,
    )


def test_big_presigned_packs_go_to_the_verifier_after_head_moved(backend: Services) -> None:
    sqs, url = sqs_queue("verify")
    big = os.urandom(walk.INLINE_VERIFY_MAX_BYTES + 1)  # incompressible: the pack stays that big
    root = tree_bytes([file_entry("big", [blob_hash(big)])])
    big_pack = store_pack(backend, "alpha", [("data", big)])
    verified_big = store_pack(backend, "alpha", [("data", big + b"!")], state="verified")
    trees = store_pack(backend, "alpha", [("tree", root)])
    committer = committer_with_queues(backend, verify_queue=VerifyQueue(url, sqs))
    outcome = committer.start(
        "alpha", commit_body(blob_hash(root), packs=[big_pack, verified_big, trees]), Budget(PLENTY)
    )
    assert outcome.status_code == 201
    assert received(sqs, url) == [{"packs": [big_pack.pack_id], "source": outcome.body["manifest_id"]}]
    record = backend.registry.get(big_pack.pack_id)
    assert record is not None and record.state == "presigned"  # the verifier's to do


def test_a_queue_that_refuses_does_not_undo_the_commit(backend: Services) -> None:
    big = os.urandom(walk.INLINE_VERIFY_MAX_BYTES + 1)
    root = tree_bytes([file_entry("big", [blob_hash(big)])])
    packs = [store_pack(backend, "alpha", [("data", big)]), store_pack(backend, "alpha", [("tree", root)])]
    committer = committer_with_queues(backend, verify_queue=VerifyQueue("https://nowhere/queue", None))
    outcome = committer.start("alpha", commit_body(blob_hash(root), packs=packs), Budget(PLENTY))
    assert outcome.status_code == 201
    assert backend.catalogue.head("alpha") == outcome.body["manifest_id"]


def test_used_packs_locked_short_of_the_manifest_get_extension_requests(backend: Services) -> None:
    sqs, url = sqs_queue("retention")
    content = b"kept long"
    root = tree_bytes([file_entry("f", [blob_hash(content)])])
    short = build_pack([("data", content)])
    put_pack_object(backend, short)
    backend.registry.record_presigned(short.pack_id, "alpha", len(short.data), "2026-01-01T00:00:00Z")
    trees = store_pack(backend, "alpha", [("tree", root)])  # locked to 2030: needs nothing
    committer = committer_with_queues(backend, retention_queue=RetentionQueue(url, sqs))
    outcome = committer.start("alpha", commit_body(blob_hash(root), packs=[short, trees]), Budget(PLENTY))
    assert outcome.status_code == 201
    [request] = received(sqs, url)
    assert request["packs"] == [short.pack_id]
    assert parse_iso_utc(request["retain_until"]) == parse_iso_utc(outcome.body["retain_until"])


def test_host_may_lengthen_retention_but_not_shorten_it(backend: Services) -> None:
    longer = backend.committer.start("alpha", commit_body(None, days_retained=100), Budget(PLENTY))
    shorter = backend.committer.start(
        "alpha", commit_body(None, parent=longer.body["manifest_id"], days_retained=1), Budget(PLENTY)
    )
    now = datetime.now(timezone.utc)
    assert parse_iso_utc(longer.body["retain_until"]) > now + timedelta(days=99)
    assert parse_iso_utc(shorter.body["retain_until"]) > now + timedelta(days=29)


def test_a_refused_pack_the_manifest_does_not_need_does_not_stop_it(backend: Services) -> None:
    tree = HostTree(backend)
    foreign = store_pack(backend, "beta", [("data", b"beta's file")])
    outcome = backend.committer.start(
        "alpha", commit_body(tree.root_hash, packs=[*tree.packs, foreign]), Budget(PLENTY)
    )
    assert outcome.status_code == 201


def test_verify_messages_hold_at_most_300_packs_each(backend: Services) -> None:
    sqs, url = sqs_queue("verify-many")
    pack_ids = [blob_hash(str(number).encode()) for number in range(650)]
    assert VerifyQueue(url, sqs).request([*pack_ids, *pack_ids[:5]], "m1") == 3
    bodies = received(sqs, url)
    assert sorted(len(body["packs"]) for body in bodies) == [50, 300, 300]
    assert sorted(pack for body in bodies for pack in body["packs"]) == sorted(pack_ids)
    assert {body["source"] for body in bodies} == {"m1"}


def test_the_verify_queue_comes_from_the_environment(backend: Services) -> None:
    sqs, url = sqs_queue("verify-env")
    assert verify_queue_from_environment({}, lambda: sqs) is None
    queue = verify_queue_from_environment({"VERIFY_QUEUE_URL": url}, lambda: sqs)
    assert queue is not None and queue.request(["a" * 64], "m2") == 1
    assert received(sqs, url) == [{"packs": ["a" * 64], "source": "m2"}]


def test_s3_failing_is_no_finding_about_a_pack(backend: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk, "INLINE_VERIFY_MAX_BYTES", 0)  # trailers and trees read by ranges
    tree = HostTree(backend)

    def s3_down(*_: Any) -> bytes:
        raise ClientError(
            {"Error": {"Code": "InternalError"}, "ResponseMetadata": {"HTTPStatusCode": 500}}, "GetObject"
        )

    monkeypatch.setattr(backend.store, "read_range", s3_down)
    with pytest.raises(ClientError):
        backend.committer.start("alpha", commit_body(tree.root_hash, packs=tree.packs), Budget(PLENTY))
    for pack in tree.packs:
        record = backend.registry.get(pack.pack_id)
        assert record is not None and record.state == "presigned"
    assert backend.catalogue.head("alpha") is None


def test_a_job_refusing_many_blobs_reports_the_first_thousand(backend: Services) -> None:
    lost = sorted(blob_hash(f"never sent {number}".encode()) for number in range(1200))
    inner = tree_bytes([file_entry(f"f{number}", [blob]) for number, blob in enumerate(lost)])
    root = tree_bytes([dir_entry("inner", blob_hash(inner))])
    packs = [store_pack(backend, "alpha", [("tree", inner), ("tree", root)])]
    started = backend.committer.start("alpha", commit_body(blob_hash(root), packs=packs), Budget(0))
    assert started.status_code == 202
    failed = backend.committer.resume("alpha", started.body["job_id"], Budget(0))
    assert (failed.status_code, failed.body["missing"]) == (422, lost[:1000])
    assert "1200 blobs are not stored" in failed.body["message"]
    again = backend.committer.resume("alpha", started.body["job_id"], Budget(0))
    assert (again.status_code, again.body["missing"]) == (422, lost[:1000])


def nested(leaf: bytes, depth: int) -> list[bytes]:
    """Trees of a chain of `depth` directories down to a file holding `leaf`, the root last."""
    trees = [tree_bytes([file_entry("leaf", [blob_hash(leaf)]), file_entry("same", [blob_hash(b"same")])])]
    for level in range(depth):
        trees.append(tree_bytes([dir_entry(f"level{level}", blob_hash(trees[-1]))]))
    return trees


def test_a_deep_one_file_change_reads_the_parents_path_in_one_get(backend: Services) -> None:
    old_trees = nested(b"old leaf", depth=5)
    old_pack = store_pack(
        backend, "alpha", [("data", b"old leaf"), ("data", b"same"), *(("tree", t) for t in old_trees)]
    )
    parent = backend.committer.start(
        "alpha", commit_body(blob_hash(old_trees[-1]), packs=[old_pack]), Budget(PLENTY)
    )
    new_trees = nested(b"new leaf", depth=5)
    new_pack = store_pack(backend, "alpha", [("data", b"new leaf"), *(("tree", t) for t in new_trees)])
    body = commit_body(
        blob_hash(new_trees[-1]),
        parent=parent.body["manifest_id"],
        packs=[new_pack],
        locations={**locations_of(old_pack), **locations_of(new_pack)},
    )
    gets = KeyedGets(backend)
    assert backend.committer.start("alpha", body, Budget(PLENTY)).status_code == 201
    assert sorted(gets.keys) == sorted([f"packs/{new_pack.pack_id}", f"packs/{old_pack.pack_id}"])


def test_more_packs_than_one_batch_get_holds_are_all_read(backend: Services) -> None:
    contents = [f"file {number}".encode() for number in range(150)]
    packs = [store_pack(backend, "alpha", [("data", content)]) for content in contents]
    root = tree_bytes([file_entry(f"f{number}", [blob_hash(c)]) for number, c in enumerate(contents)])
    packs.append(store_pack(backend, "alpha", [("tree", root)]))  # the last listed: past the first batch
    counter = CallCounter(backend.registry.client)
    outcome = backend.committer.start("alpha", commit_body(blob_hash(root), packs=packs), Budget(PLENTY))
    assert outcome.status_code == 201
    assert counter.calls.count("BatchGetItem") == 2  # HEAD, epoch and 98 packs; then the other 53
    # 20 small presigned packs at most are verified inline; the others go to the verifier.
    states = [record.state for record in backend.registry.get_many(p.pack_id for p in packs).values()]
    assert states.count("verified") == 20


def test_a_first_commit_reads_all_its_trees_in_one_get_not_one_per_level(backend: Services) -> None:
    trees = nested(b"leaf", depth=8)
    filler = os.urandom(walk.INLINE_VERIFY_MAX_BYTES)  # a pack too big to be read whole and verified inline
    pack = store_pack(
        backend,
        "alpha",
        [("data", filler), ("data", b"leaf"), ("data", b"same"), *(("tree", tree) for tree in trees)],
    )
    gets = KeyedGets(backend)
    body = commit_body(blob_hash(trees[-1]), packs=[pack])
    assert backend.committer.start("alpha", body, Budget(PLENTY)).status_code == 201
    # The trailer, then the nine trees (one level after another) in one ranged GET.
    assert gets.keys == [f"packs/{pack.pack_id}"] * 2
