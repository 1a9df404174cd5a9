"""The commit's walk: prove every blob a manifest references is stored, at a cost that follows change.

The walk diffs the new manifest against its parent (the host's HEAD, live and gc-protected by the epoch
check). Its queue holds pairs (new node, the parent's node at the same place or None), nodes being trees
and snapshot stream indexes. A pair whose two sides are equal is stored: nothing under it is read. Else both
sides are read and compared: a file's blob the parent's same-named file also holds is stored, a directory
enqueues (its subtree, the parent's same-named subtree), a stream index's chunk in the parent's same-named
snapshot is stored. Every other blob must be in the trailer of a pack the host listed and may use
(docs/PACK_INDEX.md, "The commit walk"); the trailers are the index, read once per call (ListedPacks).
The walk's state serialises to bytes so a walk that outlasts one API call continues in the next (jobs.py).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zstandard
from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.manifest import BlobLocation, decode_stream_index
from sysbackup_domain.packs import PackEntry, open_blob
from sysbackup_domain.tree import Tree, decode_tree

from .registry import (
    PACK_CONDEMNED,
    PACK_CORRUPT,
    PACK_DELETING,
    PACK_PRESIGNED,
    PackRecord,
    PackRegistry,
)
from .store import PackStore, object_missing, pack_key
from .verification import checked_pack_entries

logger = Logger(child=True)

TREE = "tree"
STREAM = "stream"
# Pairs popped per step: their reads are one ranged GET per pack (per cluster of nearby blobs).
NODES_PER_STEP = 300
# Children compared per step (at least one node): a step over 300 directories of 100k files each would run
# past the API's time limit; nodes beyond this go back on the stack for the next step.
DATA_CHECKS_PER_STEP = 20_000
# How many problem blobs a failed commit reports; past that the walk stops (the host has work to do anyway).
MAX_REPORTED_PROBLEMS = 1000
# Pack reads of one step run in parallel: a step over many packs stays a second or two, not many.
PARALLEL_READS = 8
# Blobs of one pack are read with one ranged GET unless the gap between them exceeds this.
MAX_RANGE_GAP_BYTES = 1024 * 1024
# Presigned packs up to this size are read whole (one GET serves trailer and blobs) and verified inline.
INLINE_VERIFY_MAX_BYTES = 4 * 1024 * 1024
INLINE_VERIFY_MAX_PACKS = 20
# The parent's hinted trees are read in one batch at the first need, up to these bounds (the rest as needed).
PREFETCH_MAX_BLOBS = 2000
PREFETCH_MAX_BYTES = 32 * 1024 * 1024

# Why a listed pack was refused (the 422 body's `packs`).
REASON_UNKNOWN = "unknown"
REASON_NOT_YOURS = "not_yours"
REASON_UNREADABLE = "unreadable"
REASON_CORRUPT = "corrupt"
_REFUSED_STATES = {
    PACK_CONDEMNED: "condemned",
    PACK_DELETING: "deleting",
    PACK_CORRUPT: REASON_CORRUPT,
}


@dataclass
class WalkState:
    # Pairs still to visit: [new hash, parent's hash at the same place or None, TREE|STREAM], from the end.
    stack: list[list[Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    # Blobs that hash right but are not what they are referenced as (a tree that does not decode).
    invalid: dict[str, str] = field(default_factory=dict)
    # Listed packs refused after their record looked usable (a blob that does not match the trailer).
    refused_packs: dict[str, str] = field(default_factory=dict)
    trees_read: int = 0
    # Listed packs the manifest's new blobs were found in: their locks must cover the new manifest's
    # retain_until, and the presigned ones go to the verifier.
    packs: list[str] = field(default_factory=list)
    # gc's epoch when the walk began (gc.GcEpoch); -1 if gc was condemning then (such a walk never commits).
    gc_epoch: int = -1

    @classmethod
    def start(cls, pairs: Iterable[tuple[str, str | None, str]]) -> WalkState:
        """A walk of (new, parent or None, kind) pairs, the first one visited first."""
        state = cls()
        for new, parent, kind in dict.fromkeys(pairs):
            state.stack.insert(0, [new, parent, kind])
        return state

    @property
    def done(self) -> bool:
        return not self.stack

    @property
    def problem_count(self) -> int:
        return len(self.missing) + len(self.invalid)

    def to_bytes(self) -> bytes:
        return zstandard.ZstdCompressor(level=3).compress(json.dumps(self.__dict__).encode("ascii"))

    @classmethod
    def from_bytes(cls, data: bytes) -> WalkState:
        return cls(**json.loads(zstandard.ZstdDecompressor().decompress(data)))


class Budget:
    """Wall-clock allowance for one call's share of a walk."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = clock() + seconds

    def remaining_seconds(self) -> float:
        return self._deadline - self._clock()

    def expired(self) -> bool:
        return self.remaining_seconds() <= 0


