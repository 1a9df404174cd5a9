"""Restore treats stored trees as hostile and never writes outside the target or through a symlink."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import pick
from s3_sysbackup.fetch import BlobFetcher
from s3_sysbackup.index_rebuild import MemoryIndex
from s3_sysbackup.restorer import RestoreError, Restorer
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import PackWriter, verify_pack
from sysbackup_domain.tree import Tree, TreeEntry, encode_tree
from uploader_fakes import FakeBackend


def store(backend: FakeBackend, *blobs: tuple[str, bytes]) -> list[str]:
    """Put raw blobs into the fake backend as one pack (bypassing the archiver)."""
    writer = PackWriter()
    hashes = []
    for kind, data in blobs:
        hashes.append(blob_hash(data))
        writer.add(hashes[-1], kind, data)
    pack, _ = writer.finish()
    backend.store_pack(pack)
    return hashes


def file_entry(name: str, content: bytes, content_hash: str) -> TreeEntry:
    return TreeEntry(
        name=name, type="file", mode=0o644, uid=0, gid=0, user=None, group=None, mtime_ns=10**18,
        size=len(content), content=(content_hash,),
    )  # fmt: skip


def hostile_manifest(backend: FakeBackend, evil_name: str) -> str:
    """A manifest whose root tree names an entry `evil_name` (encode_tree would refuse to write it)."""
    payload = b"planted"
    (content,) = store(backend, ("data", payload))
    honest = encode_tree(Tree((file_entry("placeholder", payload, content),)))
    evil = honest.replace(b'"name":"placeholder"', b'"name":' + json.dumps(evil_name).encode())
    assert evil != honest
    (root,) = store(backend, ("tree", evil))
    return backend.plant_manifest(root)


def restore(backend, transfer, manifest_id: str, target: Path, paths=(), overwrite=False):
    fetcher = BlobFetcher(backend, transfer, MemoryIndex())  # type: ignore[arg-type]
    return Restorer(fetcher, str(target), overwrite=overwrite).restore(
        backend.get_manifest(manifest_id), paths
    )


@pytest.mark.parametrize("evil_name", ["..", "../escaped", "a/b", ".", "nul\0byte"])
def test_hostile_names_are_refused_and_nothing_is_written(backend, transfer, tmp_path, evil_name):
    manifest_id = hostile_manifest(backend, evil_name)
    target = tmp_path / "deep" / "target"
    before = set(tmp_path.rglob("*"))
    with pytest.raises((InvalidDocument, RestoreError)):
        restore(backend, transfer, manifest_id, target)
    assert set(tmp_path.rglob("*")) <= before | {tmp_path / "deep", target}
    assert not target.exists() or not any(target.iterdir())


@pytest.fixture
def archived(run_archive, config_dir, host_root) -> str:
    data = host_root / "data"
    (data / "sub").mkdir(parents=True)
    (data / "plain.txt").write_bytes(b"the real content")
    (data / "sub" / "inner").write_bytes(b"inner content")
    pick(config_dir, "/data")
    return run_archive().manifest_id


def test_non_empty_target_is_refused_without_overwrite(archived, backend, transfer, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep me")
    with pytest.raises(RestoreError, match="not empty"):
        restore(backend, transfer, archived, target)
    assert (target / "precious").read_text() == "keep me"


def test_symlinked_directory_in_target_is_replaced_not_followed(archived, backend, transfer, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "data").symlink_to(outside)
    restore(backend, transfer, archived, target, overwrite=True)
    assert list(outside.iterdir()) == []
    assert not (target / "data").is_symlink()
    assert (target / "data" / "plain.txt").read_bytes() == b"the real content"


def test_symlinked_file_in_target_is_replaced_not_written_through(archived, backend, transfer, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"must not change")
    target = tmp_path / "target"
    (target / "data").mkdir(parents=True)
    (target / "data" / "plain.txt").symlink_to(victim)
    restore(backend, transfer, archived, target, overwrite=True)
    assert victim.read_bytes() == b"must not change"
    assert not (target / "data" / "plain.txt").is_symlink()
    assert (target / "data" / "plain.txt").read_bytes() == b"the real content"


def test_partial_restore_takes_only_the_selected_subtree(archived, backend, transfer, tmp_path):
    target = tmp_path / "target"
    restore(backend, transfer, archived, target, paths=["/data/sub"])
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "data",
        "data/sub",
        "data/sub/inner",
    ]


def test_selecting_a_path_not_in_the_backup_is_an_error(archived, backend, transfer, tmp_path):
    with pytest.raises(RestoreError, match="not in manifest"):
        restore(backend, transfer, archived, tmp_path / "target", paths=["/data/missing"])
    with pytest.raises(RestoreError, match=r"\.\."):
        restore(backend, transfer, archived, tmp_path / "target", paths=["/data/../etc"])


def test_a_flipped_byte_in_a_pack_is_a_corrupt_blob(archived, backend, transfer, tmp_path):
    for pack_id, pack in backend.objects.items():
        entries = verify_pack(pack)
        if entries[0].kind == "data":
            damaged = bytearray(pack)
            damaged[entries[0].offset] ^= 0x01
            backend.objects[pack_id] = bytes(damaged)
    with pytest.raises(CorruptBlob):
        restore(backend, transfer, archived, tmp_path / "target")


def test_tree_blobs_are_verified_too(archived, backend, transfer, tmp_path):
    root = backend.get_manifest(archived)["root"]
    pack_id = backend.blobs()[root]
    entry = next(e for e in verify_pack(backend.objects[pack_id]) if e.hash == root)
    damaged = bytearray(backend.objects[pack_id])
    damaged[entry.offset + entry.length - 1] ^= 0x40
    backend.objects[pack_id] = bytes(damaged)
    with pytest.raises(CorruptBlob):
        restore(backend, transfer, archived, tmp_path / "target")
    assert not os.path.exists(tmp_path / "target" / "data")
