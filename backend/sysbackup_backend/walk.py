"""The commit's Merkle walk: prove every blob a manifest references is stored, at a cost that follows change.

Nodes are trees (the root and every subtree) and stream indexes (a snapshot's `content`). A node whose host
has a closed mark is done without reading it. Other nodes are read from their packs (one ranged GET per pack
per step), verified against their hash, decoded strictly, and their children checked in batches. A node is
closed (and its mark written) once all its data blobs are stored and all its subtrees are closed, so the
next commit of an unchanged subtree stops at its top. The walk's state serialises to bytes so a walk that
outlasts one API call continues in the next (see jobs.py).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.manifest import decode_stream_index
from sysbackup_domain.packs import open_blob
from sysbackup_domain.tree import decode_tree

from .index import BlobIndex, BlobLocation, BlobStatus
from .store import PackStore, pack_key

TREE = "tree"
STREAM = "stream"
NODES_PER_STEP = 300
# Data children looked up per step: 300 directories of 1000 files each would be 600k index keys in one
# step, past the API's time limit; nodes beyond this go back on the stack for the next step. 2000 is
# 40 BatchGetItems: a fraction of a second on DynamoDB, a few seconds on the local stack's moto.
DATA_CHECKS_PER_STEP = 2_000
# How many problem blobs a failed commit reports; past that the walk stops (the host has work to do anyway).
MAX_REPORTED_PROBLEMS = 1000
# Pack reads of one step run in parallel: a step over many packs stays a second or two, not many.
PARALLEL_READS = 8
# Blobs of one pack are read with one ranged GET unless the gap between them exceeds this.
MAX_RANGE_GAP_BYTES = 1024 * 1024


@dataclass
class WalkState:
    # Nodes still to visit: [hash, kind, parent hash or None], visited from the end (depth first, bounded).
    stack: list[list[Any]] = field(default_factory=list)
    # Opened, not yet closed nodes: hash -> [unresolved children, parent hashes].
    open: dict[str, list[Any]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    condemned: list[str] = field(default_factory=list)
    corrupt: dict[str, str] = field(default_factory=dict)
    # Top-level blobs (root, snapshot contents) -> sort key of the index item that holds them.
    anchors: dict[str, str] = field(default_factory=dict)
    trees_read: int = 0
    # Packs holding the blobs this walk looked up (not those under closed subtrees): their locks must
    # cover the new manifest's retain_until (the commit asks the retention worker to extend them).
    packs: list[str] = field(default_factory=list)
    # gc's epoch when the walk began (gc.GcEpoch); -1 if gc was condemning then (such a walk never commits).
    gc_epoch: int = -1

    @classmethod
    def start(cls, root: str | None, stream_indexes: Iterable[str]) -> WalkState:
        state = cls()
        for blob in dict.fromkeys(stream_indexes):
            state.stack.append([blob, STREAM, None])
        if root is not None:
            state.stack.append([root, TREE, None])
        return state

    @property
    def done(self) -> bool:
        return not self.stack

    @property
    def problem_count(self) -> int:
        return len(self.missing) + len(self.condemned) + len(self.corrupt)

    def problems(self) -> dict[str, Any]:
        return {
            "missing": sorted(set(self.missing)),
            "condemned": sorted(set(self.condemned)),
            "corrupt": self.corrupt,
        }

    def to_bytes(self) -> bytes:
        document = {
            "stack": self.stack,
            "open": self.open,
            "missing": self.missing,
            "condemned": self.condemned,
            "corrupt": self.corrupt,
            "anchors": self.anchors,
            "trees_read": self.trees_read,
            "packs": self.packs,
            "gc_epoch": self.gc_epoch,
        }
        return zstandard.ZstdCompressor(level=3).compress(json.dumps(document).encode("ascii"))

    @classmethod
    def from_bytes(cls, data: bytes) -> WalkState:
        document = json.loads(zstandard.ZstdDecompressor().decompress(data))
        return cls(**document)


class Budget:
    """Wall-clock allowance for one call's share of a walk."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + seconds

    def remaining_seconds(self) -> float:
        return self._deadline - self._clock()

    def expired(self) -> bool:
        return self.remaining_seconds() <= 0


