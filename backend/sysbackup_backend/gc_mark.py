"""gc's evidence (sysbackup_backend.gc, steps 3 and 5): what the kept manifests reach, and what becomes of
each pack. Reads only: the registry, pack trailers and the trees and stream indexes of kept manifests.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.manifest import decode_stream_index
from sysbackup_domain.packs import PackEntry, open_blob
from sysbackup_domain.tree import decode_tree

from .registry import PACK_CONDEMNED, PACK_DELETING, PACK_VERIFIED, USABLE_STATES, PackRecord, PackRegistry
from .store import PackStore, object_missing
from .walk import BlobPlace, read_stored_blobs

logger = Logger(child=True)

NODES_PER_STEP = 500
PARALLEL_READS = 8
TREE = "tree"
STREAM = "stream"


class GcIncomplete(Exception):
    """The mark could not finish; nothing may be condemned or deleted on its evidence."""


# --------------------------------------------------------------------------------------------- pack map


class PackMap:
    """The registry as gc last scanned it, and each pack's trailer entries (`hash -> [pack_id]`)."""

    def __init__(self, store: PackStore) -> None:
        self.store = store
        self.records: dict[str, PackRecord] = {}
        self.entries: dict[str, dict[str, PackEntry]] = {}  # pack -> hash -> entry, readable trailers only
        self.holders: dict[str, list[str]] = {}

    def load(self, registry: PackRegistry, deadline: float) -> None:
        """Scan the registry; read the trailers not read yet (packs without one are tried again: a pack
        presigned a moment ago may have landed since)."""
        self.records = {record.pack_id: record for record in registry.scan()}
        self.entries = {pack_id: found for pack_id, found in self.entries.items() if pack_id in self.records}
        unread = [
            record
            for pack_id, record in sorted(self.records.items())
            if record.state != PACK_DELETING and pack_id not in self.entries
        ]
        if time.monotonic() > deadline:
            raise GcIncomplete("out of time while reading pack trailers")
        with ThreadPoolExecutor(max_workers=PARALLEL_READS) as pool:
            for record, entries in zip(unread, pool.map(self._read_trailer, unread), strict=True):
                if entries:
                    self.entries[record.pack_id] = {entry.hash: entry for entry in entries}
        holders: dict[str, list[str]] = defaultdict(list)
        for pack_id, entries_of_pack in self.entries.items():
            if self.records[pack_id].state != PACK_DELETING:
                for blob in entries_of_pack:
                    holders[blob].append(pack_id)
        self.holders = dict(holders)

    def _read_trailer(self, record: PackRecord) -> list[PackEntry]:
        """A pack's entries; none if its object is not there (never uploaded) or has no valid trailer."""
        try:
            return self.store.read_pack_trailer(record.pack_id, record.size)
        except InvalidDocument as error:
            logger.warning(
                "pack without a valid trailer", extra={"pack_id": record.pack_id, "reason": str(error)}
            )
            return []
        except ClientError as error:
            if object_missing(error):
                return []
            raise

    def add(self, record: PackRecord, entries: Iterable[PackEntry]) -> None:
        """A pack gc wrote itself during this run (already known if a crashed run wrote the same bytes)."""
        self.records[record.pack_id] = record
        if record.pack_id in self.entries:
            return
        self.entries[record.pack_id] = {entry.hash: entry for entry in entries}
        for blob in self.entries[record.pack_id]:
            self.holders.setdefault(blob, []).append(record.pack_id)

    def source_for(self, blob: str, host: str) -> str | None:
        """The pack to read `blob` from for `host`: one the host may use (verified first), else any holder."""

        def preference(pack_id: str) -> tuple[bool, bool, str]:
            record = self.records[pack_id]
            return (not record.usable_by(host), record.state != PACK_VERIFIED, pack_id)

        holders = self.holders.get(blob)
        return min(holders, key=preference) if holders else None


# --------------------------------------------------------------------------------------------- mark


@dataclass
class Reach:
    """Per reachable blob: the hosts whose kept manifests reach it, and the latest retain_until among them."""

    hosts: dict[str, frozenset[str]] = field(default_factory=dict)
    until: dict[str, str] = field(default_factory=dict)
    # Host sets are shared between blobs: most blobs are reached by the same one or two hosts.
    _interned: dict[frozenset[str], frozenset[str]] = field(default_factory=dict)

    def note(self, blob: str, host: str, retain_until: str) -> None:
        hosts = self.hosts.get(blob, frozenset())
        if host not in hosts:
            united = hosts | {host}
            self.hosts[blob] = self._interned.setdefault(united, united)
        if self.until.get(blob, "") < retain_until:
            self.until[blob] = retain_until

    def reached_for(self, blob: str, hosts: frozenset[str]) -> frozenset[str]:
        """The hosts among `hosts` whose manifests reach `blob`."""
        return self.hosts.get(blob, frozenset()) & hosts


