"""The pack store against moto: presigned PUT headers, heads, ranged reads, locked manifests."""

from __future__ import annotations

import base64
import hashlib
import os
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlparse

import pytest
from botocore.exceptions import ClientError
from sysbackup_backend import store
from sysbackup_backend.api import Services
from sysbackup_backend.store import manifest_key, pack_checksum
from sysbackup_testkit import S3CallCounter, build_pack, put_pack_object

UNTIL = datetime(2031, 5, 6, 7, 8, 9, tzinfo=timezone.utc)


def test_presigned_put_pins_key_length_checksum_lock_and_if_none_match(backend: Services) -> None:
    pack_id = hashlib.sha256(b"pack bytes").hexdigest()
    upload = backend.store.presign_pack_put(pack_id, 1234, UNTIL, "COMPLIANCE", 600)
    headers = {name.lower(): value for name, value in upload.headers.items()}
    assert headers == {
        "content-length": "1234",
        "x-amz-sdk-checksum-algorithm": "SHA256",
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(b"pack bytes").digest()).decode(),
        "x-amz-object-lock-mode": "COMPLIANCE",
        "x-amz-object-lock-retain-until-date": "2031-05-06T07:08:09Z",
        "if-none-match": "*",
    }
    query = parse_qs(urlparse(upload.url).query)
    assert set(query["X-Amz-SignedHeaders"][0].split(";")) == {*headers, "host"}
    assert query["X-Amz-Expires"] == ["600"]
    assert urlparse(upload.url).path.endswith(f"/packs/{pack_id}")


def test_head_and_ranged_read_of_a_pack(backend: Services) -> None:
    pack = build_pack([("data", b"0123456789" * 10)])
    assert backend.store.head_pack(pack.pack_id) is None
    put_pack_object(backend, pack)
    head = backend.store.head_pack(pack.pack_id)
    assert head is not None
    assert (head.size, head.checksum_sha256) == (len(pack.data), pack_checksum(pack.pack_id))
    assert backend.store.read_range(f"packs/{pack.pack_id}", 3, 7) == pack.data[3:8]
    with pytest.raises(ValueError):
        backend.store.read_range(f"packs/{pack.pack_id}", 7, 3)


def test_manifest_is_written_once_and_locked(backend: Services) -> None:
    key = manifest_key("alpha", "20261121T235000Z-0123abcd")
    backend.store.put_manifest(key, b'{"version":1}', UNTIL, "GOVERNANCE")
    head = backend.store.client.head_object(Bucket=backend.store.bucket, Key=key)
    assert (head["ObjectLockMode"], head["ObjectLockRetainUntilDate"]) == ("GOVERNANCE", UNTIL)
    with pytest.raises(ClientError) as refused:
        backend.store.put_manifest(key, b'{"version":2}', UNTIL, "GOVERNANCE")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert backend.store.read(key) == b'{"version":1}'


@pytest.mark.parametrize(("read_bytes", "gets"), [(256 * 1024, 1), (100, 2)])
def test_a_pack_trailer_is_one_suffix_get_unless_it_is_longer(
    backend: Services, monkeypatch: pytest.MonkeyPatch, read_bytes: int, gets: int
) -> None:
    monkeypatch.setattr(store, "TRAILER_READ_BYTES", read_bytes)
    pack = build_pack([("data", os.urandom(3000)), ("data", b"x" * 5000), ("tree", b"{}")])
    put_pack_object(backend, pack)
    counter = S3CallCounter(backend.store.client, "GetObject")

    entries = backend.store.read_pack_trailer(pack.pack_id, len(pack.data))

    assert entries == pack.entries
    assert counter.count == gets
