"""admin rebuild-index against moto S3 and DynamoDB: the pack registry comes back from the bucket alone."""

from __future__ import annotations

import hashlib
import sys
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from provision_testkit import REGION, DeployedPackage
from s3_sysbackup.cli import main
from s3_sysbackup.provision.rebuild_index import UNREACHED_HOST, assign_hosts, rebuild_index
from sysbackup_backend.registry import PackRecord, PackRegistry
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import Manifest, SnapshotRecord, encode_manifest, new_manifest_id
from sysbackup_domain.packs import TRAILER_TAIL_BYTES

# The content builders live with the backend tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from sysbackup_testkit import (
    BuiltPack,
    build_pack,
    dir_entry,
    file_entry,
    stream_index_bytes,
    tree_bytes,
)

LOCKED_UNTIL = datetime(2031, 5, 1, tzinfo=timezone.utc)


@pytest.fixture
def bucket(deployed_package: DeployedPackage) -> str:
    boto3.client("s3").create_bucket(
        Bucket=deployed_package.bucket,
        CreateBucketConfiguration={"LocationConstraint": REGION},
        ObjectLockEnabledForBucket=True,
    )
    return deployed_package.bucket


@pytest.fixture
def registry(deployed_package: DeployedPackage) -> PackRegistry:
    table = boto3.client("cloudformation").describe_stack_resource(
        StackName=deployed_package.package, LogicalResourceId="BlobIndexTable"
    )["StackResourceDetail"]["PhysicalResourceId"]
    return PackRegistry(table, boto3.resource("dynamodb").meta.client)


def put_pack(bucket: str, pack: BuiltPack, data: bytes | None = None) -> str:
    """The pack's object (locked, as presigned uploads are); `data` stores other bytes under their hash."""
    body = pack.data if data is None else data
    pack_id = hashlib.sha256(body).hexdigest()
    boto3.client("s3").put_object(
        Bucket=bucket,
        Key=f"packs/{pack_id}",
        Body=body,
        ObjectLockMode="GOVERNANCE",
        ObjectLockRetainUntilDate=LOCKED_UNTIL,
    )
    return pack_id


def put_manifest(
    bucket: str, host: str, root: str | None, snapshot_index: str | None = None, folder: str | None = None
) -> str:
    """A manifest of `host` stored under `manifests/<folder or host>/`; its key."""
    created = datetime(2026, 11, 22, 2, 0, tzinfo=timezone.utc)
    snapshots = ()
    if snapshot_index is not None:
        snapshots = (SnapshotRecord("postgresql", "pg_dumpall", "psql", 10, snapshot_index, 0),)
    manifest = Manifest(
        version=1,
        id=new_manifest_id(created),
        host=host,
        parent=None,
        created=created,
        retain_until=LOCKED_UNTIL,
        root=root,
        snapshots=snapshots,
        warnings=(),
        stats={},
    )
    key = f"manifests/{folder or host}/{manifest.id}.json"
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=encode_manifest(manifest))
    return key


def host_backup(bucket: str, host: str, files: dict[str, bytes]) -> BuiltPack:
    """One pack holding a root tree, a subdirectory and the files' contents, and a manifest using it."""
    sub = tree_bytes([file_entry(name, [blob_hash(content)]) for name, content in files.items()])
    root = tree_bytes([dir_entry("etc", blob_hash(sub))])
    pack = build_pack([("tree", root), ("tree", sub), *(("data", content) for content in files.values())])
    put_pack(bucket, pack)
    put_manifest(bucket, host, blob_hash(root))
    return pack


def record(registry: PackRegistry, pack_id: str) -> PackRecord:
    found = registry.get(pack_id)
    assert found is not None, f"no item for {pack_id}"
    return found


def run_rebuild(deployed_package: DeployedPackage, *extra: str) -> int:
    return main(["admin", "rebuild-index", "--package", deployed_package.package, "--region", REGION, *extra])


# --- host assignment -------------------------------------------------------------------------------------


def test_a_blob_held_once_names_its_pack() -> None:
    given, guessed = assign_hosts(
        {"alpha": {"a1", "a2"}, "beta": {"b1"}}, {"P": ["a1", "a2", "x"], "Q": ["b1"]}
    )
    assert given == {"P": {"alpha"}, "Q": {"beta"}}
    assert guessed == {}


