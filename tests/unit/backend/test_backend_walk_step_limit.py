"""A walk step checks at most DATA_CHECKS_PER_STEP data children (at least one node); the nodes past
the limit are walked in later steps, with the same outcome as an unlimited walk."""

from __future__ import annotations

import pytest
from sysbackup_backend import walk
from sysbackup_backend.api import Services
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.walk import Budget, TreeWalker, WalkState
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import dir_entry, file_entry, store_claimed, tree_bytes


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


@pytest.fixture
def checked_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the data lookups the walk makes, with the limit lowered to 4."""
    monkeypatch.setattr(walk, "DATA_CHECKS_PER_STEP", 4)
    sizes: list[int] = []
    original = TreeWalker._check_data

    def spy(self: TreeWalker, state: WalkState, data_blobs: set[str]) -> dict:
        sizes.append(len(data_blobs))
        return original(self, state, data_blobs)

    monkeypatch.setattr(TreeWalker, "_check_data", spy)
    return sizes


def walk_to_the_end(backend: Services, host: str, root: str) -> WalkState:
    state = WalkState.start(root, [])
    walker = TreeWalker(backend.index, backend.store, host)
    for _ in range(50):
        walker.step(state)
        if state.done:
            return state
    raise AssertionError("the walk did not end")


def test_wide_levels_are_checked_a_few_nodes_per_step(backend: Services, checked_sizes: list[int]) -> None:
    root, trees, contents = build_wide_tree(directories=5, files=3)
    store_claimed(backend, "web-1", [("tree", tree) for tree in trees])
    store_claimed(backend, "web-1", [("data", content) for content in contents])
    state = walk_to_the_end(backend, "web-1", root)
    assert state.problem_count == 0 and not state.open  # every node closed, the root last
    # 5 directories of 3 files with a limit of 4: one directory (3 checks) per step, never two.
    assert [size for size in checked_sizes if size] == [3, 3, 3, 3, 3]


def test_a_node_over_the_limit_on_its_own_is_still_walked(
    backend: Services, checked_sizes: list[int]
) -> None:
    root, trees, contents = build_wide_tree(directories=2, files=6)
    store_claimed(backend, "web-1", [("tree", tree) for tree in trees])
    store_claimed(backend, "web-1", [("data", content) for content in contents])
    assert walk_to_the_end(backend, "web-1", root).problem_count == 0
    assert [size for size in checked_sizes if size] == [6, 6]


def test_a_missing_blob_in_a_deferred_node_is_reported_once(
    backend: Services, checked_sizes: list[int]
) -> None:
    root, trees, contents = build_wide_tree(directories=4, files=3)
    lost = contents[-1]  # in the last directory, which a first step would defer
    store_claimed(backend, "web-1", [("tree", tree) for tree in trees])
    store_claimed(backend, "web-1", [("data", content) for content in contents if content != lost])
    with pytest.raises(Unprocessable) as refused:
        backend.committer.start("web-1", {"parent": None, "root": root, "snapshots": []}, Budget(60))
    assert refused.value.body()["missing"] == [blob_hash(lost)]