def coalesce_ranges(locations: Iterable[BlobLocation]) -> list[tuple[int, int]]:
    """Byte ranges (start, end exclusive) covering the blobs, merging neighbours closer than the gap limit."""
    ranges: list[tuple[int, int]] = []
    for location in sorted(locations, key=lambda loc: loc.offset):
        end = location.offset + location.length
        if ranges and location.offset - ranges[-1][1] <= MAX_RANGE_GAP_BYTES:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((location.offset, end))
    return ranges


def _note_packs(state: WalkState, statuses: Iterable[BlobStatus]) -> None:
    found = {status.location.pack_id for status in statuses if status.location is not None}
    if not found <= set(state.packs):
        state.packs = sorted(found.union(state.packs))


def read_stored_blobs(
    store: PackStore, locations: dict[str, BlobLocation]
) -> Iterator[tuple[str, BlobLocation, memoryview]]:
    """Each blob's stored (still encoded) bytes: one ranged GET per pack per cluster of nearby blobs, the
    GETs in parallel."""
    by_pack: dict[str, dict[str, BlobLocation]] = defaultdict(dict)
    for blob, location in locations.items():
        by_pack[location.pack_id][blob] = location
    reads = [
        (pack_id, start, end, blobs)
        for pack_id, blobs in by_pack.items()
        for start, end in coalesce_ranges(blobs.values())
    ]
    if not reads:
        return
    with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(reads))) as pool:
        spans = pool.map(lambda read: store.read_range(pack_key(read[0]), read[1], read[2] - 1), reads)
        for (_, start, end, blobs), span in zip(reads, spans, strict=True):
            view = memoryview(span)
            for blob, location in blobs.items():
                if start <= location.offset < end:
                    yield (
                        blob,
                        location,
                        view[location.offset - start : location.offset - start + location.length],
                    )


