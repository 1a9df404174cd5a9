"""Fixtures and builders shared by the backend and function unit tests (moto in-process)."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import boto3
import pytest
from moto import mock_aws
from sysbackup_backend import api, clients, pack_access, settings
from sysbackup_backend.registry import BY_HOST_INDEX
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import encode_stream_index
from sysbackup_domain.packs import PackEntry, PackWriter
from sysbackup_domain.tree import Tree, TreeEntry, encode_tree

REGION = "us-east-1"
ACCOUNT = "123456789012"
BUCKET = "test-backups"
RESTORE_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/sysbackup-restore"
FUNCTIONS_DIR = Path(__file__).resolve().parents[3] / "functions"

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "BUCKET_NAME": BUCKET,
    "BLOB_INDEX_TABLE": "blob-index",
    "MANIFEST_TABLE": "manifests",
    "JOBS_TABLE": "jobs",
    "DAYS_RETAINED": "30",
    "MAX_DAYS_RETAINED": "365",
    "LOCK_MODE": "GOVERNANCE",
    "UPLOAD_URL_EXPIRY_SECONDS": "900",
    "RESTORE_PRINCIPAL_ARNS": RESTORE_ROLE_ARN,
    "POWERTOOLS_SERVICE_NAME": "s3-sysbackup-test",
    "POWERTOOLS_METRICS_NAMESPACE": "s3-sysbackup-test",
    "POWERTOOLS_TRACE_DISABLED": "true",
}


def _reset_caches() -> None:
    settings.get_settings.cache_clear()
    clients.reset_clients()
    api.services.cache_clear()
    pack_access.pack_access.cache_clear()


def _create_resources() -> None:
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    tables = {
        ENV["BLOB_INDEX_TABLE"]: [("pk", "HASH"), ("sk", "RANGE")],
        ENV["MANIFEST_TABLE"]: [("host", "HASH"), ("manifest_id", "RANGE")],
        ENV["JOBS_TABLE"]: [("job_id", "HASH")],
    }
    indexes = {ENV["BLOB_INDEX_TABLE"]: {BY_HOST_INDEX: [("host", "HASH"), ("pk", "RANGE")]}}
    for name, keys in tables.items():
        index_keys = indexes.get(name, {})
        attributes = {attr for attr, _ in keys} | {attr for gsi in index_keys.values() for attr, _ in gsi}
        extra: dict[str, Any] = {}
        if index_keys:
            extra["GlobalSecondaryIndexes"] = [
                {
                    "IndexName": index_name,
                    "KeySchema": _key_schema(gsi_keys),
                    "Projection": {"ProjectionType": "ALL"},
                }
                for index_name, gsi_keys in index_keys.items()
            ]
        dynamodb.create_table(
            TableName=name,
            KeySchema=_key_schema(keys),
            AttributeDefinitions=[
                {"AttributeName": attr, "AttributeType": "S"} for attr in sorted(attributes)
            ],
            BillingMode="PAY_PER_REQUEST",
            **extra,
        )


def _key_schema(keys: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"AttributeName": attr, "KeyType": kind} for attr, kind in keys]


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[api.Services]:
    """A moto-backed bucket and tables, and the backend services wired to them."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    _reset_caches()
    with mock_aws():
        _create_resources()
        yield api.services()
    _reset_caches()


class S3CallCounter:
    """Counts the calls of one S3 operation (`GetObject`, `HeadObject`) made through a client."""

    def __init__(self, s3_client: Any, operation: str) -> None:
        self.count = 0
        s3_client.meta.events.register(f"before-call.s3.{operation}", self._count)

    def _count(self, **_: Any) -> None:
        self.count += 1


# --- content builders ----------------------------------------------------------------------------------


def file_entry(name: str, content: list[str]) -> TreeEntry:
    return TreeEntry(
        name=name,
        type="file",
        mode=0o644,
        uid=0,
        gid=0,
        user="root",
        group="root",
        mtime_ns=1,
        size=1,
        content=tuple(content),
    )


def dir_entry(name: str, subtree: str) -> TreeEntry:
    return TreeEntry(
        name=name,
        type="dir",
        mode=0o755,
        uid=0,
        gid=0,
        user="root",
        group="root",
        mtime_ns=1,
        subtree=subtree,
    )