class Marker:
    """Walks kept manifests' Merkle trees into a Reach, reading trees and stream indexes through a PackMap."""

    def __init__(self, packs: PackMap, deadline: float) -> None:
        self.packs = packs
        self.deadline = deadline
        self.reach = Reach()
        self.walked: dict[str, set[str]] = defaultdict(set)  # node -> hosts it was walked for
        self.trees_read = 0

    def mark(self, host: str, root: str | None, stream_indexes: Iterable[str], retain_until: str) -> None:
        """Mark one manifest. Call in descending retain_until order: a node is walked once per host, the
        first time having the latest retain_until of all manifests reaching it."""
        pending = [(blob, STREAM) for blob in stream_indexes]
        if root is not None:
            pending.append((root, TREE))
        while pending:
            if time.monotonic() > self.deadline:
                raise GcIncomplete("out of time while marking")
            batch, pending = pending[:NODES_PER_STEP], pending[NODES_PER_STEP:]
            pending.extend(self._step(host, batch, retain_until))

    def _step(self, host: str, batch: list[tuple[str, str]], retain_until: str) -> list[tuple[str, str]]:
        fresh: dict[str, str] = {}
        for blob, kind in batch:
            self.reach.note(blob, host, retain_until)
            if host not in self.walked[blob]:
                self.walked[blob].add(host)
                fresh[blob] = kind
        children: list[tuple[str, str]] = []
        for blob, plaintext in self._read(host, fresh).items():
            try:
                if fresh[blob] == TREE:
                    self.trees_read += 1
                    for entry in decode_tree(plaintext).entries:
                        for content in entry.content:
                            self.reach.note(content, host, retain_until)
                        if entry.subtree is not None:
                            children.append((entry.subtree, TREE))
                else:
                    for chunk in decode_stream_index(plaintext):
                        self.reach.note(chunk, host, retain_until)
            except InvalidDocument as error:
                raise GcIncomplete(f"live node {blob} does not decode: {error}") from None
        return children

    def _read(self, host: str, nodes: Iterable[str]) -> dict[str, bytes]:
        """Plaintexts of the nodes, checked against their hashes; GcIncomplete if one cannot be read."""
        places: dict[str, BlobPlace] = {}
        for node in nodes:
            pack_id = self.packs.source_for(node, host)
            if pack_id is None:
                raise GcIncomplete(f"live node {node} is in no readable pack")
            places[node] = BlobPlace(pack_id, self.packs.entries[pack_id][node])
        plaintexts: dict[str, bytes] = {}
        for node, place, stored in read_stored_blobs(self.packs.store, places):
            try:
                if stored is None:
                    raise CorruptBlob(f"its range of pack {place.pack_id} is not there")
                plaintexts[node] = open_blob(place.entry, stored)
            except CorruptBlob as error:
                raise GcIncomplete(f"live node {node} is corrupt: {error}") from None
        return plaintexts


# --------------------------------------------------------------------------------------------- verdicts


@dataclass
class Verdicts:
    """What becomes of each pack not being deleted, judged from one scan and one mark."""

    live: dict[str, str] = field(default_factory=dict)  # pack -> latest retain_until of its manifests
    condemn: list[str] = field(default_factory=list)
    revive: list[str] = field(default_factory=list)
    ripe: list[PackRecord] = field(default_factory=list)  # condemned over the grace period ago: delete


def live_blobs(packs: PackMap, reach: Reach, record: PackRecord) -> list[PackEntry]:
    """The pack's blobs a kept manifest of one of the pack's hosts reaches."""
    entries = packs.entries.get(record.pack_id, {})
    return [entry for blob, entry in entries.items() if reach.reached_for(blob, record.hosts)]


def _needs_reviving(packs: PackMap, reach: Reach, record: PackRecord) -> bool:
    """A condemned pack holds a blob reached for one of its hosts that no usable pack serves that host."""
    for entry in live_blobs(packs, reach, record):
        for host in reach.reached_for(entry.hash, record.hosts):
            others = (packs.records[pack_id] for pack_id in packs.holders.get(entry.hash, ()))
            if not any(other.pack_id != record.pack_id and other.usable_by(host) for other in others):
                return True
    return False


def judge(packs: PackMap, reach: Reach, young_after: str, ripe_before: str) -> Verdicts:
    """Live, revived, condemned or ripe for deletion: see the module's docstring (step 5)."""
    verdicts = Verdicts()
    for pack_id, record in sorted(packs.records.items()):
        if record.state == PACK_DELETING:
            continue
        alive = live_blobs(packs, reach, record)
        if record.state == PACK_CONDEMNED:
            if _needs_reviving(packs, reach, record):
                verdicts.revive.append(pack_id)
                verdicts.live[pack_id] = max(reach.until[entry.hash] for entry in alive)
            elif (record.condemned_at or "") <= ripe_before:
                verdicts.ripe.append(record)
        elif alive:
            verdicts.live[pack_id] = max(reach.until[entry.hash] for entry in alive)
        elif record.created_at <= young_after:
            verdicts.condemn.append(pack_id)
    return verdicts


def mostly_dead(
    packs: PackMap, reach: Reach, live: Iterable[str], ratio: float, young_after: str
) -> list[str]:
    """Live, usable, settled packs whose live blob bytes are at most `ratio` of their blob bytes."""
    candidates: list[str] = []
    for pack_id in sorted(live):
        record = packs.records[pack_id]
        if record.state not in USABLE_STATES or record.created_at > young_after:
            continue
        live_bytes = sum(entry.length for entry in live_blobs(packs, reach, record))
        all_bytes = sum(entry.length for entry in packs.entries[pack_id].values())
        if live_bytes < all_bytes and live_bytes <= all_bytes * ratio:
            candidates.append(pack_id)
    return candidates