def test_a_shared_blob_names_the_holder_without_other_hosts_blobs() -> None:
    # "same" is in both hosts' packs; each host gets its own, not the other's (whatever the ids' order).
    packs = {"P": ["same", "beta only"], "Q": ["same", "alpha only"]}
    given, guessed = assign_hosts({"alpha": {"same", "alpha only"}, "beta": {"same"}}, packs)
    assert given == {"P": {"beta"}, "Q": {"alpha"}}
    assert guessed == {}
    # Blobs nobody reaches any more are nobody's: they do not count against a holder.
    given, _ = assign_hosts({"alpha": {"same"}, "beta": {"same", "beta only"}}, packs)
    assert given == {"P": {"beta"}, "Q": {"alpha"}}


def test_byte_identical_packs_of_two_hosts_are_given_to_both() -> None:
    given, guessed = assign_hosts({"alpha": {"x", "y"}, "beta": {"x", "y"}}, {"P": ["x", "y"]})
    assert given == {"P": {"alpha", "beta"}} and guessed == {}


def test_a_holder_with_other_hosts_blobs_is_a_guess() -> None:
    packs = {"P": ["same", "beta's"], "Q": ["same", "gamma's"]}
    given, guessed = assign_hosts({"alpha": {"same"}, "beta": {"beta's"}, "gamma": {"gamma's"}}, packs)
    assert given["P"] == {"alpha", "beta"} and given["Q"] == {"gamma"}
    assert guessed == {"P": {"alpha"}}


# --- the command -----------------------------------------------------------------------------------------


