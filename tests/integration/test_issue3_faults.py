"""Issue 3: crashes at the named fault points (S3SB_FAULT, uploader README), then a re-run.

The re-run must commit a good manifest without sending again what already arrived: a registered pack
is not PUT again, and packs that were PUT but never registered are adopted (`POST /packs/adopt`, from the
ids the crashed run's cache recorded before the PUT) rather than rebuilt, since parallel readers make a
re-run's packs differ byte for byte. A pack put and never registered by anyone (the host lost its cache)
stays visible in the pack registry for gc. The verifier is held back (`stack.deliveries_held()`) so
"stored" comes from the host's own registrations only: what the re-run skips, it skips because the
crashed run registered it or the re-run adopted it, not because the verifier raced ahead.
(tests/integration/test_archive_restore.py covers the same fault points without holding the verifier.)
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
    assert figures["files_read"] == figures["files"] == FILES, figures  # no cache from the crash: all read
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


def crash_after_pack_put(stack: LocalStack, host: LocalHost, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """An archive run that crashes after its PUTs; the packs it left presigned, PUT and unregistered."""
    crashed = archive(host, tmp_path / "crashed.json", fault="after-pack-put")
    assert crashed.returncode == 1 and "injected fault at after-pack-put" in crashed.process.stderr
    put_not_registered = packs_of(stack, host.name)
    assert put_not_registered
    for pack_id, item in put_not_registered.items():
        assert item["state"] == "presigned" and "hosts" not in item, item
        assert len(object_versions(stack, f"packs/{pack_id}")) == 1  # the bytes did land
    return put_not_registered


def test_a_rerun_after_a_pack_put_adopts_it_and_sends_no_data_again(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    with stack.deliveries_held():
        put_not_registered = crash_after_pack_put(stack, host_config, tmp_path)

        rerun = archive(host_config, tmp_path / "rerun.json")

        assert rerun.returncode == 0, rerun.process.stderr
        figures = rerun.stats
        # The crashed packs were adopted, not rebuilt: no data pack, no data byte, no 412 re-PUT.
        assert figures["requests"]["api"]["POST /packs/adopt"] == 1, figures
        assert figures["data_packs"] == 0 and figures["packs_already_there"] == 0, figures
        assert figures["bytes_uploaded"] <= TREES_AT_MOST, figures
        registry = packs_of(stack, host_config.name)
        for pack_id in put_not_registered:
            assert registry[pack_id]["state"] == "registered", registry[pack_id]
            assert registry[pack_id]["hosts"] == {host_config.name}
            assert len(object_versions(stack, f"packs/{pack_id}")) == 1

        # The run after a finished one asks nothing.
        (source / "etc" / "hosts").write_text("127.0.0.1 localhost changed\n")
        time.sleep(1.1)
        normal = archive(host_config, tmp_path / "normal.json")
        assert normal.returncode == 0, normal.process.stderr
        assert "POST /packs/adopt" not in normal.stats["requests"]["api"], normal.stats

    stack.wait_idle(timeout=120)
    assert_restores_exactly(host_config, source, tmp_path / "restored")


def test_a_pack_put_and_never_registered_stays_visible_as_an_orphan(
    stack: LocalStack, host_config: LocalHost, source: Path, tmp_path: Path
) -> None:
    """The host lost its cache after the crash (reinstalled): nothing adopts the pack; gc must see it."""
    with stack.deliveries_held():
        orphans = set(crash_after_pack_put(stack, host_config, tmp_path))
        shutil.rmtree(tmp_path / "cache")
        (source / "data.bin").write_bytes(os.urandom(3 * MIB))
        time.sleep(1.1)
        finished = archive(host_config, tmp_path / "finished.json")
        assert finished.returncode == 0, finished.process.stderr
        assert "POST /packs/adopt" not in finished.stats["requests"]["api"], finished.stats
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
