"""What the integration tests share (no tests here): hosts that archive picked paths, signed API clients,
hand-built packs, the pack registry (one item per pack, docs/PACK_INDEX.md) and the bucket as seen by the
stack's own identities."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from botocore.credentials import Credentials
from s3_sysbackup.api import ApiClient
from sysbackup_domain.packs import PackEntry, PackWriter
from sysbackup_local.identities import Identity
from sysbackup_local.stack import LocalHost, LocalStack

REGION = "us-east-1"
QUIET_BASE = os.environ.get("S3SB_TEST_QUIET_DIR", "/var/tmp")


@contextlib.contextmanager
def quiet_directory() -> Iterator[Path]:
    """A directory whose ancestors no other test touches (unlike /tmp): a new entry in an ancestor of a
    picked path changes that ancestor's mtime, hence its tree, and a re-run would rightly send new trees."""
    directory = Path(tempfile.mkdtemp(prefix="s3sb-issue3-", dir=QUIET_BASE))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def api_client(stack: LocalStack, identity: Identity) -> ApiClient:
    """The uploader's own signed client, as `identity`; one attempt, so a refusal is seen as it is."""
    return ApiClient(
        stack.endpoints["api"], REGION, Credentials(identity.access_key, identity.secret_key), attempts=1
    )


def pick(host: LocalHost, paths: list[Path], cache_dir: Path, workers: int | None = None) -> None:
    """The host's only picker prints `paths`; parent cache in `cache_dir`; `workers` file readers."""
    conf = host.config_dir / "conf"
    settings = f"cache_dir = {cache_dir}\n" + (f"workers = {workers}\n" if workers else "")
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\n{settings}", 1))
    picker = host.config_dir / "pickers.d" / "10-picked"
    # printf with %s keeps names as they are; each path is its own argument.
    quoted = " ".join("'" + str(path).replace("'", "'\\''") + "'" for path in paths)
    picker.write_text(f"#!/bin/sh\nprintf '%s\\n' {quoted}\n")
    picker.chmod(0o755)


@dataclass(frozen=True)
class Run:
    process: subprocess.CompletedProcess[str]
    stats: dict[str, Any]

    @property
    def returncode(self) -> int:
        return self.process.returncode


def archive(
    host: LocalHost, stats_path: Path, *extra: str, fault: str | None = None, timeout: float = 900
) -> Run:
    """`s3-sysbackup archive [extra]` as the host's CLI runs it; `fault` sets S3SB_FAULT (test-only crash
    points)."""
    stats_path.unlink(missing_ok=True)
    env = (
        {**os.environ, "S3SB_FAULT": fault}
        if fault
        else {k: v for k, v in os.environ.items() if k != "S3SB_FAULT"}
    )
    process = subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(host.config_dir), "archive", "-q",
         "--stats-json", str(stats_path), *extra],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    return Run(process, stats)


def restore(
    host: LocalHost, target: Path, *extra: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(host.config_dir), "restore", "latest",
         "--target", str(target), *extra],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def pack_registry(stack: LocalStack) -> dict[str, dict[str, Any]]:
    """Every pack item of the registry (BlobIndexTable), by pack id, attribute values unwrapped."""
    table = stack.info["tables"]["BlobIndexTable"]
    packs: dict[str, dict[str, Any]] = {}
    for page in stack.dynamodb.get_paginator("scan").paginate(
        TableName=table,
        FilterExpression="begins_with(pk, :pack) AND sk = :item",
        ExpressionAttributeValues={":pack": {"S": "pack#"}, ":item": {"S": "pack"}},
    ):
        for item in page["Items"]:
            packs[item["pk"]["S"].removeprefix("pack#")] = {
                name: _unwrap(value) for name, value in item.items()
            }
    return packs


def _unwrap(value: dict[str, Any]) -> Any:
    (kind, inner), *_ = value.items()
    if kind == "N":
        return int(inner)
    if kind == "SS":
        return set(inner)
    return inner


def head_of(stack: LocalStack, host: str) -> str | None:
    """The host's current manifest as the ManifestTable's HEAD item names it."""
    item = stack.dynamodb.get_item(
        TableName=stack.info["tables"]["ManifestTable"],
        Key={"host": {"S": host}, "manifest_id": {"S": "HEAD"}},
        ConsistentRead=True,
    ).get("Item")
    return item["current"]["S"] if item else None


def object_versions(stack: LocalStack, prefix: str) -> list[dict[str, Any]]:
    """Every version of every object under `prefix`, listed by an identity allowed to."""
    s3 = stack.s3_client("UploadApiFunction")
    versions: list[dict[str, Any]] = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=stack.bucket, Prefix=prefix):
        versions.extend(page.get("Versions", []))
    return versions


@dataclass(frozen=True)
class BuiltPack:
    pack_id: str
    data: bytes
    entries: list[PackEntry]


def build_pack(blobs: list[tuple[str, bytes]]) -> BuiltPack:
    """A data pack of (claimed hash, bytes) stored as they are; the claimed hash may lie."""
    writer = PackWriter()
    for claimed, data in blobs:
        writer.add_stored(claimed, "data", "none", data, len(data))
    data, entries = writer.finish()
    return BuiltPack(hashlib.sha256(data).hexdigest(), data, entries)


def presign(api: ApiClient, pack: BuiltPack) -> dict[str, Any]:
    """The API's answer to POST /packs/presign for this one pack."""
    return api.call(
        "POST", "/packs/presign", {"packs": [{"sha256": pack.pack_id, "size": len(pack.data)}]}
    ).body


def put(upload: dict[str, Any], body: bytes, **header_changes: str | None) -> requests.Response:
    """PUT `body` to a presigned upload with its headers, some changed (or dropped with None)."""
    headers = dict(upload["headers"])
    for name, value in header_changes.items():
        actual = next((key for key in headers if key.lower() == name.replace("_", "-").lower()), name)
        if value is None:
            headers.pop(actual, None)
        else:
            headers[actual] = value
    headers.pop(
        "Content-Length", None
    )  # requests sets it from the body; it is the body's length that is tested
    headers.pop("content-length", None)
    return requests.put(upload["url"], data=body, headers=headers, timeout=60)


def upload_pack(api: ApiClient, pack: BuiltPack) -> None:
    """What the uploader does for one new pack: presign, then PUT with exactly the signed headers."""
    [upload] = presign(api, pack)["uploads"]
    response = put(upload, pack.data)
    assert response.status_code == 200, response.text


def snapshot_of(hash_: str, size: int, name: str = "snap") -> dict[str, Any]:
    """A manifest's snapshot entry whose stream index is `hash_` (a commit body, as the uploader sends)."""
    return {
        "name": name, "description": "d", "restore_through": "cat", "size": size,
        "content": hash_, "exit_status": 0, "error": None,
    }  # fmt: skip
