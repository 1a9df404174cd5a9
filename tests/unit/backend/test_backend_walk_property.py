"""Property: over random trees with random missing blobs, walked one step per call through jobs,
a commit succeeds exactly when every reachable blob is stored, and a closed mark is only ever written
for a tree whose whole subtree is stored."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sysbackup_backend.api import Services
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import dir_entry, file_entry, store_claimed, tree_bytes

_hosts = itertools.count()

# A directory: (file contents as small ints, subdirectories).
directories = st.recursive(
    st.tuples(st.lists(st.integers(0, 30), max_size=3, unique=True), st.just([])),
    lambda children: st.tuples(
        st.lists(st.integers(0, 30), max_size=3, unique=True), st.lists(children, max_size=3)
    ),
    max_leaves=12,
)


@dataclass
class Built:
    trees: dict[str, bytes] = field(default_factory=dict)  # hash -> tree bytes
    data: dict[str, bytes] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)  # tree -> every blob it references


def build(directory: tuple[list[int], list], out: Built) -> str:
    files, subdirectories = directory
    entries = []
    referenced: set[str] = set()
    for number in files:
        content = f"content {number}".encode()
        out.data[blob_hash(content)] = content
        referenced.add(blob_hash(content))
        entries.append(file_entry(f"f{number}", [blob_hash(content)]))
    for index, subdirectory in enumerate(subdirectories):
        subtree = build(subdirectory, out)
        referenced.add(subtree)
        entries.append(dir_entry(f"d{index}", subtree))
    tree = tree_bytes(entries)
    out.trees[blob_hash(tree)] = tree
    out.children[blob_hash(tree)] = referenced
    return blob_hash(tree)


def fully_stored(blob: str, built: Built, missing: set[str]) -> bool:
    if blob in missing:
        return False
    return all(fully_stored(child, built, missing) for child in built.children.get(blob, ()))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(directory=directories, data=st.data())
def test_commit_succeeds_iff_everything_is_stored(
    backend: Services, directory: tuple, data: st.DataObject
) -> None:
    host = f"host{next(_hosts)}"
    built = Built()
    root = build(directory, built)
    every_blob = sorted({*built.trees, *built.data})
    missing = set(data.draw(st.lists(st.sampled_from(every_blob), max_size=2)))
    for kind, blobs in (("data", built.data), ("tree", built.trees)):
        present = [(kind, content) for blob, content in blobs.items() if blob not in missing]
        if present:
            store_claimed(backend, host, present)

    body = {"parent": None, "root": root, "snapshots": []}
    try:
        outcome = backend.committer.start(host, body, Budget(0))
        for _ in range(100):
            if outcome.status_code != 202:
                break
            outcome = backend.committer.resume(host, outcome.body["job_id"], Budget(0))
        succeeded = outcome.status_code == 201
    except Unprocessable:
        succeeded = False

    assert succeeded == fully_stored(root, built, missing)
    statuses = backend.index.lookup(host, built.trees, with_closed=True)
    for tree, status in statuses.items():
        if status.closed:
            assert fully_stored(tree, built, missing)
        if succeeded:
            assert status.closed