@dataclass(frozen=True)
class BlobPlace:
    """A blob's entry in a pack (from a trailer, or a host's location hint)."""

    pack_id: str
    entry: PackEntry


def coalesce_ranges(entries: Iterable[PackEntry]) -> list[tuple[int, int]]:
    """Byte ranges (start, end exclusive) covering the blobs, merging neighbours closer than the gap limit."""
    ranges: list[tuple[int, int]] = []
    for entry in sorted(entries, key=lambda item: item.offset):
        end = entry.offset + entry.length
        if ranges and entry.offset - ranges[-1][1] <= MAX_RANGE_GAP_BYTES:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((entry.offset, end))
    return ranges


def read_stored_blobs(
    store: PackStore, places: Mapping[str, BlobPlace], bodies: Mapping[str, bytes] | None = None
) -> Iterator[tuple[str, BlobPlace, memoryview | None]]:
    """Each blob's stored (still encoded) bytes, or None if its range could not be read: one ranged GET per
    pack per cluster of nearby blobs, the GETs in parallel; packs in `bodies` (read whole) cost no GET."""
    held = bodies or {}
    by_pack: dict[str, dict[str, BlobPlace]] = defaultdict(dict)
    for blob, place in places.items():
        by_pack[place.pack_id][blob] = place
    reads = [
        (pack_id, start, end, blobs)
        for pack_id, blobs in by_pack.items()
        for start, end in coalesce_ranges(place.entry for place in blobs.values())
    ]
    if not reads:
        return

    def fetch(read: tuple[str, int, int, dict[str, BlobPlace]]) -> bytes | None:
        pack_id, start, end = read[:3]
        if pack_id in held:
            return held[pack_id][start:end]
        if start == end:
            return b""  # only empty blobs: nothing to fetch
        try:
            return store.read_range(pack_key(pack_id), start, end - 1)
        except (ClientError, OSError) as error:
            if isinstance(error, ClientError) and not object_missing(error):
                raise  # S3 failing is no finding about the pack: the call fails, the host retries
            logger.info("pack range unreadable", extra={"pack_id": pack_id, "error": str(error)})
            return None  # gone, or a range past its end: not there as claimed

    with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(reads))) as pool:
        for (_, start, end, blobs), span in zip(reads, pool.map(fetch, reads), strict=True):
            view = memoryview(span) if span is not None else None
            for blob, place in blobs.items():
                if not start <= place.entry.offset <= place.entry.offset + place.entry.length <= end:
                    continue  # in another range of the same pack
                offset = place.entry.offset - start
                yield blob, place, None if view is None else view[offset : offset + place.entry.length]


def _verifiable_inline(record: PackRecord) -> bool:
    return record.state == PACK_PRESIGNED and record.size <= INLINE_VERIFY_MAX_BYTES


