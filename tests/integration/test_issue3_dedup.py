"""Issue 3: dedup across hosts only through verified blobs; lying packs never dedup; hosts kept apart.

The verifier runs asynchronously (S3 notification -> SQS -> VerifyPackFunction); `stack.deliveries_held()`
holds it back so "before the verifier has run" is a state the test controls, not a race it hopes to win.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from s3_sysbackup.api import ApiError
from sysbackup_local.stack import LocalHost, LocalStack, write_host_config
from test_archive_restore import describe
from test_issue3_support import (
    api_client,
    archive,
    build_pack,
    pack_registry,
    pick,
    presign,
    quiet_directory,
    restore,
    upload_pack,
)

TREE_BYTES = 6 * 1024 * 1024


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


def claimed_data_blobs(stack: LocalStack, host: str) -> set[str]:
    """Every data blob this host has registered (its `host#` claims in the blob index).

    Data only: trees also record the picked paths' ancestors, whose mtimes other processes may change
    between two runs (a new entry in /var/tmp), so two hosts' trees are equal only on a quiet machine.
    """
    blobs: set[str] = set()
    for page in stack.dynamodb.get_paginator("scan").paginate(
        TableName=stack.info["tables"]["BlobIndexTable"],
        FilterExpression="sk = :claim AND kind = :data",
        ExpressionAttributeValues={":claim": {"S": f"host#{host}"}, ":data": {"S": "data"}},
    ):
        blobs.update(item["pk"]["S"].removeprefix("blob#") for item in page["Items"])
    return blobs


def test_a_second_host_dedups_only_after_the_verifier_has_run(
    stack: LocalStack, host_config: LocalHost, shared_tree: Path, tmp_path: Path
) -> None:
    first, early, late = (
        host_config,
        *(another_host(stack, host_config, s, tmp_path) for s in ("early", "late")),
    )
    for host in (first, early, late):
        pick(host, [shared_tree], tmp_path / f"cache-{host.name}")

    with stack.deliveries_held():
        original = archive(first, tmp_path / "first.json")
        assert original.returncode == 0, original.process.stderr
        blobs = claimed_data_blobs(stack, first.name)
        assert blobs and not any(item["state"] == "verified" for item in pack_registry(stack).values()
                                 if first.name in item.get("hosts", set()))  # fmt: skip
        # Unverified claims count for their own host only.
        assert api_client(stack, first.identity).check_blobs(blobs) == blobs
        assert api_client(stack, early.identity).check_blobs(blobs) == set()
        before_verification = archive(early, tmp_path / "early.json")
        assert before_verification.returncode == 0, before_verification.process.stderr
        # Before the verifier ran, the second host had to send and claim every data blob itself.
        assert claimed_data_blobs(stack, early.name) == blobs
    stack.wait_idle(timeout=120)
    assert api_client(stack, late.identity).check_blobs(blobs) == blobs
    after_verification = archive(late, tmp_path / "late.json")
    assert after_verification.returncode == 0, after_verification.process.stderr

    sent_first = original.stats["bytes_uploaded"]
    assert sent_first >= TREE_BYTES
    # Byte-identical to the first host's packs (PUT answered 412, counted apart from bytes_uploaded) or not
    # (parallel readers may order blobs differently), it PUT every pack itself.
    early_stats = before_verification.stats
    assert early_stats["data_packs"] >= 1
    assert early_stats["requests"]["s3"]["put"] == original.stats["requests"]["s3"]["put"]
    assert early_stats["bytes_uploaded"] + early_stats["packs_already_there"] > 0
    # After it ran, the third host sends no data; at most a few tree blobs (if an ancestor of the picked
    # directory changed meanwhile, its tree did too).
    late_stats = after_verification.stats
    assert late_stats["files_read"] == late_stats["files"] == 4  # it did read and hash everything
    assert late_stats["data_packs"] == 0
    assert late_stats["bytes_uploaded"] <= sent_first // 100

    # Each host restores the same tree from its own manifest.
    for host in (early, late):
        target = tmp_path / f"restored-{host.name}"
        restored = restore(host, target)
        assert restored.returncode == 0, restored.stderr
        assert describe(target / str(shared_tree).lstrip("/")) == describe(shared_tree)


def test_a_pack_whose_bytes_lie_never_answers_another_hosts_dedup_check(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    liar, victim = host_config, another_host(stack, host_config, "victim", tmp_path)
    truth = os.urandom(50_000)
    claimed = hashlib.sha256(truth).hexdigest()
    lie = build_pack([(claimed, os.urandom(len(truth)))])  # the trailer names `truth`'s hash over other bytes
    liar_api, victim_api = api_client(stack, liar.identity), api_client(stack, victim.identity)

    with stack.deliveries_held():
        upload_pack(liar_api, lie)  # register only checks the pack's own SHA-256 and layout
        assert pack_registry(stack)[lie.pack_id]["state"] == "registered"
        assert victim_api.check_blobs([claimed]) == set()
        assert liar_api.check_blobs([claimed]) == {claimed}  # its own claim, not yet verified
    stack.wait_idle(timeout=120)

    item = pack_registry(stack)[lie.pack_id]
    assert item["state"] == "corrupt", item
    assert claimed in item["corrupt_reason"] or "hash" in item["corrupt_reason"].lower(), item
    assert victim_api.check_blobs([claimed]) == set()
    assert liar_api.check_blobs([claimed]) == set()  # not even for the liar once it is found out
    with pytest.raises(ApiError) as refused:
        presign(liar_api, lie)
    assert refused.value.status == 422 and lie.pack_id in str(refused.value.body)
    # Nor can the liar commit a manifest naming what its pack claimed.
    snapshot = {
        "name": "lie", "description": "d", "restore_through": "cat", "size": len(truth),
        "content": claimed, "exit_status": 0, "error": None,
    }  # fmt: skip
    with pytest.raises(ApiError) as refused:
        liar_api.call("POST", "/manifests", {"parent": None, "root": None, "snapshots": [snapshot]})
    assert refused.value.status == 422
    assert claimed in refused.value.body["corrupt"], refused.value.body
    assert liar_api.list_manifests() == []

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

    def status_of(call: Callable[[], object]) -> int:
        with pytest.raises(ApiError) as refused:
            call()
        return refused.value.status

    assert status_of(lambda: my_api.list_manifests(host=theirs.name)) == 403
    assert status_of(lambda: my_api.get_manifest(their_id, host=theirs.name)) == 403
    assert status_of(lambda: my_api.get_manifest(their_id)) == 404  # only its own catalogue is looked in
    assert status_of(lambda: my_api.locate_blobs([their_summary["root"]], host=theirs.name)) == 403
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
        locations, _ = restore_api.locate_blobs([summary["root"]], host=host.name)
        assert summary["root"] in locations


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
