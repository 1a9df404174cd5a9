"""Directory trees remembered between runs: an unchanged directory's tree is reused unencoded, a change
anywhere below a directory re-encodes it and its ancestors, and the result is always what encoding
everything afresh gives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import pick
from s3_sysbackup import archiver as archiver_module
from s3_sysbackup.archiver import FileOutcome
from s3_sysbackup.cache import FileState, ParentCache, host_state_dir
from s3_sysbackup.metadata import Stat
from s3_sysbackup.walker import Node


def build_tree(root: Path) -> Path:
    data = root / "data"
    for directory in ("a", "a/deep", "b"):
        (data / directory).mkdir(parents=True)
        for n in range(3):
            (data / directory / f"f{n}").write_bytes(f"{directory} {n}".encode())
    os.symlink("a/f0", data / "link")
    # Settled: the parent cache trusts only files older than its racy window.
    old = 1_000_000_000
    for path in [data, *data.rglob("*")]:
        os.utime(path, (old, old), follow_symlinks=False)
    return data


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many entries each encode_tree call got, in call order."""
    sizes: list[int] = []
    original = archiver_module.encode_tree

    def spy(tree):  # type: ignore[no-untyped-def]
        sizes.append(len(tree.entries))
        return original(tree)

    monkeypatch.setattr(archiver_module, "encode_tree", spy)
    return sizes


def test_a_no_change_run_encodes_no_tree_and_commits_the_same_root(
    run_archive, config_dir, host_root, encoded: list[int]
):
    build_tree(host_root)
    pick(config_dir, "/data")
    first = run_archive()
    encoded_first = len(encoded)
    assert encoded_first == 5  # /, /data, a, a/deep, b
    second = run_archive()
    assert len(encoded) == encoded_first  # nothing encoded again
    assert second.root == first.root
    assert (second.stats["files"], second.stats["dirs"], second.stats["bytes"]) == (
        first.stats["files"],
        first.stats["dirs"],
        first.stats["bytes"],
    )


def test_a_change_re_encodes_its_directory_and_the_ancestors_only(
    run_archive, config_dir, host_root, encoded: list[int], tmp_path: Path
):
    data = build_tree(host_root)
    pick(config_dir, "/data")
    run_archive()
    encoded.clear()
    (data / "a" / "deep" / "f1").write_bytes(b"changed")
    os.utime(data / "a" / "deep" / "f1", (1_500_000_000, 1_500_000_000))
    changed = run_archive()
    # a/deep (3 files), a (3 files + deep), data (a, b, link), / (data): b is remembered.
    assert sorted(encoded) == [1, 3, 3, 4]
    # The same root as encoding every directory afresh gives (no memo at all).
    cache_dir = tmp_path / "cache"
    for state in cache_dir.iterdir():
        cache = ParentCache(state, scope="https://fake-api.invalid")
        cache.db.execute("DELETE FROM trees")
        cache.close()
    fresh = run_archive()
    assert fresh.root == changed.root


def test_a_remembered_tree_the_local_index_lost_is_encoded_again(
    run_archive, config_dir, host_root, encoded: list[int], make_config
):
    build_tree(host_root)
    pick(config_dir, "/data")
    run_archive()
    config = make_config()
    state = host_state_dir(config.content.cache_dir, config.api.endpoint, config.config_dir)
    cache = ParentCache(state, scope=config.api.endpoint)
    cache.db.execute("DELETE FROM blobs WHERE kind = 'tree'")  # as after a refusal dropped their packs
    cache.close()
    encoded.clear()
    run_archive()
    assert len(encoded) == 5


def test_a_signature_depends_on_values_not_on_which_objects_hold_them():
    st = Stat(0o100644, 7, 1, 1, 0, 0, 3, 10**18, 10**18, 0)
    digest = "ab" * 32

    def file_child(name: str, content: tuple[str, ...]) -> tuple[Node, FileOutcome]:
        node = Node(name=name, path="/d/" + name, stat=st, type="file")
        return node, FileOutcome(content, FileState.of(st), st)

    # Equal names and contents, as shared objects in one case and as distinct copies in the other.
    shared = [file_child("f1", (digest, digest)), file_child("f2", (digest,))]
    copies = [
        file_child("".join(["f", "1"]), ("".join(["ab"] * 32), "".join(["ab"] * 32))),
        file_child("".join(["f", "2"]), ("".join(["ab"] * 32),)),
    ]
    assert archiver_module._tree_signature(shared) == archiver_module._tree_signature(copies)
    changed = [file_child("f1", (digest, digest)), file_child("f2", ("cd" * 32,))]
    assert archiver_module._tree_signature(changed) != archiver_module._tree_signature(shared)
