"""admin rebuild-index against moto S3 and DynamoDB: the index comes back from the packs alone."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import boto3
import pytest
from provision_testkit import REGION, DeployedPackage
from s3_sysbackup.cli import main
from s3_sysbackup.provision.rebuild_index import rebuild_index
from sysbackup_backend.index import BlobIndex
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import TRAILER_TAIL_BYTES, PackEntry, PackWriter


def make_pack(*contents: bytes) -> tuple[str, bytes, list[PackEntry]]:
    writer = PackWriter()
    for content in contents:
        writer.add(blob_hash(content), "data", content)
    data, entries = writer.finish()
    return hashlib.sha256(data).hexdigest(), data, entries


@pytest.fixture
def bucket(deployed_package: DeployedPackage) -> str:
    boto3.client("s3").create_bucket(
        Bucket=deployed_package.bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    return deployed_package.bucket


@pytest.fixture
def index(deployed_package: DeployedPackage) -> BlobIndex:
    table = boto3.client("cloudformation").describe_stack_resource(
        StackName=deployed_package.package, LogicalResourceId="BlobIndexTable"
    )["StackResourceDetail"]["PhysicalResourceId"]
    return BlobIndex(table, boto3.resource("dynamodb").meta.client)


def put_pack(bucket: str, pack_id: str, data: bytes) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key=f"packs/{pack_id}", Body=data)


def verified_item(index: BlobIndex, blob: str) -> dict[str, Any] | None:
    return index.client.get_item(
        TableName=index.table_name, Key={"pk": f"blob#{blob}", "sk": "verified"}
    ).get("Item")


def run_rebuild(deployed_package: DeployedPackage, *extra: str) -> int:
    return main(["admin", "rebuild-index", "--package", deployed_package.package, "--region", REGION, *extra])


def test_rebuilds_every_blobs_location_from_the_trailers(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    packs = [make_pack(os.urandom(3000), b"small file\n"), make_pack(os.urandom(5000))]
    for pack_id, data, _ in packs:
        put_pack(bucket, pack_id, data)
    boto3.client("s3").put_object(Bucket=bucket, Key="packs/README", Body=b"not a pack")

    assert run_rebuild(deployed_package) == 0

    for pack_id, _, entries in packs:
        for entry in entries:
            item = verified_item(index, entry.hash)
            assert item is not None
            assert (item["pack_id"], item["offset"], item["length"], item["codec"], item["kind"]) == (
                pack_id,
                entry.offset,
                entry.length,
                entry.codec,
                entry.kind,
            )
        assert (index.get_pack(pack_id) or {})["state"] == "verified"
    out = capsys.readouterr().out
    assert "2 packs indexed (trailers trusted), 3 blobs newly verified" in out
    assert "skipped packs/README: not named by a SHA-256" in out


def test_trailer_mode_reads_only_the_tails_and_trailers(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex
) -> None:
    pack_id, data, _ = make_pack(os.urandom(200_000))
    put_pack(bucket, pack_id, data)
    report = rebuild_index(boto3.client("s3"), bucket, index, verify=False)
    trailer_length = int.from_bytes(data[-TRAILER_TAIL_BYTES:-8], "big")
    assert report.bytes_read == TRAILER_TAIL_BYTES + trailer_length
    assert report.packs_indexed == 1


def test_verify_rehashes_and_records_a_pack_whose_blob_was_altered(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_pack(b"intact content " * 100)
    _, data, entries = make_pack(b"x" * 4000 + os.urandom(100))
    # A lying pack: right trailer, altered blob bytes, stored under the hash of what is there now.
    altered = bytearray(data)
    altered[entries[0].offset] ^= 0xFF
    lying_id = hashlib.sha256(altered).hexdigest()
    put_pack(bucket, lying_id, bytes(altered))
    put_pack(bucket, good[0], good[1])

    assert run_rebuild(deployed_package, "--verify") == 1

    assert verified_item(index, entries[0].hash) is None
    assert (index.get_pack(lying_id) or {})["state"] == "corrupt"
    assert verified_item(index, good[2][0].hash) is not None
    captured = capsys.readouterr()
    assert f"corrupt pack {lying_id}" in captured.err
    assert "1 packs indexed (re-hashed)" in captured.out and "1 corrupt" in captured.out


def test_without_verify_the_same_lying_pack_is_trusted(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex
) -> None:
    """Documents why --verify exists: trailers alone cannot reveal altered blob bytes."""
    _, data, entries = make_pack(b"y" * 4000 + os.urandom(100))
    altered = bytearray(data)
    altered[entries[0].offset] ^= 0xFF
    put_pack(bucket, hashlib.sha256(altered).hexdigest(), bytes(altered))
    assert run_rebuild(deployed_package) == 0
    assert verified_item(index, entries[0].hash) is not None


def test_an_object_that_is_not_a_pack_is_recorded_corrupt(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex
) -> None:
    garbage = os.urandom(64)
    garbage_id = hashlib.sha256(garbage).hexdigest()
    put_pack(bucket, garbage_id, garbage)
    assert run_rebuild(deployed_package) == 1
    item = index.get_pack(garbage_id) or {}
    assert item["state"] == "corrupt" and "magic" in item["corrupt_reason"]


def test_a_blob_verified_elsewhere_keeps_its_location_and_corrupt_packs_stay_corrupt(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex
) -> None:
    shared = b"the same file on two hosts\n" * 10
    first_id, first_data, first_entries = make_pack(shared)
    second_id, second_data, _ = make_pack(shared, b"another\n")
    index.record_verified(first_id, first_entries)
    condemned_id, condemned_data, condemned_entries = make_pack(os.urandom(700))
    index.record_corrupt(condemned_id, "found corrupt by the verifier")
    for pack_id, data in ((first_id, first_data), (second_id, second_data), (condemned_id, condemned_data)):
        put_pack(bucket, pack_id, data)

    assert run_rebuild(deployed_package) == 0

    assert (verified_item(index, blob_hash(shared)) or {})["pack_id"] == first_id
    assert verified_item(index, condemned_entries[0].hash) is None
    assert (index.get_pack(condemned_id) or {})["state"] == "corrupt"


def test_explicit_bucket_and_table_need_no_stack(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex, tmp_path: Path
) -> None:
    pack_id, data, entries = make_pack(b"explicit\n")
    put_pack(bucket, pack_id, data)
    argv = ["admin", "rebuild-index", "--package", "absent-pkg", "--region", REGION]
    assert main([*argv, "--bucket", bucket, "--table", index.table_name]) == 0
    assert verified_item(index, entries[0].hash) is not None


def test_an_unknown_package_is_a_clear_error(aws: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["admin", "rebuild-index", "--package", "nope", "--region", REGION]) == 1
    assert "no export 'nope-BucketName'" in capsys.readouterr().err


def test_an_archived_pack_is_skipped_not_condemned(
    deployed_package: DeployedPackage, bucket: str, index: BlobIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    pack_id, data, entries = make_pack(b"cold data\n" * 50)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"packs/{pack_id}", Body=data, StorageClass="GLACIER")
    assert run_rebuild(deployed_package) == 0
    assert index.get_pack(pack_id) is None
    assert verified_item(index, entries[0].hash) is None
    assert f"skipped packs/{pack_id}: archived" in capsys.readouterr().out
