"""What a commit sends besides the manifest: `packs` and `locations` (docs/PACK_INDEX.md).

The backend's commit walk pairs each new tree with the parent's tree at the same place, from the
root down, and stops where they are equal. This module walks the same pairs on the host:
- `packs`: the packs (from the local index) of every blob the walk will look for in them: new trees,
  new stream indexes, and file/stream chunks the parent did not hold at the same place;
- `locations`: where the trees and stream indexes the walk reads are, the new ones and the parent's.

The trees' share is gathered while the run builds its trees (TreeChanges), against the parent the
cache's view describes (tree memo, file rows) or no parent: no request, and the run's directories need
not be held until the commit. When the commit goes on another parent (taken from the backend after a
crash, a lost cache, a conflict) the same pairs are walked over the stored trees instead (TreeWalk):
the parent's and this run's own are read back through the local index.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from sysbackup_domain.manifest import MAX_COMMIT_PACKS, BlobLocation, SnapshotRecord
from sysbackup_domain.tree import TreeEntry, decode_tree

from .cache import IndexedBlob, ParentSnapshot

# The contract allows 100,000 locations, but each is ~200 bytes of JSON and API Gateway takes 10 MB:
# past this many, new trees are left to the listed packs' trailers (the parent's are sent first).
MAX_LOCATIONS_SENT = 20_000

FetchBlobs = Callable[[Iterable[str]], Mapping[str, bytes]]  # verified plaintext by hash


class NewChild(NamedTuple):
    """An entry of a tree this run made, as the walk compares it."""

    name: str
    type: str
    content: tuple[str, ...]
    subtree: str | None


class NewTrees(Protocol):
    """The entries of each tree of the new manifest."""

    def children(self, tree: str) -> Iterable[NewChild]: ...

    def prefetch(self, trees: Iterable[str]) -> None: ...


class TreeShare(Protocol):
    """The blobs the backend's walk of the trees needs: (listed, read), as walk_changes returns them."""

    def blobs(self) -> tuple[set[str], set[str]]: ...


class PlanTooLarge(RuntimeError):
    """The commit would need more packs listed than the backend takes in one request."""


@dataclass(frozen=True)
class ParentChild:
    """What the parent had at a place: a file's content or a directory's tree."""

    content: frozenset[str] = frozenset()
    subtree: str | None = None


class ParentSide(Protocol):
    """The parent manifest's entries at a place, by name (only names the new tree has are asked)."""

    def child(self, path: str, tree: str, name: str) -> ParentChild | None: ...

    def prefetch(self, trees: Iterable[str]) -> None: ...


@dataclass
class ViewParent:
    """The parent from the cache's own view of it: tree memo (path -> tree) and file rows."""

    memo: Mapping[str, tuple[str, str]]
    file_content: Callable[[str], tuple[str, ...] | None]

    def child(self, path: str, tree: str, name: str) -> ParentChild | None:
        child_path = os.path.join(path, name)
        remembered = self.memo.get(child_path)
        if remembered is not None:
            return ParentChild(subtree=remembered[1])
        content = self.file_content(child_path)
        return ParentChild(content=frozenset(content)) if content is not None else None

    def prefetch(self, trees: Iterable[str]) -> None:
        pass  # nothing to read


@dataclass
class FetchedParent:
    """The parent's trees read from storage (the cache's view is of another manifest)."""

    fetch: FetchBlobs
    trees: dict[str, dict[str, TreeEntry]] = field(default_factory=dict)  # tree -> name -> entry

    def child(self, path: str, tree: str, name: str) -> ParentChild | None:
        entry = self.trees[tree].get(name)
        if entry is None:
            return None
        if entry.type == "dir":
            return ParentChild(subtree=entry.subtree)
        return ParentChild(content=frozenset(entry.content)) if entry.type == "file" else None

    def prefetch(self, trees: Iterable[str]) -> None:
        wanted = set(trees) - self.trees.keys()
        if wanted:
            for digest, data in self.fetch(wanted).items():
                self.trees[digest] = {entry.name: entry for entry in decode_tree(data).entries}


@dataclass
class StoredTrees:
    """This run's trees read back from storage, a level of the walk at a time (only the level being
    walked is held)."""

    fetch: FetchBlobs
    trees: dict[str, tuple[NewChild, ...]] = field(default_factory=dict)

    def children(self, tree: str) -> Iterable[NewChild]:
        return self.trees[tree]

    def prefetch(self, trees: Iterable[str]) -> None:
        self.trees = {
            digest: tuple(
                NewChild(entry.name, entry.type, tuple(entry.content), entry.subtree)
                for entry in decode_tree(data).entries
            )
            for digest, data in self.fetch(set(trees)).items()
        }


@dataclass
class TreeChanges:
    """The trees' share, gathered while the run builds its trees bottom-up, against the parent whose
    trees by directory path are `old_trees` (the cache's tree memo; empty for no parent).

    The backend walks a directory iff its new tree differs from the parent's at the same path (if
    they were equal, so would every tree below be); there the chunks of a file that the parent's
    file at the same path lacks are listed."""

    parent: str | None
    old_trees: Mapping[str, tuple[str, str]]  # path -> (signature, tree)
    listed: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)

    def add_directory(
        self, path: str, tree: str, files: Iterable[tuple[tuple[str, ...], tuple[str, ...]]]
    ) -> None:
        """A directory's tree, with its files' (content, the parent view's content at its path)."""
        remembered = self.old_trees.get(path)
        old = remembered[1] if remembered is not None else None
        if tree == old:
            return
        self.listed.add(tree)
        self.read.add(tree)
        if old is not None:
            self.read.add(old)
        for content, held in files:
            if self.parent is None:
                self.listed.update(content)
            elif content is not held:  # the same tuple: a reused file holds what the parent held
                self.listed.update(digest for digest in content if digest not in held)

    def blobs(self) -> tuple[set[str], set[str]]:
        return self.listed, self.read


