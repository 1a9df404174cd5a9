"""Index v2's cost claims (docs/PACK_INDEX.md, issue 4), counted by the servers over real sockets.

S3 requests come from SeaweedFS's Prometheus counters, API calls and Lambda invocations from the local
stack's daemon, DynamoDB requests and SQS messages from moto's request recorder: bench/compare.py's
`Meter`, which waits for the stack to be idle first, so work a run leaves behind is billed to it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sysbackup_local.stack import LocalHost, LocalStack
from test_archive_restore import describe
from test_issue3_support import archive, pack_registry, pick, quiet_directory, restore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from compare import Meter, Usage

SMALL_FILES = 300
DYNAMODB_WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}


@pytest.fixture(scope="module")
def meter(stack: LocalStack) -> Iterator[Meter]:
    """Server-side counters for this module's runs; moto stops recording after them."""
    started = Meter(stack)
    try:
        yield started
    finally:
        stop = f"{stack.endpoints['moto']}/moto-api/recorder/stop-recording"
        urllib.request.urlopen(urllib.request.Request(stop, method="POST"), timeout=10).close()


@pytest.fixture
def source(host_config: LocalHost, tmp_path: Path) -> Iterator[Path]:
    """Hundreds of small files in a few directories nobody else touches, picked by the host."""
    with quiet_directory() as quiet:
        tree = quiet / "tree"
        for index in range(SMALL_FILES):
            directory = tree / f"d{index % 3}"
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"f{index:04d}.txt").write_bytes(os.urandom(512) + b"%d\n" % index)
        (tree / "etc").mkdir()
        (tree / "etc" / "app.conf").write_text("listen = 8080\n")
        pick(host_config, [tree], tmp_path / "cache")
        time.sleep(1.1)  # files changed within a second of a scan are re-read next time; let them settle
        yield tree


def measured_archive(
    meter: Meter, stack: LocalStack, host: LocalHost, stats: Path, *extra: str
) -> tuple[dict, Usage]:
    before = meter.start()
    run = archive(host, stats, *extra)
    assert run.returncode == 0, run.process.stderr
    return run.stats, meter.usage_since(before, {stack.bucket})


def test_a_no_change_run_is_one_call_and_one_put_and_a_one_file_change_two_calls(
    stack: LocalStack, meter: Meter, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    first, usage = measured_archive(meter, stack, host_config, tmp_path / "first.json")
    assert first["files"] == SMALL_FILES + 1, first
    # Nothing per blob in DynamoDB: a handful of requests for hundreds of new blobs.
    assert usage.dynamodb_requests < SMALL_FILES // 10, usage.dynamodb
    assert usage.api_calls == sum(first["requests"]["api"].values()), (usage, first["requests"])

    unchanged, usage = measured_archive(meter, stack, host_config, tmp_path / "unchanged.json")
    assert unchanged["files_read"] == 0 and unchanged["packs"] == 0, unchanged
    assert unchanged["requests"]["api"] == {"POST /manifests": 1}, unchanged["requests"]
    assert "s3" not in unchanged["requests"], unchanged["requests"]
    # The servers' view: one API call, its one Lambda invocation, the manifest document's one PUT.
    assert usage.api_calls == usage.lambda_invocations == 1, usage
    assert dict(usage.s3) == {"PUT": 1}, usage.s3
    assert usage.sqs_messages == 0 and usage.dynamodb_requests <= 3, usage.dynamodb

    packs_before = host_packs(stack, host_config)
    with (source / "etc" / "app.conf").open("a") as conf:
        conf.write("workers = 4\n")
    time.sleep(1.1)
    changed, usage = measured_archive(meter, stack, host_config, tmp_path / "changed.json")
    assert changed["files_read"] == 1 and changed["packs"] >= 1, changed
    assert changed["requests"]["api"] == {"POST /packs/presign": 1, "POST /manifests": 1}, changed
    assert usage.api_calls == 2, usage
    # The new packs' PUTs and the manifest's; the small new packs are verified by the commit itself
    # (no queue message, no verifier run).
    assert usage.s3["PUT"] == changed["packs"] + 1, usage.s3
    assert usage.lambda_invocations == 2 and usage.sqs_messages == 0, usage
    registry = pack_registry(stack)
    new_packs = host_packs(stack, host_config) - packs_before
    assert len(new_packs) == changed["packs"], (new_packs, changed)
    assert all(registry[pack_id]["state"] == "verified" for pack_id in new_packs), registry
    assert usage.dynamodb_requests <= 2 * changed["packs"] + 3, usage.dynamodb


def host_packs(stack: LocalStack, host: LocalHost) -> set[str]:
    return {pack_id for pack_id, item in pack_registry(stack).items() if item["host"] == host.name}


def test_restore_and_archive_from_a_lost_cache_rebuild_the_index(
    stack: LocalStack, meter: Meter, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    first = archive(host_config, tmp_path / "first.json")
    assert first.returncode == 0, first.process.stderr
    cache = tmp_path / "cache"

    shutil.rmtree(cache)
    before = meter.start()
    target = tmp_path / "restored"
    restored = restore(host_config, target, "--stats-json", str(tmp_path / "restore.json"))
    usage = meter.usage_since(before, {stack.bucket})
    assert restored.returncode == 0, restored.stderr
    assert describe(target / str(source).lstrip("/")) == describe(source)
    requests = json.loads((tmp_path / "restore.json").read_text())["requests"]
    assert {"GET /packs", "POST /downloads"} <= set(requests["api"]), requests
    assert not DYNAMODB_WRITES & set(usage.dynamodb), usage.dynamodb  # a restore writes nothing

    # A lost cache on this very host: the operator says so (--adopt-head; a clone would be refused).
    shutil.rmtree(cache, ignore_errors=True)
    again, usage = measured_archive(meter, stack, host_config, tmp_path / "again.json", "--adopt-head")
    # Every file read again (no parent cache), every blob found in the rebuilt index: nothing sent.
    assert again["files_read"] == again["files"] == SMALL_FILES + 1, again
    assert again["packs"] == 0 and again["bytes_uploaded"] == 0, again
    assert "GET /packs" in again["requests"]["api"], again["requests"]
    assert "POST /packs/presign" not in again["requests"]["api"], again["requests"]
    assert usage.s3["PUT"] == 1, usage.s3  # the manifest document only