class ListedPacks:
    """The packs a commit listed, as one call sees them: which are refused and why, and the blobs the usable
    ones hold (their trailers). Small presigned packs are read whole and verified here."""

    def __init__(
        self,
        registry: PackRegistry,
        store: PackStore,
        host: str,
        records: Mapping[str, PackRecord],
        readable: Iterable[str] = (),
    ) -> None:
        self.registry = registry
        self.store = store
        self.host = host
        self.records = dict(records)
        self.refused: dict[str, str] = {}
        # Every blob of the usable listed packs -> the first such pack holding it; the entry (where it is)
        # only for what the walk may read: trees, and the `readable` blobs (the request's stream indexes and
        # hinted blobs), as a million-blob first backup's entries would not fit a Lambda's memory.
        self.packs_of: dict[str, str] = {}
        self.entries: dict[str, PackEntry] = {}
        self._readable = frozenset(readable)
        self.bodies: dict[str, bytes] = {}  # packs read whole
        self.verified_inline: dict[str, int] = {}  # pack -> blob count, for the commit's transaction
        self._unread: list[PackRecord] = []  # usable listed packs whose trailers are not read yet

    def load(self, pack_ids: Sequence[str]) -> ListedPacks:
        """Classify the listed packs; their trailers are read at the first lookup (a walk that finds
        everything in the parent reads none)."""
        for pack_id in pack_ids:
            record = self.records.get(pack_id)
            reason = self._refusal(record)
            if reason is not None:
                self.refused[pack_id] = reason
            elif record is not None:
                self._unread.append(record)
        return self

    def _read_trailers(self) -> None:
        """Read the usable packs' trailers in parallel; small presigned ones whole, verified inline."""
        usable, self._unread = self._unread, []
        if not usable:
            return
        small = [record.pack_id for record in usable if _verifiable_inline(record)]
        inline = set(small[:INLINE_VERIFY_MAX_PACKS])
        with ThreadPoolExecutor(max_workers=min(PARALLEL_READS, len(usable))) as pool:
            loaded = pool.map(lambda record: self._read(record, record.pack_id in inline), usable)
            for record, (entries, body, problem) in zip(usable, loaded, strict=True):
                if problem is not None:
                    self._refuse_read(record.pack_id, *problem)
                    continue
                if body is not None:
                    self.bodies[record.pack_id] = body
                    self.verified_inline[record.pack_id] = len(entries)
                self._index(record.pack_id, entries)

    def _index(self, pack_id: str, entries: list[PackEntry]) -> None:
        for entry in entries:
            if entry.hash in self.packs_of:
                continue
            self.packs_of[entry.hash] = pack_id
            if entry.kind == "tree" or entry.hash in self._readable:
                self.entries[entry.hash] = entry

    def _refusal(self, record: PackRecord | None) -> str | None:
        if record is None:
            return REASON_UNKNOWN
        if self.host not in record.hosts:
            return REASON_NOT_YOURS
        return _REFUSED_STATES.get(record.state)

    def _read(
        self, record: PackRecord, whole: bool
    ) -> tuple[list[PackEntry], bytes | None, tuple[bool, str] | None]:
        """(trailer entries, the whole pack if read whole, None) or ([], None, (damaged?, why))."""
        try:
            if not whole:
                return self.store.read_pack_trailer(record.pack_id, record.size), None, None
            body = self.store.read(pack_key(record.pack_id))
            return checked_pack_entries(record.pack_id, body), body, None
        except ClientError as error:
            if not object_missing(error):
                raise
            return [], None, (False, f"no object: {error}")  # presigned, never uploaded (or gone)
        except OSError as error:
            return [], None, (False, str(error))
        except (InvalidDocument, CorruptBlob) as error:
            return [], None, (True, str(error))

    def _refuse_read(self, pack_id: str, damaged: bool, why: str) -> None:
        if damaged:
            self.reject(pack_id, why)
        else:
            logger.info("listed pack unreadable", extra={"pack_id": pack_id, "reason": why})
            self.unreadable(pack_id)

    def unreadable(self, pack_id: str) -> str:
        """A pack (or a range of it) is not in the bucket as its record says: refused, marked nothing."""
        return self._refuse(pack_id, REASON_UNREADABLE)

    def reject(self, pack_id: str, why: str) -> str:
        """A usable-looking pack whose content is not what its trailer says: corrupt if still unverified
        (marked so for every host), unreadable if verified (the verifier saw it good: damage since)."""
        record = self.records.get(pack_id)
        if record is not None and record.state == PACK_PRESIGNED:
            logger.warning("listed pack is corrupt", extra={"pack_id": pack_id, "reason": why})
            self.registry.mark_corrupt(pack_id, why)
            reason = REASON_CORRUPT
        else:
            logger.error(
                "verified pack does not match its trailer", extra={"pack_id": pack_id, "reason": why}
            )
            reason = REASON_UNREADABLE
        return self._refuse(pack_id, reason)

    def _refuse(self, pack_id: str, reason: str) -> str:
        self.refused[pack_id] = reason
        self.verified_inline.pop(pack_id, None)
        self.bodies.pop(pack_id, None)
        self.packs_of = {blob: holder for blob, holder in self.packs_of.items() if holder != pack_id}
        self.entries = {blob: entry for blob, entry in self.entries.items() if blob in self.packs_of}
        return reason

    def pack_of(self, blob: str) -> str | None:
        """The usable listed pack holding the blob, or None."""
        if self._unread:
            self._read_trailers()
        return self.packs_of.get(blob)

    def place(self, blob: str) -> BlobPlace | None:
        """Where in a usable listed pack a tree or a stream index of the request is, or None."""
        pack_id = self.pack_of(blob)
        entry = self.entries.get(blob)
        return BlobPlace(pack_id, entry) if pack_id is not None and entry is not None else None

    def readable_hint(self, location: BlobLocation | None) -> bool:
        """A hint is read only from a pack the host may read (its own, not being deleted)."""
        if location is None:
            return False
        record = self.records.get(location.pack_id)
        return record is not None and self.host in record.hosts and record.state != PACK_DELETING