def tree_bytes(entries: list[TreeEntry]) -> bytes:
    return encode_tree(Tree(entries=tuple(sorted(entries, key=lambda entry: entry.name.encode()))))


def stream_index_bytes(chunks: list[str]) -> bytes:
    return encode_stream_index(chunks)


@dataclass
class BuiltPack:
    pack_id: str
    data: bytes
    entries: list[PackEntry]


def build_pack(blobs: list[tuple[str, bytes]]) -> BuiltPack:
    """A pack of (kind, plaintext) blobs."""
    writer = PackWriter()
    for kind, plaintext in blobs:
        writer.add(blob_hash(plaintext), kind, plaintext)
    data, entries = writer.finish()
    return BuiltPack(pack_id=hashlib.sha256(data).hexdigest(), data=data, entries=entries)


def put_pack_object(services: api.Services, pack: BuiltPack) -> None:
    """The upload a host does through its presigned URL."""
    services.store.client.put_object(
        Bucket=BUCKET,
        Key=f"packs/{pack.pack_id}",
        Body=pack.data,
        ChecksumAlgorithm="SHA256",
        ChecksumSHA256=base64.b64encode(bytes.fromhex(pack.pack_id)).decode(),
    )


TEST_RETAIN_UNTIL = "2030-01-01T00:00:00Z"
StoredState = Literal["presigned", "verified"]


def store_pack(
    services: api.Services, host: str, blobs: list[tuple[str, bytes]], state: StoredState = "presigned"
) -> BuiltPack:
    """A pack of (kind, plaintext) blobs uploaded by `host`: its object and its registry item as a presign
    and a PUT leave them (`presigned`), or as the commit or the verifier leave them (`verified`)."""
    pack = build_pack(blobs)
    put_pack_object(services, pack)
    services.registry.record_presigned(pack.pack_id, host, len(pack.data), TEST_RETAIN_UNTIL)
    if state == "verified":
        assert services.registry.mark_verified(pack.pack_id, len(pack.entries))
    return pack


# --- events ---------------------------------------------------------------------------------------------


def user_arn(host: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:user/sysbackup/{host}"


def restore_arn(session: str = "operator") -> str:
    return f"arn:aws:sts::{ACCOUNT}:assumed-role/sysbackup-restore/{session}"


def http_event(
    method: str,
    path: str,
    body: Any = None,
    caller_arn: str | None = None,
    query: dict[str, str] | None = None,
    path_parameters: dict[str, str] | None = None,
    raw_body: str | None = None,
) -> dict[str, Any]:
    """An HTTP API (payload 2.0, AWS_IAM) event as API Gateway sends it."""
    text = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": f"{method} {path}",
        "rawPath": path,
        "rawQueryString": "&".join(f"{k}={v}" for k, v in (query or {}).items()),
        "headers": {"content-type": "application/json"},
        "requestContext": {
            "accountId": ACCOUNT,
            "apiId": "api",
            "domainName": "api.example.com",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "192.0.2.1"},
            "requestId": "req-1",
            "routeKey": f"{method} {path}",
            "stage": "$default",
            "time": "21/Nov/2026:23:50:00 +0000",
            "timeEpoch": 1795305000000,
        },
        "isBase64Encoded": False,
    }
    if caller_arn is not None:
        event["requestContext"]["authorizer"] = {
            "iam": {"accessKey": "AKIA", "accountId": ACCOUNT, "userArn": caller_arn, "userId": "AIDA"}
        }
    if text is not None:
        event["body"] = text
    if query:
        event["queryStringParameters"] = query
    if path_parameters:
        event["pathParameters"] = path_parameters
    return event


class FakeLambdaContext:
    function_name = "test-function"
    memory_limit_in_mb = 512
    invoked_function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:test-function"
    aws_request_id = "00000000-0000-0000-0000-000000000000"

    def __init__(self, remaining_ms: int = 30_000) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def load_function(name: str) -> ModuleType:
    """Import functions/<name>/app.py under a unique module name (every function's file is app.py)."""
    spec = importlib.util.spec_from_file_location(f"function_{name}_app", FUNCTIONS_DIR / name / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def response_json(response: dict[str, Any]) -> Any:
    return json.loads(response["body"]) if response.get("body") else None
