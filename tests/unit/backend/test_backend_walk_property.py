"""Properties over random trees, walked one step per call through jobs: a first commit succeeds exactly when
every reachable blob is in a listed pack; a commit diffed against a parent succeeds only when every blob it
references is stored (the parent's or listed), and always when everything new is listed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sysbackup_backend.api import Services
from sysbackup_backend.errors import Unprocessable
from sysbackup_backend.walk import Budget
from sysbackup_domain.hashing import blob_hash
from sysbackup_testkit import BuiltPack, dir_entry, file_entry, store_pack, tree_bytes

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

    def reachable(self, blob: str) -> set[str]:
        found = {blob}
        for child in self.children.get(blob, ()):
            found |= self.reachable(child)
        return found


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
    return not (built.reachable(blob) & missing)


def store_all_but(services: Services, host: str, built: Built, missing: set[str]) -> list[BuiltPack]:
    """The blobs not `missing`, in packs of the host's own (a marker blob keeps them apart from the same
    blobs other examples' hosts stored: a pack is named by its bytes)."""
    packs = []
    for kind, blobs in (("data", built.data), ("tree", built.trees)):
        present = [(kind, content) for blob, content in blobs.items() if blob not in missing]
        if present:
            marker = ("data", f"{host} {kind} {sorted(missing)}".encode())
            packs.append(store_pack(services, host, [*present, marker]))
    return packs


def commit_through_jobs(services: Services, host: str, body: dict[str, Any]) -> bool:
    """Commit with a zero budget (one step per call); True if it committed."""
    try:
        outcome = services.committer.start(host, body, Budget(0))
        for _ in range(200):
            if outcome.status_code != 202:
                break
            outcome = services.committer.resume(host, outcome.body["job_id"], Budget(0))
    except Unprocessable:
        return False
    return outcome.status_code == 201


def body_for(root: str, packs: list[BuiltPack], parent: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"parent": parent, "root": root, "snapshots": [], "packs": [p.pack_id for p in packs], **extra}


def tree_locations(packs: list[BuiltPack]) -> dict[str, dict[str, Any]]:
    return {
        entry.hash: {key: value for key, value in entry.to_json().items() if key not in ("hash", "kind")}
        | {"pack_id": pack.pack_id}
        for pack in packs
        for entry in pack.entries
        if entry.kind == "tree"
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(directory=directories, data=st.data())
def test_first_commit_succeeds_iff_everything_is_listed(
    backend: Services, directory: tuple, data: st.DataObject
) -> None:
    host = f"host{next(_hosts)}"
    built = Built()
    root = build(directory, built)
    missing = set(data.draw(st.lists(st.sampled_from(sorted({*built.trees, *built.data})), max_size=2)))
    packs = store_all_but(backend, host, built, missing)
    assert commit_through_jobs(backend, host, body_for(root, packs)) == fully_stored(root, built, missing)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=directories, after=directories, data=st.data())
def test_a_diffed_commit_never_accepts_what_is_not_stored(
    backend: Services, before: tuple, after: tuple, data: st.DataObject
) -> None:
    host = f"host{next(_hosts)}"
    old, new = Built(), Built()
    old_root, new_root = build(before, old), build(after, new)
    old_packs = store_all_but(backend, host, old, set())
    parent = backend.committer.start(host, body_for(old_root, old_packs), Budget(60)).body["manifest_id"]
    # The host uploads the new tree's blobs except a random few, and lists only those new packs.
    candidates = sorted({*new.trees, *new.data})
    missing = set(data.draw(st.lists(st.sampled_from(candidates), max_size=2)))
    new_packs = store_all_but(backend, host, new, missing)
    body = body_for(new_root, new_packs, parent, locations=tree_locations(old_packs + new_packs))
    committed = commit_through_jobs(backend, host, body)
    stored = {*old.trees, *old.data} | ({*new.trees, *new.data} - missing)
    if committed:
        assert new.reachable(new_root) <= stored
    if not missing:
        assert committed