@dataclass
class _Node:
    """One popped pair with what was read of it."""

    new: str
    parent: str | None
    kind: str
    new_place: BlobPlace
    new_plain: bytes | None = None
    parent_plain: bytes | None = None


@dataclass(frozen=True)
class _Children:
    """A decoded node: a tree, or a stream index's chunks; `width` is how many children comparing costs."""

    tree: Tree | None
    chunks: list[str]
    width: int


class TreeWalker:
    def __init__(
        self,
        store: PackStore,
        listed: ListedPacks,
        locations: Mapping[str, BlobLocation],
    ) -> None:
        self.store = store
        self.listed = listed
        self.locations = locations
        # Nodes this call compared against nothing: every blob under them is proven (or reported) wherever
        # they appear again (kept per call only: the job's state stays small; a repeat in a later call is
        # merely walked again).
        self.walked: set[str] = set()
        # The parent-side blobs the hints locate, read at the first need in one batch (see _prefetch).
        self._prefetched: dict[str, bytes] | None = None
        # The trees the listed packs hold, read at the first step in one batch (see _read_ahead).
        self._read_ahead_trees: dict[str, bytes] | None = None
        self._noted: set[str] = set()  # state.packs, as a set during a step

    def run(self, state: WalkState, budget: Budget) -> None:
        """Walk until done or out of time; always makes at least one step of progress."""
        while not state.done:
            self.step(state)
            if state.problem_count >= MAX_REPORTED_PROBLEMS:
                state.stack.clear()
            if budget.expired():
                return

    def step(self, state: WalkState) -> None:
        """Visit up to NODES_PER_STEP pairs: read both sides of the changed ones and compare them."""
        self._noted = set(state.packs)  # a set: every data child is noted
        nodes: list[_Node] = []
        while state.stack and len(nodes) < NODES_PER_STEP:
            new, parent, kind = state.stack.pop()
            if new == parent or new in self.walked:
                continue  # the parent's node, stored; or one this walk already proved whole
            place = self._new_place(state, new)
            if place is not None:
                nodes.append(_Node(new, parent, kind, place))
        self._read(state, nodes)
        checks = 0
        for position, node in enumerate(nodes):
            children = self._decode(state, node)
            if children is None:
                continue
            if checks and checks + children.width > DATA_CHECKS_PER_STEP:
                # The rest waits for the next step (read again then: cheaper than outlasting the call).
                state.stack.extend([n.new, n.parent, n.kind] for n in reversed(nodes[position:]))
                return
            checks += children.width
            self._compare(state, node, children)

    def _new_place(self, state: WalkState, blob: str) -> BlobPlace | None:
        """Where a new node is: only a usable listed pack's trailer proves it stored."""
        place = self.listed.place(blob)
        if place is None:
            state.missing.append(blob)
            return None
        self._note_pack(state, place.pack_id)
        return place

    def _hinted_place(self, blob: str) -> BlobPlace | None:
        """Where a hint says a blob the listed packs do not hold is, if the host may read that pack."""
        location = self.locations.get(blob)
        if location is None or not self.listed.readable_hint(location):
            return None
        return BlobPlace(location.pack_id, location.entry(blob, "tree"))

    def _parent_plaintexts(self, state: WalkState, parents: set[str]) -> dict[str, bytes]:
        """The parent sides: from listed packs, else where the hints say (all hinted ones read at once)."""
        if self._prefetched is None and any(self.listed.place(blob) is None for blob in parents):
            self._prefetched = self._prefetch(state)
        held = self._prefetched or {}
        places = {
            blob: place
            for blob in parents - held.keys()
            if (place := self.listed.place(blob) or self._hinted_place(blob)) is not None
        }
        return {
            **self._fetch(state, places, from_trailer=False),
            **{b: held[b] for b in parents & held.keys()},
        }

    def _prefetch(self, state: WalkState) -> dict[str, bytes]:
        """Every hinted blob outside the listed packs (the parent's trees on the changed paths), read in one
        batch: one ranged GET per pack and cluster instead of one per level of the tree."""
        places: dict[str, BlobPlace] = {}
        total = 0
        for blob in self.locations:
            place = None if self.listed.place(blob) is not None else self._hinted_place(blob)
            if place is None:
                continue
            if len(places) >= PREFETCH_MAX_BLOBS or total + place.entry.length > PREFETCH_MAX_BYTES:
                break
            places[blob] = place
            total += place.entry.length
        return self._fetch(state, places, from_trailer=False)

    def _note_pack(self, state: WalkState, pack_id: str) -> None:
        if pack_id not in self._noted:
            self._noted.add(pack_id)
            state.packs.append(pack_id)

    def _read_ahead(self) -> dict[str, bytes]:
        """Every tree the listed packs hold (up to the prefetch bounds), read in one batch: one ranged GET
        per pack and cluster (a run's trees share packs of their own) instead of one per level of the tree.
        A tree that does not check out here is only not used: its step reads it again and judges it."""
        places: dict[str, BlobPlace] = {}
        total = 0
        for blob, entry in self.listed.entries.items():
            place = self.listed.place(blob) if entry.kind == "tree" else None
            if place is None:
                continue
            if len(places) >= PREFETCH_MAX_BLOBS or total + entry.length > PREFETCH_MAX_BYTES:
                break
            places[blob] = place
            total += entry.length
        found: dict[str, bytes] = {}
        for blob, place, stored in read_stored_blobs(self.store, places, self.listed.bodies):
            with contextlib.suppress(CorruptBlob):
                if stored is not None:
                    found[blob] = open_blob(place.entry, stored)
        return found

    def _read(self, state: WalkState, nodes: list[_Node]) -> None:
        """Read the new and parent sides of the nodes (each checked against its hash)."""
        if self._read_ahead_trees is None and nodes:
            self._read_ahead_trees = self._read_ahead()
        ahead = self._read_ahead_trees or {}
        plain = {node.new: ahead[node.new] for node in nodes if node.new in ahead}
        rest = {node.new: node.new_place for node in nodes if node.new not in plain}
        plain.update(self._fetch(state, rest, from_trailer=True))
        parents = {node.parent for node in nodes if node.parent is not None} - plain.keys()
        parent_plain = self._parent_plaintexts(state, parents) if parents else {}
        for node in nodes:
            node.new_plain = plain.get(node.new)
            if node.new_plain is None and node.new not in state.missing:
                state.missing.append(node.new)
            if node.parent is not None:
                node.parent_plain = plain.get(node.parent, parent_plain.get(node.parent))

    def _fetch(self, state: WalkState, places: dict[str, BlobPlace], from_trailer: bool) -> dict[str, bytes]:
        """Plaintexts of the blobs whose bytes are what their place claims; a trailer that lies refuses its
        pack, a wrong hint is only not used."""
        found: dict[str, bytes] = {}
        for blob, place, stored in read_stored_blobs(self.store, places, self.listed.bodies):
            try:
                if stored is None:
                    if from_trailer:
                        state.refused_packs[place.pack_id] = self.listed.unreadable(place.pack_id)
                    continue
                found[blob] = open_blob(place.entry, stored)
            except CorruptBlob as error:
                if from_trailer:
                    state.refused_packs[place.pack_id] = self.listed.reject(place.pack_id, str(error))
                else:
                    logger.info(
                        "location hint did not hold the blob", extra={"blob": blob, "error": str(error)}
                    )
        return found

    def _decode(self, state: WalkState, node: _Node) -> _Children | None:
        """The node's children (a tree's entries, a stream's chunks), or None if it was not read or is not
        what it is referenced as."""
        if node.new_plain is None:
            return None
        try:
            if node.kind == TREE:
                tree = decode_tree(node.new_plain)
                return _Children(tree=tree, chunks=[], width=max(1, len(tree.entries)))
            chunks = decode_stream_index(node.new_plain)
            return _Children(tree=None, chunks=chunks, width=max(1, len(chunks)))
        except InvalidDocument as error:
            state.invalid[node.new] = f"not a valid {node.kind}: {error}"
            return None

    def _compare(self, state: WalkState, node: _Node, children: _Children) -> None:
        """Check the node's children against its parent side."""
        if children.tree is not None:
            state.trees_read += 1
            self._compare_trees(state, children.tree, self._parent_tree(node))
        else:
            known = set(self._parent_chunks(node))
            for chunk in children.chunks:
                if chunk not in known:
                    self._check_data(state, chunk)
        if node.parent_plain is None:
            # Compared against nothing: proven whole (with its subtrees queued) wherever it appears again.
            self.walked.add(node.new)

    def _compare_trees(self, state: WalkState, tree: Tree, parent: Tree | None) -> None:
        before = {entry.name: entry for entry in parent.entries} if parent is not None else {}
        for entry in tree.entries:
            old = before.get(entry.name)
            if entry.subtree is not None:
                state.stack.append([entry.subtree, old.subtree if old is not None else None, TREE])
            kept = set(old.content) if old is not None else set()
            for blob in entry.content:
                if blob not in kept:
                    self._check_data(state, blob)

    def _check_data(self, state: WalkState, blob: str) -> None:
        pack_id = self.listed.pack_of(blob)
        if pack_id is None:
            state.missing.append(blob)
        else:
            self._note_pack(state, pack_id)

    @staticmethod
    def _parent_tree(node: _Node) -> Tree | None:
        """The parent's side, if it could be read; else the node is compared against nothing (stricter)."""
        if node.parent_plain is None:
            return None
        try:
            return decode_tree(node.parent_plain)
        except InvalidDocument:
            return None

    @staticmethod
    def _parent_chunks(node: _Node) -> list[str]:
        if node.parent_plain is None:
            return []
        try:
            return decode_stream_index(node.parent_plain)
        except InvalidDocument:
            return []
