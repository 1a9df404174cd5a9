"""`admin rebuild-index`: the pack registry again, from the bucket alone (disaster recovery).

A pack item says who may use a pack (`hosts`), its size, state and lock. The bucket holds all of it but the
hosts: each pack's trailer (two ranged GETs) or, with `verify`, the whole pack re-hashed, and its lock from a
HEAD. The hosts come from the manifests (`manifests/<host>/<id>.json`): each host's trees and stream indexes
are walked, reading each node through the trailers, and a host is given the packs holding the blobs its
manifests reach. A blob held by one pack only names that pack; a blob held by several (byte-identical
content two hosts uploaded) names the holder whose reached blobs the host reaches too (`uncertain` when
every holder holds blobs only other hosts reach: the host may then read those). Writes go through
`PackRegistry`: an existing item is kept and only gains hosts (and `verified`, with `verify`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError
from sysbackup_backend.registry import PACK_CORRUPT, PACK_DELETING, PackRegistry
from sysbackup_backend.store import MANIFESTS_PREFIX, PACKS_PREFIX, PackStore, pack_key
from sysbackup_backend.verification import checked_pack_entries
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import is_blob_hash
from sysbackup_domain.manifest import Manifest, decode_manifest, decode_stream_index
from sysbackup_domain.packs import TRAILER_TAIL_BYTES, PackEntry, open_blob, parse_trailer_bytes
from sysbackup_domain.retention import iso_utc
from sysbackup_domain.tree import decode_tree

# Trailer and node reads are small and latency-bound; whole-pack reads hold up to 128 MiB each in memory.
PARALLEL_SMALL_READS = 8
PARALLEL_PACK_READS = 2
PROGRESS_EVERY = 500

# The `host` of a pack no manifest reaches: not a host name (a name starts with a letter or digit), so no
# host lists or uses it; gc condemns it like any unreached pack once it is older than the grace period.
UNREACHED_HOST = "-unreached"

TREE = "tree"
STREAM_INDEX = "stream index"


@dataclass(frozen=True)
class PackObject:
    pack_id: str
    size: int
    last_modified: datetime


@dataclass
class RebuildReport:
    packs_recorded: int = 0  # items written or updated
    packs_verified: int = 0  # with verify: packs marked verified
    manifests_read: int = 0
    bytes_read: int = 0
    hosts: dict[str, int] = field(default_factory=dict)  # host -> packs it was given
    unreached: list[str] = field(default_factory=list)  # packs no manifest reaches
    uncertain: dict[str, list[str]] = field(default_factory=dict)  # pack -> hosts given it by guess
    missing_nodes: dict[str, str] = field(default_factory=dict)  # tree / stream index -> why unreadable
    corrupt: dict[str, str] = field(default_factory=dict)  # pack id -> reason
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it is not rebuilt

    @property
    def failed(self) -> bool:
        return bool(self.corrupt or self.missing_nodes)


@dataclass(frozen=True)
class _Examined:
    pack: PackObject
    retain_until: str = ""
    entries: list[PackEntry] | None = None
    problem: str | None = None  # why the pack is corrupt
    skipped: str | None = None  # why it is left as it is (unreadable now, or decided already)
    bytes_read: int = 0


# --------------------------------------------------------------------------------------------- packs


def list_packs(s3: Any, bucket: str, report: RebuildReport) -> Iterator[PackObject]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PACKS_PREFIX):
        for item in page.get("Contents", []):
            pack_id = item["Key"].removeprefix(PACKS_PREFIX)
            if not is_blob_hash(pack_id):
                report.skipped[item["Key"]] = "not named by a SHA-256"
                continue
            yield PackObject(pack_id, int(item["Size"]), item["LastModified"])


def read_trailer(store: PackStore, pack: PackObject) -> tuple[list[PackEntry], int]:
    """The pack's validated entries from two ranged GETs; (entries, bytes read)."""
    trailer = store.read_pack_trailer_bytes(pack.pack_id, pack.size)
    # read_range refuses short reads, so the tail read was exactly TRAILER_TAIL_BYTES.
    return parse_trailer_bytes(trailer, pack.size), TRAILER_TAIL_BYTES + len(trailer)


def read_and_verify(store: PackStore, pack: PackObject) -> tuple[list[PackEntry], int]:
    """The whole pack, its SHA-256 against its key and every blob re-hashed; (entries, bytes read)."""
    data = store.read(pack_key(pack.pack_id))
    return checked_pack_entries(pack.pack_id, data), len(data)


def lock_retain_until(store: PackStore, pack: PackObject) -> str:
    """The object's lock date; its LastModified if it has no lock (nothing holds it now)."""
    head = store.client.head_object(Bucket=store.bucket, Key=pack_key(pack.pack_id))
    until = head.get("ObjectLockRetainUntilDate") or pack.last_modified
    return iso_utc(until)


