"""Dedup is per host (docs/PACK_INDEX.md): a local lookup, no API call; a host only references packs it
uploaded itself; a pack whose bytes lie is found out before any manifest names it; hosts are kept apart.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3_sysbackup.api import ApiClient, ApiError
from sysbackup_local.stack import LocalHost, LocalStack, write_host_config
from test_archive_restore import describe
from test_issue3_support import (
    api_client,
    archive,
    build_pack,
    pack_registry,
    pick,
    presign,
    put,
    quiet_directory,
    restore,
    snapshot_of,
    upload_pack,
)

TREE_BYTES = 6 * 1024 * 1024
TREES_AT_MOST = 64 * 1024  # a few tree blobs; the data is megabytes


@pytest.fixture
def shared_tree() -> Iterator[Path]:
    """The same files for every host: a few MB of incompressible data in a directory nobody else touches."""
    with quiet_directory() as quiet:
        tree = quiet / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "big.bin").write_bytes(os.urandom(TREE_BYTES - 2 * 65536))
        (tree / "sub" / "a.bin").write_bytes(os.urandom(65536))
        (tree / "sub" / "b.bin").write_bytes(os.urandom(65536))
        (tree / "sub" / "small.txt").write_text("a small file\n")
        time.sleep(1.1)  # files changed within a second of a scan are re-read next time; let them settle
        yield tree


def another_host(stack: LocalStack, first: LocalHost, suffix: str, tmp_path: Path) -> LocalHost:
    config_dir = tmp_path / f"config-{suffix}"
    identity = stack.add_host(f"{first.name}-{suffix}", config_dir)
    return LocalHost(name=identity.name, config_dir=config_dir, identity=identity)


def packs_usable_by(stack: LocalStack, host: str) -> dict[str, dict[str, Any]]:
    return {pack_id: item for pack_id, item in pack_registry(stack).items() if host in item.get("hosts", ())}


def random_blobs(count: int) -> list[bytes]:
    return [os.urandom(20_000) for _ in range(count)]


def status_of(call: Callable[[], object]) -> int:
    with pytest.raises(ApiError) as refused:
        call()
    return refused.value.status


def refusal_of(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as refused:
        call()
    return refused.value


def test_a_host_dedups_locally_and_another_host_stores_its_own_packs(
    stack: LocalStack, host_config: LocalHost, shared_tree: Path, tmp_path: Path
) -> None:
    first, second = host_config, another_host(stack, host_config, "second", tmp_path)
    for host in (first, second):
        pick(host, [shared_tree], tmp_path / f"cache-{host.name}")

    original = archive(first, tmp_path / "first.json")
    assert original.returncode == 0, original.process.stderr
    assert original.stats["bytes_uploaded"] >= TREE_BYTES
    first_packs = packs_usable_by(stack, first.name)
    assert first_packs and all(item["hosts"] == {first.name} for item in first_packs.values())

    # The second host has the same files but no claim on the first host's packs: it stores its own (or, for
    # a byte-identical pack, presign finds the object and adds it to the pack's hosts; never a blob lookup).
    other = archive(second, tmp_path / "second.json")
    assert other.returncode == 0, other.process.stderr
    assert other.stats["data_packs"] >= 1, other.stats  # it packed the data itself: no cross-host dedup
    assert other.stats["requests"]["api"].get("POST /packs/presign", 0) >= 1, other.stats
    second_packs = packs_usable_by(stack, second.name)
    assert second_packs
    for pack_id in second_packs.keys() & first_packs.keys():  # byte-identical packs, shared by both
        assert pack_registry(stack)[pack_id]["hosts"] == {first.name, second.name}
    assert_restores(second, shared_tree, tmp_path / "restored-second")

    # Within one host, a copy of a file it stored is a local lookup: read and hashed, no data sent, and
    # the only API calls are the new trees' presign and the commit.
    shutil.copyfile(shared_tree / "big.bin", shared_tree / "sub" / "copy.bin")
    time.sleep(1.1)
    copied = archive(first, tmp_path / "copied.json")
    assert copied.returncode == 0, copied.process.stderr
    figures = copied.stats
    assert figures["files_read"] == 1 and figures["data_packs"] == 0, figures
    assert figures["bytes_uploaded"] <= TREES_AT_MOST, figures
    assert figures["requests"]["api"] == {"POST /packs/presign": 1, "POST /manifests": 1}, figures

    assert_restores(first, shared_tree, tmp_path / "restored-first")


def assert_restores(host: LocalHost, tree: Path, target: Path) -> None:
    restored = restore(host, target)
    assert restored.returncode == 0, restored.stderr
    assert describe(target / str(tree).lstrip("/")) == describe(tree)


def test_presign_shares_a_pack_only_with_a_host_holding_its_bytes(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    """The pack id is the SHA-256 of the pack: a host presigning a pack id holds those bytes. If they are in
    S3 it is `stored` and added to `hosts`; if not, it gets its own URL (and is added too)."""
    owner, other = host_config, another_host(stack, host_config, "other", tmp_path)
    owner_api, other_api = api_client(stack, owner.identity), api_client(stack, other.identity)
    landed, unsent = (build_pack([(hashlib.sha256(blob).hexdigest(), blob)]) for blob in random_blobs(2))
    upload_pack(owner_api, landed)
    assert presign(owner_api, unsent)["uploads"]

    shared = presign(other_api, landed)
    assert shared["uploads"] == [] and shared["stored"] == [landed.pack_id], shared
    registry = pack_registry(stack)
    assert registry[landed.pack_id]["host"] == owner.name
    assert registry[landed.pack_id]["hosts"] == {owner.name, other.name}
    [own_upload] = presign(other_api, unsent)["uploads"]
    assert put(own_upload, unsent.data).status_code == 200
    assert pack_registry(stack)[unsent.pack_id]["hosts"] == {owner.name, other.name}


def test_cloned_hosts_share_identical_packs_and_each_restores_after_losing_its_cache(
    stack: LocalStack, host_config: LocalHost, shared_tree: Path, tmp_path: Path
) -> None:
    """Two hosts of one image pack the same files in the same order (one reader each): byte-identical packs,
    which presign answers `stored` and shares (`hosts`). A host that lost its cache rebuilds its index from
    GET /packs, which must list the packs it shares too, or its restore would miss their blobs."""
    first, clone = host_config, another_host(stack, host_config, "clone", tmp_path)
    for host in (first, clone):
        pick(host, [shared_tree], tmp_path / f"cache-{host.name}", workers=1)
        run = archive(host, tmp_path / f"{host.name}.json")
        assert run.returncode == 0, run.process.stderr
    shared = {p for p, item in pack_registry(stack).items() if item["hosts"] == {first.name, clone.name}}
    assert shared, "no byte-identical pack: this test proves nothing"
    assert run.stats["bytes_uploaded"] < TREE_BYTES, run.stats  # the clone sent none of the shared packs

    listed = api_client(stack, clone.identity).call("GET", "/packs").body["packs"]
    assert shared <= {p["pack_id"] for p in listed}, listed
    shutil.rmtree(tmp_path / f"cache-{clone.name}")
    assert_restores(clone, shared_tree, tmp_path / "restored")


def test_a_pack_whose_bytes_lie_is_refused_and_never_serves_another_host(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    liar, victim = host_config, another_host(stack, host_config, "victim", tmp_path)
    truth = os.urandom(50_000)
    claimed = hashlib.sha256(truth).hexdigest()
    lie = build_pack([(claimed, os.urandom(len(truth)))])  # the trailer names `truth`'s hash over other bytes
    liar_api, victim_api = api_client(stack, liar.identity), api_client(stack, victim.identity)
    upload_pack(liar_api, lie)  # presign only pins the pack's own SHA-256 and size
    assert pack_registry(stack)[lie.pack_id]["state"] == "presigned"

    def commit_naming_the_claim(api: ApiClient) -> ApiError:
        body = {"parent": None, "root": None, "snapshots": [snapshot_of(claimed, len(truth))],
                "packs": [lie.pack_id]}  # fmt: skip
        return refusal_of(lambda: api.call("POST", "/manifests", body))

    # Another host cannot reference the liar's pack at all, whatever its state.
    refused = commit_naming_the_claim(victim_api)
    assert refused.status == 422 and refused.body["packs"] == {lie.pack_id: "not_yours"}, refused.body
    assert claimed in refused.body["missing"]
    # The liar's own commit reads the small pack whole, re-hashes it and marks it corrupt.
    refused = commit_naming_the_claim(liar_api)
    assert refused.status == 422 and refused.body["packs"] == {lie.pack_id: "corrupt"}, refused.body
    item = pack_registry(stack)[lie.pack_id]
    assert item["state"] == "corrupt", item
    assert claimed in item["corrupt_reason"] or "hash" in item["corrupt_reason"].lower(), item
    assert liar_api.list_manifests() == []
    presigned_again = refusal_of(lambda: presign(liar_api, lie))
    assert presigned_again.status == 422 and lie.pack_id in str(presigned_again.body)

    # The victim backing up the true bytes uploads them itself and gets them back.
    with quiet_directory() as quiet:
        (quiet / "truth.bin").write_bytes(truth)
        pick(victim, [quiet], tmp_path / "victim-cache")
        run = archive(victim, tmp_path / "victim.json")
        assert run.returncode == 0, run.process.stderr
        assert run.stats["bytes_uploaded"] >= len(truth)
        restored = restore(victim, tmp_path / "restored")
        assert restored.returncode == 0, restored.stderr
        assert (tmp_path / "restored" / str(quiet).lstrip("/") / "truth.bin").read_bytes() == truth


def test_hosts_cannot_list_read_or_commit_over_each_other(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    mine, theirs = host_config, another_host(stack, host_config, "theirs", tmp_path)
    with quiet_directory() as quiet:
        for host in (mine, theirs):
            source = quiet / host.name
            source.mkdir()
            (source / "file").write_text(f"{host.name}'s own file\n")
            pick(host, [source], tmp_path / f"cache-{host.name}")
            run = archive(host, tmp_path / f"{host.name}.json")
            assert run.returncode == 0, run.process.stderr
    my_api, their_api = api_client(stack, mine.identity), api_client(stack, theirs.identity)
    [my_summary], [their_summary] = my_api.list_manifests(), their_api.list_manifests()
    their_id = their_summary["manifest_id"]
    their_packs = sorted(packs_usable_by(stack, theirs.name))
    assert their_packs and not set(their_packs) & set(packs_usable_by(stack, mine.name))

    assert status_of(lambda: my_api.list_manifests(host=theirs.name)) == 403
    assert status_of(lambda: my_api.get_manifest(their_id, host=theirs.name)) == 403
    assert status_of(lambda: my_api.get_manifest(their_id)) == 404  # only its own catalogue is looked in
    assert status_of(lambda: my_api.call("GET", "/packs", query={"host": theirs.name})) == 403
    downloads = {"packs": their_packs}
    assert status_of(lambda: my_api.call("POST", "/downloads", downloads, query={"host": theirs.name})) == 403
    # Without ?host the packs are looked up as the caller's: none of them is.
    mine_only = my_api.call("POST", "/downloads", downloads).body
    assert mine_only["urls"] == {} and set(mine_only["missing"]) == set(their_packs), mine_only
    listed_by_me = my_api.call("GET", "/packs").body["packs"]
    assert not {p["pack_id"] for p in listed_by_me} & set(their_packs)
    # Committing "on top of" the other host's head: the commit is conditional on the caller's own head.
    over = {"parent": their_id, "root": my_summary["root"], "snapshots": []}
    assert status_of(lambda: my_api.call("POST", "/manifests", over)) == 409
    moved = my_api.call("POST", "/manifests", {**over, "parent": my_summary["manifest_id"]}).body
    # (The list is newest id first; two commits in one second sort by their random suffix.)
    my_ids = {my_summary["manifest_id"], moved["manifest_id"]}
    assert {m["manifest_id"] for m in my_api.list_manifests()} == my_ids
    assert my_api.latest_manifest()["manifest_id"] == moved["manifest_id"]  # type: ignore[index]
    assert their_api.list_manifests() == [their_summary]  # untouched

    restore_api = api_client(stack, stack.identity("restore"))
    for host, summary in ((theirs, their_summary), (mine, my_summary)):
        assert summary in restore_api.list_manifests(host=host.name)
        document = restore_api.get_manifest(summary["manifest_id"], host=host.name)
        assert document["host"] == host.name and document["root"] == summary["root"]
        listed = restore_api.call("GET", "/packs", query={"host": host.name}).body
        pack_ids = [p["pack_id"] for p in listed["packs"]]
        assert set(pack_ids) == set(packs_usable_by(stack, host.name)) and listed["next"] is None
        assert all(pack_registry(stack)[pack_id]["host"] == host.name for pack_id in pack_ids)
        urls = restore_api.call("POST", "/downloads", {"packs": pack_ids}, query={"host": host.name}).body
        assert set(urls["urls"]) == set(pack_ids) and urls["missing"] == {}, urls


def test_the_restore_role_restores_any_host_with_the_cli_and_a_host_cannot(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    mine, theirs = host_config, another_host(stack, host_config, "theirs", tmp_path)
    role_dir = tmp_path / "restore-role"
    write_host_config(role_dir, stack.identity("restore"), stack)
    role = LocalHost(name="restore", config_dir=role_dir, identity=stack.identity("restore"))
    with quiet_directory() as quiet:
        (quiet / "file").write_text("theirs only\n")
        pick(theirs, [quiet], tmp_path / "cache")
        run = archive(theirs, tmp_path / "theirs.json")
        assert run.returncode == 0, run.process.stderr

        by_role = restore(role, tmp_path / "by-role", "--host", theirs.name)
        by_host = restore(mine, tmp_path / "by-host", "--host", theirs.name)

        assert by_role.returncode == 0, by_role.stderr
        assert describe(tmp_path / "by-role" / str(quiet).lstrip("/")) == describe(quiet)
    assert by_host.returncode == 1 and "403" in by_host.stderr, by_host.stderr
    assert not any((tmp_path / "by-host").rglob("file"))