class TreeWalker:
    def __init__(self, index: BlobIndex, store: PackStore, host: str) -> None:
        self.index = index
        self.store = store
        self.host = host

    def run(self, state: WalkState, budget: Budget) -> None:
        """Walk until done or out of time; always makes at least one step of progress."""
        while not state.done:
            self.step(state)
            if state.problem_count >= MAX_REPORTED_PROBLEMS:
                state.stack.clear()
            if budget.expired():
                return

    def step(self, state: WalkState) -> None:
        """Visit up to NODES_PER_STEP nodes: look them up, read the unclosed ones, check their children."""
        batch = self._pop_batch(state)
        if not batch:
            return
        newly_closed: list[str] = []
        to_read = self._classify(state, batch, newly_closed)
        children = self._defer_beyond_limit(
            state, batch, self._decode(state, batch, self._read_blobs(state, to_read))
        )
        data_status = self._check_data(state, {blob for data, _ in children.values() for blob in data})
        for blob, (data, subtrees) in children.items():
            blocked = sum(1 for child in data if not data_status[child].stored)
            state.open[blob] = [len(subtrees) + blocked, list(batch[blob][1])]
            for subtree in subtrees:
                state.stack.append([subtree, TREE, blob])
            if state.open[blob][0] == 0:
                self._close(state, blob, newly_closed)
        if newly_closed:
            self.index.record_closed(self.host, newly_closed)

    @staticmethod
    def _defer_beyond_limit(
        state: WalkState,
        batch: dict[str, tuple[str, list[str | None]]],
        children: dict[str, tuple[set[str], set[str]]],
    ) -> dict[str, tuple[set[str], set[str]]]:
        """This step's nodes up to DATA_CHECKS_PER_STEP data children (at least one node); the rest are
        pushed back as they were popped, to be read again next step (a tree read costs less than a
        walk that outlasts its call)."""
        kept: dict[str, tuple[set[str], set[str]]] = {}
        checks = 0
        for blob, (data, subtrees) in children.items():
            if kept and checks + len(data) > DATA_CHECKS_PER_STEP:
                kind, parents = batch[blob]
                state.stack.extend([blob, kind, parent] for parent in parents)
                continue
            kept[blob] = (data, subtrees)
            checks += len(data)
        return kept

    def _pop_batch(self, state: WalkState) -> dict[str, tuple[str, list[str | None]]]:
        """The next distinct nodes to visit, each with the parents that reference it."""
        batch: dict[str, tuple[str, list[str | None]]] = {}
        while state.stack and len(batch) < NODES_PER_STEP:
            blob, kind, parent = state.stack.pop()
            if blob in state.open:
                # A shared subtree another parent already opened: its closing resolves this parent too.
                state.open[blob][1].append(parent)
                continue
            batch.setdefault(blob, (kind, []))[1].append(parent)
        return batch

    def _classify(
        self, state: WalkState, batch: dict[str, tuple[str, list[str | None]]], newly_closed: list[str]
    ) -> dict[str, BlobLocation]:
        """Record problems, resolve closed nodes; returns where the nodes that must be read are."""
        statuses = self.index.lookup(self.host, batch, with_closed=True)
        _note_packs(state, statuses.values())
        to_read: dict[str, BlobLocation] = {}
        for blob, (kind, parents) in batch.items():
            status = statuses[blob]
            if None in parents and status.source_sk is not None:
                state.anchors[blob] = status.source_sk
            if status.condemned:
                state.condemned.append(blob)
            elif status.location is None:
                state.missing.append(blob)
            elif status.in_corrupt_pack:
                state.corrupt[blob] = f"pack {status.location.pack_id} failed verification"
            elif status.closed:
                self._resolve(state, parents, newly_closed)
            elif status.location.kind != ("tree" if kind == TREE else "data"):
                state.corrupt[blob] = f"indexed as a {status.location.kind} blob, referenced as a {kind}"
            else:
                to_read[blob] = status.location
        return to_read

    def _check_data(self, state: WalkState, data_blobs: set[str]) -> dict[str, BlobStatus]:
        """Look up the data children of this step's nodes (batched) and record those not stored."""
        if not data_blobs:
            return {}
        statuses = self.index.lookup(self.host, data_blobs)
        _note_packs(state, statuses.values())
        for blob in sorted(data_blobs):
            if statuses[blob].condemned:
                state.condemned.append(blob)
            elif statuses[blob].in_corrupt_pack:
                state.corrupt[blob] = "its pack failed verification"
            elif not statuses[blob].stored:
                state.missing.append(blob)
        return statuses

    def _resolve(self, state: WalkState, parents: Iterable[str | None], newly_closed: list[str]) -> None:
        for parent in parents:
            if parent is None or parent not in state.open:
                continue
            state.open[parent][0] -= 1
            if state.open[parent][0] == 0:
                self._close(state, parent, newly_closed)

    def _close(self, state: WalkState, blob: str, newly_closed: list[str]) -> None:
        parents = state.open.pop(blob)[1]
        newly_closed.append(blob)
        self._resolve(state, parents, newly_closed)

    def _read_blobs(self, state: WalkState, locations: dict[str, BlobLocation]) -> dict[str, bytes]:
        """Fetch and verify the blobs: one ranged GET per pack (per cluster of nearby blobs), in parallel."""
        plaintexts: dict[str, bytes] = {}
        for blob, location, stored in read_stored_blobs(self.store, locations):
            self._open(state, plaintexts, blob, location, stored)
        return plaintexts

    @staticmethod
    def _open(
        state: WalkState, plaintexts: dict[str, bytes], blob: str, location: BlobLocation, stored: memoryview
    ) -> None:
        try:
            plaintexts[blob] = open_blob(location.entry(blob), stored)
        except CorruptBlob as error:
            state.corrupt[blob] = str(error)

    def _decode(
        self,
        state: WalkState,
        batch: dict[str, tuple[str, list[str | None]]],
        plaintexts: dict[str, bytes],
    ) -> dict[str, tuple[set[str], set[str]]]:
        """Each readable node's (data children, subtree children); undecodable nodes count as corrupt."""
        children: dict[str, tuple[set[str], set[str]]] = {}
        for blob, plaintext in plaintexts.items():
            kind = batch[blob][0]
            try:
                if kind == TREE:
                    tree = decode_tree(plaintext)
                    state.trees_read += 1
                    data = {content for entry in tree.entries for content in entry.content}
                    subtrees = {entry.subtree for entry in tree.entries if entry.subtree is not None}
                    children[blob] = (data, subtrees)
                else:
                    children[blob] = (set(decode_stream_index(plaintext)), set())
            except InvalidDocument as error:
                state.corrupt[blob] = f"not a valid {kind}: {error}"
        return children
