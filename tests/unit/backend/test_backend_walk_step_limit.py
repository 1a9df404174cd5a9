"""A walk step compares at most DATA_CHECKS_PER_STEP children (at least one node); the nodes past the
limit are walked in later steps, with the same outcome as an unlimited walk."""

from __future__ import annotations

import pytest
from sysbackup_backend import walk
from sysbackup_backend.api import Services
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.walk import TREE, Budget, ListedPacks, TreeWalker, WalkState
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import BuiltPack, dir_entry, file_entry, store_pack, tree_bytes


def build_wide_tree(directories: int, files: int) -> tuple[str, list[bytes], list[bytes]]:
    """root -> `directories` directories of `files` distinct files each: (root hash, trees, contents)."""
    contents: list[bytes] = []
    trees: list[bytes] = []
    subdirectories = []
    for d in range(directories):
        entries = []
        for f in range(files):
            content = f"directory {d} file {f}".encode()
            contents.append(content)
            entries.append(file_entry(f"f{f}", [blob_hash(content)]))
        tree = tree_bytes(entries)
        trees.append(tree)
        subdirectories.append(dir_entry(f"d{d}", blob_hash(tree)))
    root = tree_bytes(subdirectories)
    trees.append(root)
    return blob_hash(root), trees, contents


@pytest.fixture(autouse=True)
def four_checks_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk, "DATA_CHECKS_PER_STEP", 4)


def nodes_compared_per_step(backend: Services, host: str, root: str, packs: list[BuiltPack]) -> list[int]:
    """Walk step by step; how many trees each step compared."""
    pack_ids = [pack.pack_id for pack in packs]
    listed = ListedPacks(backend.registry, backend.store, host, backend.registry.get_many(pack_ids))
    walker = TreeWalker(backend.store, listed.load(pack_ids), {})
    state = WalkState.start([(root, None, TREE)])
    compared: list[int] = []
    for _ in range(50):
        before = state.trees_read
        walker.step(state)
        compared.append(state.trees_read - before)
        if state.done:
            assert state.problem_count == 0
            return compared
    raise AssertionError("the walk did not end")


def test_wide_levels_are_compared_a_few_nodes_per_step(backend: Services) -> None:
    root, trees, contents = build_wide_tree(directories=5, files=3)
    packs = [
        store_pack(backend, "web-1", [("tree", tree) for tree in trees]),
        store_pack(backend, "web-1", [("data", content) for content in contents]),
    ]
    # The root (5 entries, over the limit on its own), then one directory of 3 files per step, never two.
    assert nodes_compared_per_step(backend, "web-1", root, packs) == [1, 1, 1, 1, 1, 1]


def test_a_node_over_the_limit_on_its_own_is_still_walked(backend: Services) -> None:
    root, trees, contents = build_wide_tree(directories=2, files=6)
    packs = [
        store_pack(backend, "web-1", [("tree", tree) for tree in trees]),
        store_pack(backend, "web-1", [("data", content) for content in contents]),
    ]
    assert nodes_compared_per_step(backend, "web-1", root, packs) == [1, 1, 1]


def test_a_missing_blob_in_a_deferred_node_is_reported_once(backend: Services) -> None:
    root, trees, contents = build_wide_tree(directories=4, files=3)
    lost = contents[-1]  # in the last directory, which a first step would defer
    packs = [
        store_pack(backend, "web-1", [("tree", tree) for tree in trees]),
        store_pack(backend, "web-1", [("data", content) for content in contents if content != lost]),
    ]
    body = {"parent": None, "root": root, "snapshots": [], "packs": [pack.pack_id for pack in packs]}
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("web-1", body, Budget(60))
    assert refused.value.body()["missing"] == [blob_hash(lost)]