@dataclass
class TreeWalk:
    """The trees' share found by walking the new trees against a parent's, from the root down."""

    root: str | None
    parent_root: str | None
    root_path: str
    new_trees: NewTrees
    parent: ParentSide

    def blobs(self) -> tuple[set[str], set[str]]:
        listed: set[str] = set()
        read: set[str] = set()
        _walk_trees(self, listed, read)
        return listed, read


@dataclass
class CommitPlan:
    packs: list[str]
    locations: dict[str, dict]
    unlocated: set[str]  # blobs the walk needs that the local index does not know

    def request_fields(self) -> dict:
        return {"packs": self.packs, "locations": self.locations}


@dataclass
class PlanInputs:
    trees: TreeShare
    snapshots: list[SnapshotRecord]
    chunks_of: Mapping[str, tuple[str, ...]]  # stream index hash -> its chunks (this run's snapshots)
    parent_snapshots: Mapping[str, ParentSnapshot]


def walk_changes(inputs: PlanInputs) -> tuple[set[str], set[str]]:
    """(blobs whose packs the commit lists, blobs whose locations it sends), as the backend walks.

    The snapshots' blobs are added to the trees' share's own sets (a 100k-file first backup lists
    100k chunks: no copy); adding them again on a re-plan changes nothing."""
    listed, read = inputs.trees.blobs()
    for snapshot in inputs.snapshots:
        index = snapshot.content
        if index is None:
            continue
        before = inputs.parent_snapshots.get(snapshot.name)
        if before is not None and before.stream_index == index:
            continue
        listed.add(index)
        read.add(index)
        held = set(before.chunks) if before is not None else set()
        if before is not None:
            read.add(before.stream_index)
        listed.update(chunk for chunk in inputs.chunks_of[index] if chunk not in held)
    return listed, read


def _walk_trees(inputs: TreeWalk, listed: set[str], read: set[str]) -> None:
    level: list[tuple[str, str, str | None]] = []
    if inputs.root is not None:
        level.append((inputs.root_path, inputs.root, inputs.parent_root))
    while level:
        level = [(path, new, old) for path, new, old in level if new != old]
        inputs.parent.prefetch({old for _, _, old in level if old is not None})
        inputs.new_trees.prefetch({new for _, new, _ in level})
        following: list[tuple[str, str, str | None]] = []
        for path, new, old in level:
            listed.add(new)
            read.add(new)
            if old is not None:
                read.add(old)
            for entry in inputs.new_trees.children(new):
                before = inputs.parent.child(path, old, entry.name) if old is not None else None
                following.extend(_compare_entry(path, entry, before, listed))
        level = following


def _compare_entry(
    path: str, entry: NewChild, before: ParentChild | None, listed: set[str]
) -> list[tuple[str, str, str | None]]:
    """List the entry's chunks the parent's same-named file lacks; a directory is walked next."""
    if entry.type == "dir" and entry.subtree is not None:
        return [(os.path.join(path, entry.name), entry.subtree, before.subtree if before else None)]
    held = before.content if before is not None else frozenset()
    listed.update(digest for digest in entry.content if digest not in held)
    return []


class BlobIndex(Protocol):
    """The local index, as the plan asks it (ParentCache)."""

    def packs_of(self, hashes: Iterable[str]) -> tuple[set[str], set[str]]: ...

    def locate(self, hashes: Iterable[str]) -> dict[str, IndexedBlob]: ...


def resolve(listed: set[str], read: set[str], index: BlobIndex) -> CommitPlan:
    """Turn blobs into pack ids and locations with the local index's answers.

    Only the packs of `listed` are asked (a first backup lists every chunk: a row each, 100k of
    them, took ~50 MB); `read` (trees, stream indexes) is located in full."""
    packs, unlocated = index.packs_of(listed)
    located = index.locate(read)
    unlocated |= read - located.keys()
    locations: dict[str, dict] = {}
    # The parent's blobs first: nothing else tells the backend where they are.
    for digest in sorted(read - listed) + sorted(read & listed):
        if len(locations) >= MAX_LOCATIONS_SENT:
            break
        if digest in located:
            locations[digest] = _location(located[digest])
    overflow = [digest for digest in read - listed if digest in located and digest not in locations]
    packs.update(located[digest].pack_id for digest in overflow)
    if len(packs) > MAX_COMMIT_PACKS:
        raise PlanTooLarge(
            f"this run's new blobs are in {len(packs)} packs, more than the {MAX_COMMIT_PACKS} one commit "
            "may list (docs/PACK_INDEX.md). Back up in parts: let pickers.d pick part of the tree, run, "
            "then the rest; what was sent stays in this host's index and is not sent again"
        )
    return CommitPlan(sorted(packs), locations, unlocated)


def _location(blob: IndexedBlob) -> dict:
    entry = blob.entry
    return BlobLocation(blob.pack_id, entry.offset, entry.length, entry.codec, entry.raw_length).to_json()