def examine(store: PackStore, pack: PackObject, verify: bool) -> _Examined:
    """The pack's entries (or why it is corrupt) and lock."""
    try:
        retain_until = lock_retain_until(store, pack)
        entries, bytes_read = (read_and_verify if verify else read_trailer)(store, pack)
    except (CorruptBlob, InvalidDocument) as error:
        return _Examined(pack, retain_until, problem=str(error))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "InvalidObjectState":
            raise
        # A Glacier storage class: unreadable until restored, not corrupt.
        return _Examined(pack, skipped="archived (restore it, then run again)")
    return _Examined(pack, retain_until, entries=entries, bytes_read=bytes_read)


# --------------------------------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class _Links:
    nodes: tuple[tuple[str, str], ...]  # (subtree, TREE)
    leaves: tuple[str, ...]  # file contents, stream chunks


class Reachability:
    """Which blobs each manifest reaches, reading trees and stream indexes through the packs' trailers.

    A node is read once for all hosts (hosts share trees only through identical content)."""

    def __init__(self, store: PackStore, holders: dict[str, list[tuple[str, PackEntry]]], pool: Any) -> None:
        self.store = store
        self.holders = holders
        self.pool = pool
        self.links: dict[str, _Links | None] = {}
        self.unreadable: dict[str, str] = {}
        self.bytes_read = 0

    def reached(self, roots: Iterable[tuple[str, str]]) -> set[str]:
        seen: set[str] = set()
        frontier = dict(roots)
        while frontier:
            fresh = {node: kind for node, kind in frontier.items() if node not in seen}
            seen.update(fresh)
            self._load({node: kind for node, kind in fresh.items() if node not in self.links})
            frontier = {}
            for node in fresh:
                links = self.links[node]
                if links is not None:
                    seen.update(links.leaves)
                    frontier.update(links.nodes)
        return seen

    def _load(self, nodes: dict[str, str]) -> None:
        for node, (links, bytes_read) in zip(nodes, self.pool.map(self._read, nodes.items()), strict=True):
            self.links[node] = links
            self.bytes_read += bytes_read

    def _read(self, node_kind: tuple[str, str]) -> tuple[_Links | None, int]:
        node, kind = node_kind
        bytes_read = 0
        problem = "no pack holds it"
        for pack_id, entry in self.holders.get(node, ()):
            stored = self.store.read_range(pack_key(pack_id), entry.offset, entry.offset + entry.length - 1)
            bytes_read += len(stored)
            try:
                return _decode_links(kind, open_blob(entry, stored)), bytes_read
            except (CorruptBlob, InvalidDocument) as error:
                problem = f"{kind} in pack {pack_id}: {error}"
        self.unreadable[node] = problem
        return None, bytes_read


def _decode_links(kind: str, plaintext: bytes) -> _Links:
    if kind == STREAM_INDEX:
        return _Links((), tuple(decode_stream_index(plaintext)))
    tree = decode_tree(plaintext)
    return _Links(
        tuple((entry.subtree, TREE) for entry in tree.entries if entry.subtree is not None),
        tuple(blob for entry in tree.entries for blob in entry.content),
    )


def list_manifest_keys(store: PackStore) -> Iterator[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=MANIFESTS_PREFIX
    )
    for page in pages:
        yield from (item["Key"] for item in page.get("Contents", []))


def read_manifest(store: PackStore, key: str) -> tuple[Manifest | None, str, int]:
    """(the manifest, or None and why not; bytes read)."""
    body = store.read(key)
    try:
        manifest = decode_manifest(body)
    except InvalidDocument as error:
        return None, f"not a manifest: {error}", len(body)
    if not key.startswith(f"{MANIFESTS_PREFIX}{manifest.host}/"):
        return None, f"names host {manifest.host!r} outside its folder", len(body)
    return manifest, "", len(body)


def manifest_roots(store: PackStore, report: RebuildReport, pool: Any) -> dict[str, list[tuple[str, str]]]:
    """Host -> the roots (root trees, snapshot stream indexes) of every manifest in the bucket."""
    roots: dict[str, list[tuple[str, str]]] = defaultdict(list)
    keys = list(list_manifest_keys(store))
    for key, (manifest, why_not, bytes_read) in zip(
        keys, pool.map(lambda key: read_manifest(store, key), keys), strict=True
    ):
        report.bytes_read += bytes_read
        if manifest is None:
            report.skipped[key] = why_not
            continue
        report.manifests_read += 1
        if manifest.root is not None:
            roots[manifest.host].append((manifest.root, TREE))
        roots[manifest.host].extend(
            (snapshot.content, STREAM_INDEX) for snapshot in manifest.snapshots if snapshot.content
        )
    return roots


