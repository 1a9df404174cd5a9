"""The bucket: presigned pack uploads, pack heads and ranged reads, manifests, presigned downloads."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

from botocore.exceptions import ClientError
from sysbackup_domain.packs import (
    PackEntry,
    parse_trailer_bytes,
    read_trailer_bytes,
)

PACKS_PREFIX = "packs/"
MANIFESTS_PREFIX = "manifests/"


TRAILER_READ_BYTES = 256 * 1024


def pack_key(pack_id: str) -> str:
    return f"{PACKS_PREFIX}{pack_id}"


def manifest_key(host: str, manifest_id: str) -> str:
    return f"{MANIFESTS_PREFIX}{host}/{manifest_id}.json"


def pack_checksum(pack_id: str) -> str:
    """x-amz-checksum-sha256 of a pack: its id is the SHA-256 hex of its bytes."""
    return base64.b64encode(bytes.fromhex(pack_id)).decode("ascii")


@dataclass(frozen=True)
class PresignedUpload:
    url: str
    headers: dict[str, str]
    expires_at: datetime


@dataclass(frozen=True)
class ObjectHead:
    size: int
    checksum_sha256: str | None


# S3 error codes meaning "the object (its version, the byte range asked for) is not there".
MISSING_OBJECT_CODES = frozenset({"404", "NoSuchKey", "NoSuchVersion", "InvalidRange"})


def object_missing(error: ClientError) -> bool:
    """True if S3 refused because the object is not there, not because reading it failed."""
    return str(error.response.get("Error", {}).get("Code", "")) in MISSING_OBJECT_CODES


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class PackStore:
    def __init__(self, bucket: str, client: Any) -> None:
        self.bucket = bucket
        self.client = client

    def presign_pack_put(
        self, pack_id: str, size: int, retain_until: datetime, mode: str, expires_in: int
    ) -> PresignedUpload:
        """A PUT URL whose signature pins key, length, checksum, lock headers and If-None-Match: *.

        The headers come from the very request botocore signs, filtered to X-Amz-SignedHeaders, so the
        client is told exactly what the signature covers.
        """
        captured: dict[str, str] = {}

        def capture(request: Any, **_: Any) -> None:
            captured.update({name: str(value) for name, value in request.headers.items()})

        event_name = "before-sign.s3.PutObject"
        handler_id = f"sysbackup-capture-{pack_id}"
        self.client.meta.events.register(event_name, capture, unique_id=handler_id)
        try:
            url = self.client.generate_presigned_url(
                "put_object",
                Params={
                    "Bucket": self.bucket,
                    "Key": pack_key(pack_id),
                    "ContentLength": size,
                    # S3 wants Content-MD5 or x-amz-sdk-checksum-algorithm on any PUT with an Object Lock.
                    "ChecksumAlgorithm": "SHA256",
                    "ChecksumSHA256": pack_checksum(pack_id),
                    "ObjectLockMode": mode,
                    "ObjectLockRetainUntilDate": retain_until,
                    "IfNoneMatch": "*",
                },
                ExpiresIn=expires_in,
            )
        finally:
            self.client.meta.events.unregister(event_name, unique_id=handler_id)
        signed = set(parse_qs(urlparse(url).query).get("X-Amz-SignedHeaders", [""])[0].split(";"))
        headers = {name: value for name, value in captured.items() if name.lower() in signed}
        expected = {
            "content-length",
            "x-amz-sdk-checksum-algorithm",
            "x-amz-checksum-sha256",
            "x-amz-object-lock-mode",
            "x-amz-object-lock-retain-until-date",
            "if-none-match",
        }
        if not expected <= {name.lower() for name in headers}:
            # A botocore change that stops signing one of these would silently weaken the upload contract.
            raise RuntimeError(
                f"presigned PUT does not sign all of {sorted(expected)}: signed {sorted(signed)}"
            )
        return PresignedUpload(
            url=url, headers=headers, expires_at=datetime.now(timezone.utc) + timedelta(seconds=expires_in)
        )

    def head(self, key: str) -> ObjectHead | None:
        """Size and full-object SHA-256 checksum of an object, or None if there is none."""
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as error:
            if _status(error) == 404:
                return None
            raise
        return ObjectHead(size=int(response["ContentLength"]), checksum_sha256=response.get("ChecksumSHA256"))

    def head_pack(self, pack_id: str) -> ObjectHead | None:
        return self.head(pack_key(pack_id))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes start..end inclusive (HTTP Range semantics)."""
        if start < 0 or end < start:
            raise ValueError(f"bad byte range {start}-{end}")
        response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")
        data: bytes = response["Body"].read()
        if len(data) != end - start + 1:
            raise OSError(f"short ranged read of {key}: wanted {end - start + 1} bytes, got {len(data)}")
        return data

    def read_pack_trailer(self, pack_id: str, size: int) -> list[PackEntry]:
        """A pack's validated trailer entries (usually one ranged GET); InvalidDocument if it has none."""
        return parse_trailer_bytes(self.read_pack_trailer_bytes(pack_id, size), size)

    def read_pack_trailer_bytes(self, pack_id: str, size: int) -> bytes:
        """A pack's raw trailer (tail excluded); InvalidDocument if it has none.

        One GET of the pack's last TRAILER_READ_BYTES holds the tail and, nearly always, the whole
        trailer (a 16 MiB pack of small files lists ~2,000 blobs in ~100 KiB); a longer trailer costs
        a second GET for its front. Every commit reads the trailers of the packs its run wrote."""
        key = pack_key(pack_id)
        return read_trailer_bytes(
            lambda start, length: self.read_range(key, start, start + length - 1), size, TRAILER_READ_BYTES
        )

    def read(self, key: str) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=key)
        return bytes(response["Body"].read())

    def put_manifest(self, key: str, body: bytes, retain_until: datetime, mode: str) -> None:
        """Write a manifest once, locked until retain_until; a second write of the key fails."""
        checksum = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType="application/json",
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=checksum,
            ObjectLockMode=mode,
            ObjectLockRetainUntilDate=retain_until,
            IfNoneMatch="*",
        )

    def presign_get(self, key: str, expires_in: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
        )
        return url
