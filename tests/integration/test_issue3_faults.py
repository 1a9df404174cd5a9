"""Crashes at the named fault points (S3SB_FAULT, uploader README), then a re-run.

The re-run must commit a good manifest without sending again what already arrived: the host's local
index (docs/PACK_INDEX.md, "Uploader") records a pack's blobs right after its PUT (`after-index` and later),
so a re-run finds them there (a local lookup, no API call) even though parallel readers make its own packs
differ byte for byte. A pack PUT but not yet indexed (`after-pack-put`) is sent at most once more; it stays
visible in the pack registry (host, size, lock) for gc to collect as an orphan. A host that lost its cache
after a commit landed learns its packs from `GET /packs`.
(tests/integration/test_archive_restore.py covers the same fault points with its crafted tree.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sysbackup_local.stack import LocalHost, LocalStack
from test_archive_restore import cli, describe
from test_issue3_support import archive, object_versions, pack_registry, pick, quiet_directory, restore

MIB = 1024 * 1024
TREES_AT_MOST = 64 * 1024  # a few tree blobs; the data is megabytes
FILES = 6


@pytest.fixture
def source(host_config: LocalHost, tmp_path: Path) -> Iterator[Path]:
    """A few MB picked by the host, in a directory nobody else touches, read by parallel readers.

    Blobs reach the packer in the order the readers finish, so a re-run's packs need not be
    byte-identical to a crashed run's: what arrived must be recognised by its blobs, not its pack id.
    """
    with quiet_directory() as quiet:
        tree = quiet / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "data.bin").write_bytes(os.urandom(3 * MIB))
        for index in range(3):
            (tree / f"part-{index}.bin").write_bytes(os.urandom(MIB // 2))
        (tree / "etc" / "app.conf").write_text("listen = 8080\n")
        (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
        pick(host_config, [tree], tmp_path / "cache", workers=4)
        time.sleep(1.1)  # files changed within a second of a scan are re-read next time
        yield tree


def packs_of(stack: LocalStack, host: str) -> dict[str, dict[str, Any]]:
    """The registry items of packs this host presigned."""
    return {pack_id: item for pack_id, item in pack_registry(stack).items() if item["host"] == host}


def assert_restores_exactly(host: LocalHost, source: Path, target: Path) -> None:
    restored = restore(host, target)
    assert restored.returncode == 0, restored.stderr
    assert describe(target / str(source).lstrip("/")) == describe(source)
    verified = cli(host.config_dir, "verify", "latest", "--read-data")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def crash_at(stack: LocalStack, host: LocalHost, tmp_path: Path, fault: str) -> dict[str, dict[str, Any]]:
    """An archive run that crashes at `fault`; the packs it left in the registry, each PUT exactly once."""
    crashed = archive(host, tmp_path / "crashed.json", fault=fault)
    assert crashed.returncode == 1 and f"injected fault at {fault}" in crashed.process.stderr
    landed = packs_of(stack, host.name)
    assert landed
    for pack_id, item in landed.items():
        assert item["hosts"] == {host.name}, item
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1  # the bytes did land
    return landed


@pytest.mark.parametrize("fault", ["after-index", "mid-commit"])
def test_a_rerun_after_a_crash_sends_no_data_again(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path, fault: str
) -> None:
    landed = crash_at(stack, host_config, tmp_path, fault)

    rerun = archive(host_config, tmp_path / "rerun.json")

    assert rerun.returncode == 0, rerun.process.stderr
    figures = rerun.stats
    # No parent cache from the crash: every file is read again, and every data blob is found in the local
    # index the crashed run wrote after its PUT. New tree packs only if an ancestor directory changed.
    assert figures["files_read"] == figures["files"] == FILES, figures
    assert figures["data_packs"] == 0 and figures["bytes_uploaded"] <= TREES_AT_MOST, figures
    assert figures["requests"].get("s3", {}).get("put", 0) == figures["packs"], figures
    assert "GET /packs" not in figures["requests"]["api"], figures  # the index was there: no rebuild
    assert landed.keys() <= packs_of(stack, host_config.name).keys()
    for pack_id in landed:
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1  # not PUT again
    manifests = [m["manifest_id"] for m in _listing(host_config)]
    if fault == "mid-commit":  # the crashed run's commit had landed; the re-run builds on it
        assert len(manifests) == 2 and _listing(host_config)[1]["parent"] == manifests[0]
    else:
        assert manifests == [figures["manifest_id"]]
    stack.wait_idle(timeout=120)
    registry = pack_registry(stack)
    assert all(registry[pack_id]["state"] == "verified" for pack_id in landed), registry

    # The run after a finished one asks nothing but the new trees' presign and the commit.
    (source / "etc" / "hosts").write_text("127.0.0.1 localhost changed\n")
    time.sleep(1.1)
    normal = archive(host_config, tmp_path / "normal.json")
    assert normal.returncode == 0, normal.process.stderr
    assert normal.stats["requests"]["api"] == {"POST /packs/presign": 1, "POST /manifests": 1}, normal.stats
    assert_restores_exactly(host_config, source, tmp_path / "restored")


def test_a_pack_put_but_not_indexed_is_sent_once_more_and_stays_visible_as_an_orphan(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    """The crashed run's data pack holds data.bin, changed before the re-run: nothing can reference it."""
    orphans = crash_at(stack, host_config, tmp_path, "after-pack-put")
    (source / "data.bin").write_bytes(os.urandom(3 * MIB))
    time.sleep(1.1)
    finished = archive(host_config, tmp_path / "finished.json")
    assert finished.returncode == 0, finished.process.stderr
    # The crashed run had built the index (an empty first one): no rebuild, the data is sent again, once.
    assert "GET /packs" not in finished.stats["requests"]["api"], finished.stats
    crashed_bytes = sum(item["size"] for item in orphans.values())
    assert 3 * MIB <= finished.stats["bytes_uploaded"] <= crashed_bytes + TREES_AT_MOST, finished.stats

    stack.wait_idle(timeout=120)
    registry = pack_registry(stack)
    assert set(packs_of(stack, host_config.name)) > set(orphans)
    for pack_id in orphans:
        item = registry[pack_id]
        # What gc needs to find and judge it: who presigned it, when, its size and lock, its state.
        assert item["host"] == host_config.name and item["size"] > 0
        assert item["created_at"] and item["retain_until"]
        assert item["state"] == "presigned", item  # no commit read it, no message asked to verify it
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1
    assert_restores_exactly(host_config, source, tmp_path / "restored")


def test_a_cacheless_rerun_after_a_landed_commit_learns_its_packs_and_sends_no_data_again(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    """The commit landed, then the host lost its cache (reinstalled): the operator adopts the head, and the
    new cache's index is built from GET /packs, so the data is found there instead of being sent again."""
    landed = crash_at(stack, host_config, tmp_path, "mid-commit")
    shutil.rmtree(tmp_path / "cache")

    rerun = archive(host_config, tmp_path / "rerun.json", "--adopt-head")

    assert rerun.returncode == 0, rerun.process.stderr
    figures = rerun.stats
    assert {"GET /packs", "POST /downloads"} <= set(figures["requests"]["api"]), figures
    assert "POST /packs/presign" not in figures["requests"]["api"], figures
    assert figures["files_read"] == FILES and figures["packs"] == 0, figures
    assert [m["manifest_id"] for m in _listing(host_config)][-1] == figures["manifest_id"]
    for pack_id in landed:
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1
    stack.wait_idle(timeout=120)
    assert_restores_exactly(host_config, source, tmp_path / "restored")


def _listing(host: LocalHost) -> list[dict[str, Any]]:
    listed = cli(host.config_dir, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))