def assign_hosts(
    reached: dict[str, set[str]], pack_blobs: dict[str, list[str]]
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(pack -> hosts given it, pack -> hosts given it by guess) for the blobs each host reaches.

    A blob one pack holds names that pack. A blob several packs hold, none given to the host yet, names
    the holder with the fewest blobs that other hosts reach and this one does not (a guess when that is
    not zero: the host may be given blobs it never had)."""
    holders: dict[str, list[str]] = defaultdict(list)
    for pack_id, blobs in sorted(pack_blobs.items()):
        for blob in dict.fromkeys(blobs):
            holders[blob].append(pack_id)
    reached_by: dict[str, set[str]] = defaultdict(set)
    for host, blobs in reached.items():
        for blob in blobs:
            reached_by[blob].add(host)

    def foreign(pack_id: str, host: str) -> int:
        """How many of the pack's blobs other hosts reach and `host` does not."""
        return sum(1 for blob in pack_blobs[pack_id] if reached_by[blob] and host not in reached_by[blob])

    given: dict[str, set[str]] = defaultdict(set)
    guessed: dict[str, set[str]] = defaultdict(set)
    for host, blobs in sorted(reached.items()):
        for blob in blobs:
            if len(holders.get(blob, ())) == 1:
                given[holders[blob][0]].add(host)
        for blob in sorted(blobs):
            candidates = holders.get(blob, [])
            if not candidates or any(host in given[pack_id] for pack_id in candidates):
                continue
            choice = min(candidates, key=lambda pack_id: (foreign(pack_id, host), pack_id))
            given[choice].add(host)
            if foreign(choice, host):
                guessed[choice].add(host)
    return dict(given), dict(guessed)


# --------------------------------------------------------------------------------------------- items


def record_pack(
    registry: PackRegistry, examined: _Examined, hosts: set[str], verify: bool, report: RebuildReport
) -> None:
    pack = examined.pack
    ordered = sorted(hosts) or [UNREACHED_HOST]
    registry.record_presigned(pack.pack_id, ordered[0], pack.size, examined.retain_until)
    for host in ordered[1:]:
        registry.add_host(pack.pack_id, host)
    report.packs_recorded += 1
    if examined.problem is not None:
        registry.mark_corrupt(pack.pack_id, examined.problem)
        report.corrupt[pack.pack_id] = examined.problem
    elif verify and examined.entries is not None:
        # Refused (False) for an existing item gc has condemned: it stays as gc left it.
        report.packs_verified += registry.mark_verified(pack.pack_id, len(examined.entries))


def examine_packs(
    store: PackStore,
    registry: PackRegistry,
    verify: bool,
    report: RebuildReport,
    progress: Callable[[str], None],
) -> list[_Examined]:
    """Every pack of the bucket read (trailer or whole) but those skipped (listed in the report)."""

    def examine_unless_decided(pack: PackObject) -> _Examined:
        record = registry.get(pack.pack_id)
        if record is not None and record.state in (PACK_CORRUPT, PACK_DELETING):
            return _Examined(pack, skipped=f"recorded {record.state} already")
        return examine(store, pack, verify)

    examined: list[_Examined] = []
    with ThreadPoolExecutor(max_workers=PARALLEL_PACK_READS if verify else PARALLEL_SMALL_READS) as pool:
        outcomes = pool.map(examine_unless_decided, list_packs(store.client, store.bucket, report))
        for count, outcome in enumerate(outcomes, start=1):
            if count % PROGRESS_EVERY == 0:
                progress(f"{count} packs examined")
            if outcome.skipped is not None:
                report.skipped[pack_key(outcome.pack.pack_id)] = outcome.skipped
                continue
            report.bytes_read += outcome.bytes_read
            examined.append(outcome)
    return examined


def reached_blobs(store: PackStore, readable: list[_Examined], report: RebuildReport) -> dict[str, set[str]]:
    """Host -> every blob its manifests reach (nodes read through the readable packs' trailers)."""
    holders: dict[str, list[tuple[str, PackEntry]]] = defaultdict(list)
    for outcome in readable:
        for entry in outcome.entries or ():
            holders[entry.hash].append((outcome.pack.pack_id, entry))
    with ThreadPoolExecutor(max_workers=PARALLEL_SMALL_READS) as pool:
        reachability = Reachability(store, holders, pool)
        roots = manifest_roots(store, report, pool)
        reached = {host: reachability.reached(host_roots) for host, host_roots in roots.items()}
    report.bytes_read += reachability.bytes_read
    report.missing_nodes.update(reachability.unreadable)
    return reached


def rebuild_index(
    s3: Any,
    bucket: str,
    registry: PackRegistry,
    verify: bool,
    progress: Callable[[str], None] = lambda _: None,
) -> RebuildReport:
    report = RebuildReport()
    store = PackStore(bucket, s3)
    examined = examine_packs(store, registry, verify, report, progress)
    readable = [outcome for outcome in examined if outcome.entries is not None]
    progress(f"{len(examined)} packs read; walking the manifests")
    reached = reached_blobs(store, readable, report)
    given, guessed = assign_hosts(
        reached,
        {outcome.pack.pack_id: [entry.hash for entry in outcome.entries or ()] for outcome in readable},
    )
    for outcome in examined:
        pack_id = outcome.pack.pack_id
        hosts = given.get(pack_id, set())
        record_pack(registry, outcome, hosts, verify, report)
        if not hosts and outcome.problem is None:
            report.unreached.append(pack_id)
        for host in hosts:
            report.hosts[host] = report.hosts.get(host, 0) + 1
        if pack_id in guessed:
            report.uncertain[pack_id] = sorted(guessed[pack_id])
    return report
