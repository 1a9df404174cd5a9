"""Issue 3: what S3 itself (SeaweedFS here) enforces on a pack upload presigned by the real upload API.

Every URL comes from `POST /packs/presign` called by a host; the host holds no S3 rights of its own, so
the presigned signature is the only thing letting its bytes in (docs/LOCAL_STACK.md, "What this
SeaweedFS enforces").
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import pytest
from s3_sysbackup.api import ApiClient
from sysbackup_local.stack import LocalHost, LocalStack
from test_issue3_support import (
    BuiltPack,
    api_client,
    build_pack,
    object_versions,
    pack_registry,
    presign,
    put,
)


def random_pack(size: int = 4096) -> BuiltPack:
    blob = os.urandom(size)
    return build_pack([(hashlib.sha256(blob).hexdigest(), blob)])


@dataclass(frozen=True)
class Presigned:
    api: ApiClient
    pack: BuiltPack
    upload: dict[str, Any]


@pytest.fixture
def presigned(stack: LocalStack, host_config: LocalHost) -> Presigned:
    """A fresh random pack and the upload `POST /packs/presign` handed the host for it."""
    api = api_client(stack, host_config.identity)
    pack = random_pack()
    [upload] = presign(api, pack)["uploads"]
    return Presigned(api, pack, upload)


def lock_of(stack: LocalStack, key: str) -> dict:
    return stack.s3_client("UploadApiFunction").head_object(
        Bucket=stack.bucket, Key=key, ChecksumMode="ENABLED"
    )


def test_a_body_that_does_not_match_the_signed_checksum_is_rejected(
    stack: LocalStack, presigned: Presigned
) -> None:
    pack, upload = presigned.pack, presigned.upload
    evil = bytearray(pack.data)
    evil[10] ^= 0xFF  # same length, one byte off

    response = put(upload, bytes(evil))

    assert response.status_code == 400, response.text
    assert "BadDigest" in response.text
    assert object_versions(stack, f"packs/{pack.pack_id}") == []


def test_changing_the_headers_or_the_key_breaks_the_signature(
    stack: LocalStack, presigned: Presigned
) -> None:
    pack, upload = presigned.pack, presigned.upload
    headers = {name.lower(): value for name, value in upload["headers"].items()}
    assert headers["if-none-match"] == "*"
    shorter = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    other_mode = "COMPLIANCE" if headers["x-amz-object-lock-mode"] == "GOVERNANCE" else "GOVERNANCE"
    evil = os.urandom(len(pack.data))
    evil_checksum = base64.b64encode(hashlib.sha256(evil).digest()).decode()

    attempts = {
        "other lock mode": put(upload, pack.data, x_amz_object_lock_mode=other_mode),
        "shorter retention": put(upload, pack.data, x_amz_object_lock_retain_until_date=shorter),
        "no lock headers": put(
            upload, pack.data, x_amz_object_lock_mode=None, x_amz_object_lock_retain_until_date=None
        ),
        "no If-None-Match": put(upload, pack.data, if_none_match=None),
        "no checksum": put(upload, pack.data, x_amz_checksum_sha256=None),
        "checksum of an evil body": put(upload, evil, x_amz_checksum_sha256=evil_checksum),
        "a longer body": put(upload, pack.data + b"tail"),
        "another key": put(
            {**upload, "url": upload["url"].replace(pack.pack_id, hashlib.sha256(evil).hexdigest())}, evil
        ),
    }

    for what, response in attempts.items():
        assert response.status_code == 403, (what, response.status_code, response.text)
        assert "SignatureDoesNotMatch" in response.text, (what, response.text)
    assert object_versions(stack, "packs/" + pack.pack_id) == []
    assert object_versions(stack, "packs/" + hashlib.sha256(evil).hexdigest()) == []


def test_a_retried_put_is_a_412_and_never_a_second_locked_version(
    stack: LocalStack, presigned: Presigned
) -> None:
    api, pack, upload = presigned.api, presigned.pack, presigned.upload

    assert put(upload, pack.data).status_code == 200
    retried = put(upload, pack.data)
    # A crashed run's re-run asks again: presign finds the object (HEAD, the item's size) and hands out no
    # URL, so the host sends nothing.
    again = presign(api, pack)

    assert retried.status_code == 412, retried.text
    assert again["uploads"] == [] and again["stored"] == [pack.pack_id], again
    [version] = object_versions(stack, f"packs/{pack.pack_id}")
    assert version["Key"] == f"packs/{pack.pack_id}" and version["Size"] == len(pack.data)


def test_the_stored_pack_carries_the_lock_and_checksum_it_was_presigned_with(
    stack: LocalStack, presigned: Presigned, host_config: LocalHost
) -> None:
    before = dt.datetime.now(dt.timezone.utc)
    pack, upload = presigned.pack, presigned.upload
    headers = {name.lower(): value for name, value in upload["headers"].items()}

    assert put(upload, pack.data).status_code == 200
    head = lock_of(stack, f"packs/{pack.pack_id}")

    parameters = stack.template.parameters
    assert head["ObjectLockMode"] == headers["x-amz-object-lock-mode"] == parameters["LockMode"]
    retained = head["ObjectLockRetainUntilDate"]
    assert retained.strftime("%Y-%m-%dT%H:%M:%SZ") == headers["x-amz-object-lock-retain-until-date"]
    # A pack is locked for the stack's retention plus one fold window, so a normal run needs no extension.
    expected_days = int(parameters["DaysRetained"]) + int(parameters["FoldWindowSeconds"]) / 86400
    days = (retained - before).total_seconds() / 86400
    assert expected_days - 0.01 < days < expected_days + 1
    assert head["ChecksumSHA256"] == headers["x-amz-checksum-sha256"]
    assert head["ContentLength"] == len(pack.data)
    # The registry remembers the presign (host, size, lock): what gc needs to find it if never committed.
    item = pack_registry(stack)[pack.pack_id]
    assert item["host"] == host_config.name and item["hosts"] == {host_config.name}
    assert item["size"] == len(pack.data) and item["state"] == "presigned"


def test_the_lock_holds_against_the_functions_own_identity(stack: LocalStack, presigned: Presigned) -> None:
    """Only gc may bypass governance: not even the upload function can delete a landed pack's version."""
    pack, upload = presigned.pack, presigned.upload
    assert put(upload, pack.data).status_code == 200
    [version] = object_versions(stack, f"packs/{pack.pack_id}")
    s3 = stack.s3_client("UploadApiFunction")

    with pytest.raises(Exception) as refused:
        s3.delete_object(
            Bucket=stack.bucket,
            Key=f"packs/{pack.pack_id}",
            VersionId=version["VersionId"],
            BypassGovernanceRetention=True,
        )

    assert "AccessDenied" in str(refused.value)
    assert [v["VersionId"] for v in object_versions(stack, f"packs/{pack.pack_id}")] == [version["VersionId"]]