def test_rebuilds_each_packs_item_and_hosts_from_the_manifests(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha = host_backup(bucket, "alpha", {"hosts": b"127.0.0.1 alpha\n", "motd": b"welcome\n"})
    beta = host_backup(bucket, "beta", {"hosts": b"127.0.0.1 beta\n"})
    orphan = build_pack([("data", b"never committed")])
    put_pack(bucket, orphan)
    boto3.client("s3").put_object(Bucket=bucket, Key="packs/README", Body=b"not a pack")

    assert run_rebuild(deployed_package) == 0

    for pack, host in ((alpha, "alpha"), (beta, "beta")):
        item = record(registry, pack.pack_id)
        assert (item.host, item.hosts, item.size, item.state) == (host, {host}, len(pack.data), "presigned")
        assert item.retain_until == "2031-05-01T00:00:00Z"
    assert record(registry, orphan.pack_id).hosts == {UNREACHED_HOST}
    out = capsys.readouterr().out
    assert "3 packs recorded (0 verified, trailers trusted" in out
    assert "2 manifests walked, 2 hosts, 1 unreached, 0 corrupt, 1 skipped" in out
    assert "host alpha: 1 packs" in out
    assert "skipped packs/README: not named by a SHA-256" in out


def test_snapshot_chunks_and_packs_reached_only_through_other_packs_are_found(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    chunks = [b"dump part one " * 50, b"dump part two " * 50]
    data_pack = build_pack([("data", chunk) for chunk in chunks])
    index_pack = build_pack([("data", stream_index_bytes([blob_hash(chunk) for chunk in chunks]))])
    put_pack(bucket, data_pack)
    put_pack(bucket, index_pack)
    put_manifest(bucket, "db-1", None, snapshot_index=index_pack.entries[0].hash)
    assert run_rebuild(deployed_package) == 0
    assert record(registry, data_pack.pack_id).hosts == {"db-1"}
    assert record(registry, index_pack.pack_id).hosts == {"db-1"}


def test_trailer_mode_reads_tails_trailers_and_the_nodes_only(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    big = build_pack([("data", hashlib.sha512(str(n).encode()).digest() * 3000) for n in range(3)])
    put_pack(bucket, big)
    report = rebuild_index(boto3.client("s3"), bucket, registry, verify=False)
    trailer_length = int.from_bytes(big.data[-TRAILER_TAIL_BYTES:-8], "big")
    assert report.bytes_read == TRAILER_TAIL_BYTES + trailer_length
    assert report.unreached == [big.pack_id]


def test_verify_marks_good_packs_verified_and_an_altered_one_corrupt(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    good = host_backup(bucket, "alpha", {"intact": b"intact content " * 100})
    victim = build_pack([("data", b"x" * 4000)])
    altered = bytearray(victim.data)
    altered[victim.entries[0].offset] ^= 0xFF
    lying_id = put_pack(bucket, victim, bytes(altered))

    assert run_rebuild(deployed_package, "--verify") == 1

    item = record(registry, good.pack_id)
    assert (item.state, item.blob_count) == ("verified", len(good.entries))
    lying = record(registry, lying_id)
    assert lying.state == "corrupt" and lying.corrupt_reason
    out = capsys.readouterr().out
    assert "2 packs recorded (1 verified)" in out and f"corrupt {lying_id}:" in out


def test_without_verify_an_altered_blob_goes_unnoticed(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    """Documents why --verify exists: trailers alone cannot reveal altered blob bytes."""
    victim = build_pack([("data", b"y" * 4000)])
    altered = bytearray(victim.data)
    altered[victim.entries[0].offset] ^= 0xFF
    lying_id = put_pack(bucket, victim, bytes(altered))
    assert run_rebuild(deployed_package) == 0
    assert record(registry, lying_id).state == "presigned"


def test_an_object_that_is_not_a_pack_is_recorded_corrupt(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    garbage = build_pack([("data", b"z")])
    garbage_id = put_pack(bucket, garbage, b"\x00" * 64)
    assert run_rebuild(deployed_package) == 1
    item = record(registry, garbage_id)
    assert item.state == "corrupt" and "magic" in (item.corrupt_reason or "")


def test_a_tree_no_pack_holds_is_reported(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    lost_root = blob_hash(b"a root tree whose pack is gone")
    put_manifest(bucket, "alpha", lost_root)
    assert run_rebuild(deployed_package) == 1
    assert f"unreadable node {lost_root}: no pack holds it" in capsys.readouterr().out


def test_a_manifest_outside_its_hosts_folder_grants_nothing(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    pack = build_pack([("tree", tree_bytes([file_entry("f", [blob_hash(b"f")])])), ("data", b"f")])
    put_pack(bucket, pack)
    misplaced = put_manifest(bucket, "mallory", pack.entries[0].hash, folder="alpha")
    boto3.client("s3").put_object(Bucket=bucket, Key="manifests/alpha/notes.txt", Body=b"hello")
    report = rebuild_index(boto3.client("s3"), bucket, registry, verify=False)
    assert record(registry, pack.pack_id).hosts == {UNREACHED_HOST}
    assert report.skipped[misplaced] == "names host 'mallory' outside its folder"
    assert report.skipped["manifests/alpha/notes.txt"].startswith("not a manifest")
    assert report.manifests_read == 0


def test_existing_items_keep_their_state_and_gain_hosts(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    shared = host_backup(bucket, "alpha", {"same": b"the same file on two hosts\n"})
    root = shared.entries[0].hash  # host_backup adds the root tree first
    put_manifest(bucket, "beta", root)  # beta backed up byte-identical files: the same pack
    registry.record_presigned(shared.pack_id, "alpha", len(shared.data), "2030-01-01T00:00:00Z")
    assert registry.mark_verified(shared.pack_id, len(shared.entries))
    known_bad = build_pack([("data", b"found corrupt by the verifier " * 9)])
    put_pack(bucket, known_bad)
    registry.record_presigned(known_bad.pack_id, "alpha", len(known_bad.data), "2030-01-01T00:00:00Z")
    assert registry.mark_corrupt(known_bad.pack_id, "blob hashes wrong")
    gets: list[str] = []
    s3 = boto3.client("s3")
    s3.meta.events.register(
        "provide-client-params.s3.GetObject", lambda params, **_: gets.append(params["Key"])
    )

    report = rebuild_index(s3, bucket, registry, verify=False)

    item = record(registry, shared.pack_id)
    assert (item.state, item.hosts, item.retain_until) == (
        "verified",
        {"alpha", "beta"},
        "2030-01-01T00:00:00Z",
    )
    assert record(registry, known_bad.pack_id).state == "corrupt"
    assert f"packs/{known_bad.pack_id}" not in gets
    assert report.skipped == {f"packs/{known_bad.pack_id}": "recorded corrupt already"}


def test_explicit_bucket_and_table_need_no_stack(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry
) -> None:
    pack = host_backup(bucket, "alpha", {"explicit": b"explicit\n"})
    argv = ["admin", "rebuild-index", "--package", "absent-pkg", "--region", REGION]
    assert main([*argv, "--bucket", bucket, "--table", registry.table_name]) == 0
    assert record(registry, pack.pack_id).hosts == {"alpha"}


def test_an_unknown_package_is_a_clear_error(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["admin", "rebuild-index", "--package", "nope", "--region", REGION]) == 1
    assert "no export 'nope-BucketName'" in capsys.readouterr().err


def test_an_archived_pack_is_skipped_not_condemned(
    deployed_package: DeployedPackage, bucket: str, registry: PackRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    pack = build_pack([("data", b"cold data\n" * 50)])
    boto3.client("s3").put_object(
        Bucket=bucket, Key=f"packs/{pack.pack_id}", Body=pack.data, StorageClass="GLACIER"
    )
    assert run_rebuild(deployed_package) == 0
    assert registry.get(pack.pack_id) is None
    assert f"skipped packs/{pack.pack_id}: archived" in capsys.readouterr().out
