"""gc and Object Lock against SeaweedFS, on a stack whose locks last seconds (TestRetentionSeconds).

Its own stack: locks of a few seconds, a grace period of a few seconds, keep only the newest manifest.
No test waits for days; none waits longer than a lock or a grace period of this stack.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from sysbackup_local.stack import LocalHost, LocalStack
from test_issue3_support import pack_registry

LOCK_SECONDS = 4
GRACE_SECONDS = 8
PARAMETERS = {
    "TestRetentionSeconds": str(LOCK_SECONDS),
    "GracePeriodSeconds": str(GRACE_SECONDS),
    "FoldWindowSeconds": "1",
    "KeepLast": "1",
    "KeepDaily": "0",
    "KeepWeekly": "0",
    "KeepMonthly": "0",
    "KeepYearly": "0",
    "MinimumRedundancy": "1",
}


@pytest.fixture(scope="module")
def short_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    root = tmp_path_factory.mktemp("gc-stack")
    started = LocalStack.start(root / "state", root / "config", host="gc-host", parameters=PARAMETERS)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def host(short_stack: LocalStack, tmp_path: Path) -> LocalHost:
    name = f"gc-{uuid.uuid4().hex[:8]}"
    config_dir = tmp_path / "config"
    identity = short_stack.add_host(name, config_dir)
    conf = config_dir / "conf"
    conf.write_text(conf.read_text().replace("[content]\n", f"[content]\ncache_dir = {tmp_path / 'cache'}\n"))
    return LocalHost(name=name, config_dir=config_dir, identity=identity)


def cli(config_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "s3_sysbackup.cli", "--config-dir", str(config_dir), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def pick(host: LocalHost, source: Path) -> None:
    picker = host.config_dir / "pickers.d" / "10-source"
    picker.write_text(f"#!/bin/sh\necho '{source}'\n")
    picker.chmod(0o755)


def archive(host: LocalHost) -> str:
    done = cli(host.config_dir, "archive", "-q", "--stats-json", str(host.config_dir / "stats.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    return str(json.loads((host.config_dir / "stats.json").read_text())["manifest_id"])


def listed(host: LocalHost) -> list[str]:
    listing = cli(host.config_dir, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    return [m["manifest_id"] for m in json.loads(listing.stdout)]


def verify_all(host: LocalHost) -> None:
    for manifest_id in listed(host):
        verified = cli(host.config_dir, "verify", manifest_id, "--read-data")
        assert verified.returncode == 0, verified.stdout + verified.stderr


def gc(stack: LocalStack, dry_run: bool = False) -> dict[str, Any]:
    report: dict[str, Any] = stack.invoke("gc", {"dry_run": dry_run})
    assert report["complete"], report
    return report


def locked_object(stack: LocalStack, mode: str, seconds: int) -> tuple[str, str]:
    """An object locked for `seconds` (put by the bootstrap identity, outside packs/ and manifests/)."""
    key = f"lock-tests/{mode.lower()}-{uuid.uuid4().hex}"
    body = b"locked " + key.encode()
    response = stack.s3_client("admin").put_object(
        Bucket=stack.bucket,
        Key=key,
        Body=body,
        ChecksumSHA256=base64.b64encode(hashlib.sha256(body).digest()).decode(),
        ObjectLockMode=mode,
        ObjectLockRetainUntilDate=datetime.now(timezone.utc) + timedelta(seconds=seconds),
    )
    return key, str(response["VersionId"])


def refused(action: Any) -> bool:
    try:
        action()
    except ClientError as error:
        return error.response["ResponseMetadata"]["HTTPStatusCode"] in (400, 403)
    return False


def test_a_compliance_lock_stops_every_credential(short_stack: LocalStack, host: LocalHost) -> None:
    key, version = locked_object(short_stack, "COMPLIANCE", 120)
    soon = datetime.now(timezone.utc) + timedelta(seconds=5)
    who: list[Any] = ["admin", "gc", "ManifestApiFunction", "ExtendRetentionFunction", host.name]
    for identity in who:
        s3 = short_stack.s3_client(identity)
        assert refused(
            lambda s3=s3: s3.delete_object(
                Bucket=short_stack.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
            )
        ), identity
        assert refused(
            lambda s3=s3: s3.put_object_retention(
                Bucket=short_stack.bucket,
                Key=key,
                VersionId=version,
                Retention={"Mode": "COMPLIANCE", "RetainUntilDate": soon},
                BypassGovernanceRetention=True,
            )
        ), identity
    head = short_stack.s3_client("admin").head_object(Bucket=short_stack.bucket, Key=key, VersionId=version)
    assert head["ObjectLockMode"] == "COMPLIANCE" and head["ObjectLockRetainUntilDate"] > soon


def test_only_gc_may_bypass_a_governance_lock(short_stack: LocalStack, host: LocalHost) -> None:
    functions = [
        spec.logical_id for spec in short_stack.template.functions.values() if spec.logical_id != "GcFunction"
    ]
    key, version = locked_object(short_stack, "GOVERNANCE", 120)
    for identity in [*functions, host.name, "restore"]:
        s3 = short_stack.s3_client(identity)
        assert refused(
            lambda s3=s3: s3.delete_object(
                Bucket=short_stack.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
            )
        ), identity
    # GcFunction itself runs as the gc identity (its template Role), the only one holding the bypass.
    assert (
        short_stack.s3_client("gc").delete_object(
            Bucket=short_stack.bucket, Key=key, VersionId=version, BypassGovernanceRetention=True
        )["ResponseMetadata"]["HTTPStatusCode"]
        == 204
    )


def test_gc_deletes_dead_packs_reports_the_bytes_and_live_manifests_still_verify(
    short_stack: LocalStack, host: LocalHost, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    # The first backup's pack holds the file that changes and trees that all change: nothing in it stays live.
    (source / "changing.bin").write_bytes(os.urandom(300_000))
    pick(host, source)
    time.sleep(1.1)
    archive(host)
    (source / "changing.bin").write_bytes(os.urandom(300_000))
    (source / "added.txt").write_bytes(b"only in the newer backup\n" * 100)
    time.sleep(1.1)
    newest = archive(host)
    short_stack.wait_idle()  # packs verified, lock extensions applied
    # The first manifest's lock (and its packs') lapse, and its packs are older than the grace period
    # (younger ones could belong to a backup in flight: gc never condemns them).
    time.sleep(max(LOCK_SECONDS, GRACE_SECONDS) + 2)

    dry = gc(short_stack, dry_run=True)
    first = gc(short_stack)
    assert first["forgotten"].get(host.name) == dry["forgotten"].get(host.name)
    assert len(first["forgotten"][host.name]) == 1 and listed(host) == [newest]
    # Blobs of condemned packs: the first backup's one pack (the old changing.bin and the old trees).
    assert first["blobs_condemned"] >= 2 and first["packs_condemned"] >= 1, first
    verify_all(host)

    time.sleep(GRACE_SECONDS + 1)
    second = gc(short_stack)
    assert second["packs_deleted"] >= 1 and second["bytes_freed"] > 100_000, second
    for pack_id in second["deleted_packs"]:
        assert (
            short_stack.s3_client("admin")
            .list_object_versions(Bucket=short_stack.bucket, Prefix=f"packs/{pack_id}")
            .get("Versions", [])
            == []
        )
    verify_all(host)
    restored = cli(host.config_dir, "restore", "latest", "--target", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "restored" / str(source).lstrip("/") / "changing.bin").read_bytes() == (
        source / "changing.bin"
    ).read_bytes()


def test_a_backup_running_while_gc_runs_commits_a_restorable_manifest(
    short_stack: LocalStack, host: LocalHost, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for n in range(30):
        (source / f"file-{n}.bin").write_bytes(uuid.uuid4().bytes * 2000)
    pick(host, source)
    time.sleep(1.1)
    archive(host)
    for n in range(0, 30, 3):
        (source / f"file-{n}.bin").write_bytes(uuid.uuid4().bytes * 2000)
    time.sleep(LOCK_SECONDS + 1)
    results: list[subprocess.CompletedProcess[str]] = []
    running = threading.Thread(target=lambda: results.append(cli(host.config_dir, "archive", "-q")))
    running.start()
    runs = 0
    while running.is_alive() or runs == 0:
        gc(short_stack)
        runs += 1
    running.join()
    assert results[0].returncode == 0, results[0].stdout + results[0].stderr
    gc(short_stack)  # and once more after it committed
    verify_all(host)
    assert listed(host)  # the newest manifest is always kept


def test_a_blob_whose_pack_gc_condemned_is_sent_again_and_committed(
    short_stack: LocalStack, host: LocalHost, tmp_path: Path
) -> None:
    """The host's local index still names a pack gc condemned (its content came back): the commit refuses
    the pack (422 `condemned`), the host drops it, sends the blob again and commits (docs/PACK_INDEX.md)."""
    source = tmp_path / "source"
    source.mkdir()
    original = os.urandom(300_000)
    (source / "file.bin").write_bytes(original)
    pick(host, source)
    time.sleep(1.1)
    archive(host)
    (source / "file.bin").write_bytes(os.urandom(300_000))
    time.sleep(1.1)
    archive(host)
    short_stack.wait_idle()
    time.sleep(max(LOCK_SECONDS, GRACE_SECONDS) + 2)  # the first manifest and its packs are dead and old
    gc(short_stack)
    condemned = {
        pack_id
        for pack_id, item in pack_registry(short_stack).items()
        if item["host"] == host.name and item["state"] == "condemned"
    }
    assert condemned, "gc condemned none of the first backup's packs"

    (source / "file.bin").write_bytes(original)  # the old content is back
    time.sleep(1.1)
    done = cli(host.config_dir, "archive", "-q", "--stats-json", str(host.config_dir / "stats.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    stats = json.loads((host.config_dir / "stats.json").read_text())
    assert stats["requests"]["api"]["POST /manifests"] >= 2, stats  # refused once, then committed
    verify_all(host)
    restored = cli(host.config_dir, "restore", "latest", "--target", str(tmp_path / "restored"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "restored" / str(source).lstrip("/") / "file.bin").read_bytes() == original


def test_local_invoke_gc_runs_it_and_prints_the_report(short_stack: LocalStack) -> None:
    command = [sys.executable, "-m", "s3_sysbackup.cli", "local", "invoke", "gc"]
    done = subprocess.run(
        [*command, "--state-dir", str(short_stack.state_dir)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    # The default event is the scheduled one: a real run, not a dry run.
    assert report["complete"] and report["dry_run"] is False and report["skipped"] is None
    assert {"manifests_forgotten", "blobs_condemned", "packs_deleted", "bytes_freed"} <= set(report)


def test_packs_end_up_locked_at_least_as_long_as_the_manifest(
    short_stack: LocalStack, host: LocalHost, tmp_path: Path
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "data.bin").write_bytes(os.urandom(200_000))
    pick(host, source)
    time.sleep(1.1)
    manifest_id = archive(host)
    short_stack.wait_idle()  # the commit's extension request reached ExtendRetentionFunction
    listing = json.loads(cli(host.config_dir, "list", "--json").stdout)
    retain_until = datetime.strptime(
        next(m["retain_until"] for m in listing if m["manifest_id"] == manifest_id), "%Y-%m-%dT%H:%M:%SZ"
    ).replace(tzinfo=timezone.utc)
    table = short_stack.info["tables"]["BlobIndexTable"]
    items = short_stack.dynamodb.scan(TableName=table)["Items"]
    packs = [
        i["pk"]["S"].removeprefix("pack#")
        for i in items
        if i["sk"]["S"] == "pack" and i["host"]["S"] == host.name
    ]
    assert packs
    # The commit's request went through RetentionQueue to the extender (wired from the template's SQS event).
    assert short_stack.daemon_status()["usage"]["ExtendRetentionFunction"]["invocations"] >= 1
    admin = short_stack.s3_client("admin")
    for pack_id in packs:
        head = admin.head_object(Bucket=short_stack.bucket, Key=f"packs/{pack_id}")
        assert head["ObjectLockMode"] == "GOVERNANCE"
        # The presigned lock ended before the manifest's (it was signed earlier): the extender lengthened it.
        assert head["ObjectLockRetainUntilDate"] >= retain_until, pack_id
