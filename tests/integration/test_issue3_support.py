"""What the issue 3 integration tests share (no tests here): hosts that archive picked paths, signed API
clients, the pack registry and the bucket as seen by the stack's own identities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.credentials import Credentials
from s3_sysbackup.api import ApiClient
from sysbackup_local.identities import Identity
from sysbackup_local.stack import LocalHost, LocalStack

REGION = "us-east-1"


def api_client(stack: LocalStack, identity: Identity) -> ApiClient:
    """The uploader's own signed client, as `identity`; one attempt, so a refusal is seen as it is."""
    return ApiClient(
        stack.endpoints["api"], REGION, Credentials(identity.access_key, identity.secret_key), attempts=1
    )


def pick(host: LocalHost, paths: list[Path], cache_dir: Path) -> None:
    """The host's only picker prints `paths`; its parent cache lives in `cache_dir`."""
    conf = host.config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {cache_dir}\n", 1))
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


def archive(host: LocalHost, stats_path: Path, fault: str | None = None, timeout: float = 900) -> Run:
    """`s3-sysbackup archive` as the host's CLI runs it; `fault` sets S3SB_FAULT (test-only crash points)."""
    stats_path.unlink(missing_ok=True)
    env = (
        {**os.environ, "S3SB_FAULT": fault}
        if fault
        else {k: v for k, v in os.environ.items() if k != "S3SB_FAULT"}
    )
    process = subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(host.config_dir), "archive", "-q",
         "--stats-json", str(stats_path)],
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
    """Every `pack#` item of the BlobIndexTable, by pack id, attribute values unwrapped."""
    table = stack.info["tables"]["BlobIndexTable"]
    packs: dict[str, dict[str, Any]] = {}
    for page in stack.dynamodb.get_paginator("scan").paginate(
        TableName=table,
        FilterExpression="begins_with(pk, :pack)",
        ExpressionAttributeValues={":pack": {"S": "pack#"}},
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
