"""Issue 3: crashes at the named fault points (S3SB_FAULT, uploader README), then a re-run.

The re-run must commit a good manifest without sending a registered pack again, and packs that were
presigned and PUT but never registered stay visible in the pack registry for gc. The verifier is held
back (`stack.deliveries_held()`) so "stored" comes from the host's own registrations only: what the
re-run skips, it skips because the crashed run registered it, not because the verifier raced ahead.
(tests/integration/test_archive_restore.py covers the same fault points without holding the verifier.)
"""

from __future__ import annotations

import json
import os
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


@pytest.fixture
def source(host_config: LocalHost, tmp_path: Path) -> Iterator[Path]:
    """A few MB picked by the host, in a directory nobody else touches."""
    with quiet_directory() as quiet:
        tree = quiet / "tree"
        (tree / "etc").mkdir(parents=True)
        (tree / "data.bin").write_bytes(os.urandom(3 * MIB))
        (tree / "etc" / "app.conf").write_text("listen = 8080\n")
        (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
        # One reader: blobs then reach the packer in walk order, so a re-run builds byte-identical packs
        # (with parallel readers the order, hence a pack's bytes and id, depends on who finishes first).
        pick(host_config, [tree], tmp_path / "cache", workers=1)
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


@pytest.mark.parametrize("fault", ["after-register", "mid-commit"])
def test_a_rerun_after_registration_sends_no_pack_again(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path, fault: str
) -> None:
    with stack.deliveries_held():
        crashed = archive(host_config, tmp_path / "crashed.json", fault=fault)
        assert crashed.returncode == 1 and f"injected fault at {fault}" in crashed.process.stderr
        registered = packs_of(stack, host_config.name)
        assert registered and all(item["state"] == "registered" for item in registered.values())

        rerun = archive(host_config, tmp_path / "rerun.json")

    assert rerun.returncode == 0, rerun.process.stderr
    figures = rerun.stats
    assert figures["files_read"] == figures["files"] == 3, figures  # no cache from the crash: all read again
    # No data again, and no PUT of a registered pack (it would be a 412, counted in packs_already_there).
    # New tree packs only if an ancestor directory (/var/tmp...) changed between the two runs.
    assert figures["data_packs"] == 0 and figures["packs_already_there"] == 0, figures
    assert figures["requests"].get("s3", {}).get("put", 0) == figures["packs"], figures
    assert figures["bytes_uploaded"] <= TREES_AT_MOST, figures
    assert registered.keys() <= packs_of(stack, host_config.name).keys()
    for pack_id in registered:
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1
    manifests = [m["manifest_id"] for m in _listing(host_config)]
    if fault == "mid-commit":  # the crashed run's commit had landed; the re-run builds on it
        assert len(manifests) == 2 and _listing(host_config)[1]["parent"] == manifests[0]
    else:
        assert manifests == [figures["manifest_id"]]
    stack.wait_idle(timeout=120)
    assert_restores_exactly(host_config, source, tmp_path / "restored")


def test_packs_put_but_never_registered_stay_visible_as_orphans(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    with stack.deliveries_held():
        crashed = archive(host_config, tmp_path / "crashed.json", fault="after-pack-put")
        assert crashed.returncode == 1 and "injected fault at after-pack-put" in crashed.process.stderr
        put_not_registered = packs_of(stack, host_config.name)
        assert put_not_registered
        for pack_id, item in put_not_registered.items():
            assert item["state"] == "presigned" and "hosts" not in item, item
            assert len(object_versions(stack, f"packs/{pack_id}")) == 1  # the bytes did land

        # The same tree again: byte-identical data packs, each PUT answered 412 (not sent as new), then
        # registered. (Tree packs too, unless an ancestor directory's mtime changed meanwhile.)
        crashed_data = {pack_id for pack_id, item in put_not_registered.items() if item["size"] >= MIB}
        assert crashed_data
        rerun = archive(host_config, tmp_path / "rerun.json")
        assert rerun.returncode == 0, rerun.process.stderr
        assert rerun.stats["packs_already_there"] >= len(crashed_data), rerun.stats
        assert rerun.stats["bytes_uploaded"] <= TREES_AT_MOST, rerun.stats
        adopted = packs_of(stack, host_config.name)
        assert all(host_config.name in adopted[pack_id].get("hosts", set()) for pack_id in crashed_data)

        # Crash again after the PUT, but this time the data changes before the next run: the crashed
        # run's data pack is never registered by anyone.
        (source / "data.bin").write_bytes(os.urandom(3 * MIB))
        time.sleep(1.1)
        crashed = archive(host_config, tmp_path / "crashed-2.json", fault="after-pack-put")
        assert crashed.returncode == 1
        orphans = packs_of(stack, host_config.name).keys() - adopted.keys()
        assert orphans
        (source / "data.bin").write_bytes(os.urandom(3 * MIB))
        time.sleep(1.1)
        finished = archive(host_config, tmp_path / "finished.json")
        assert finished.returncode == 0, finished.process.stderr
        assert finished.stats["bytes_uploaded"] >= 3 * MIB  # the new data, in new packs

    stack.wait_idle(timeout=120)
    registry = pack_registry(stack)
    never_registered = {pack_id for pack_id in orphans if "hosts" not in registry[pack_id]}
    assert never_registered, "the changed data's crashed pack was never registered"
    for pack_id in never_registered:
        item = registry[pack_id]
        # What gc needs to find and judge it: who presigned it, when, its size and lock, its state.
        assert item["host"] == host_config.name and item["size"] > 0
        assert item["created_at"] and item["retain_until"]
        assert "registered_at" not in item and item["state"] in ("presigned", "verified", "corrupt")
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1
    assert_restores_exactly(host_config, source, tmp_path / "restored")


def _listing(host: LocalHost) -> list[dict[str, Any]]:
    listed = cli(host.config_dir, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return list(json.loads(listed.stdout))
