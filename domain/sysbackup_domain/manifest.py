"""Manifests: one per host per run, naming the root tree and the snapshot streams.

The backend builds a Manifest from a host's CommitRequest (validated here) plus what only the server
may decide: the id, the host (from the caller's IAM identity), the creation time and retain-until.
"""

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sysbackup_domain import canonical
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.packs import PackEntry
from sysbackup_domain.retention import iso_utc, parse_iso_utc

MANIFEST_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MANIFEST_VERSION = 1

# Bounds on what a host may send. A host that has more warnings should truncate and say so.
MAX_SNAPSHOTS = 1000
MAX_SNAPSHOT_NAME_CHARS = 255
MAX_SNAPSHOT_TEXT_CHARS = 64 * 1024  # description, restore-through command, error
MAX_WARNINGS = 10_000
MAX_WARNING_CHARS = 4096
MAX_STATS_BYTES = 64 * 1024
MAX_STATS_DEPTH = 4
MAX_DAYS_REQUESTED = 100 * 366  # anything longer is nonsense; the policy caps lower anyway
MAX_STREAM_CHUNKS = 10_000_000
# A commit's hints to the walk (docs/PACK_INDEX.md): the packs holding what the parent does not reference
# at the same place, and where the trees and stream indexes the walk reads are.
MAX_COMMIT_PACKS = 2000
MAX_COMMIT_LOCATIONS = 100_000
# The whole stored document, encoded. GET /manifests/{id} returns it through Lambda, whose response is
# capped at 6 MB and JSON-escapes the body again (up to twice the bytes); a manifest that commits but
# cannot be read back would make `restore latest` fail for good. Hosts keep their warnings well inside.
MAX_MANIFEST_BYTES = 2 * 1024 * 1024
MAX_WARNINGS_BYTES = MAX_MANIFEST_BYTES // 2
_FIXED_FIELDS_BYTES = 1024  # version, id, host, parent, times, root and the keys: well under this

_SNAPSHOT_FIELDS = ("name", "description", "restore_through", "size", "content", "exit_status")
_COMMIT_REQUIRED = ("parent", "root", "snapshots")
_COMMIT_OPTIONAL = ("warnings", "stats", "days_retained", "packs", "locations")
_LOCATION_FIELDS = ("pack_id", "offset", "length", "codec", "raw_length")
_MANIFEST_FIELDS = (
    "version",
    "id",
    "host",
    "parent",
    "created",
    "retain_until",
    "root",
    "snapshots",
    "warnings",
    "stats",
)


def new_manifest_id(now: datetime, rand: str | None = None) -> str:
    """ "YYYYMMDDTHHMMSSZ-<8 hex>": sorts by (server) time; the random part avoids same-second clashes."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware: {now!r}")
    suffix = secrets.token_hex(4) if rand is None else rand
    if re.fullmatch(r"[0-9a-f]{8}", suffix) is None:
        raise ValueError(f"rand must be 8 lowercase hex characters, got {suffix!r}")
    return f"{now.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{suffix}"


def is_manifest_id(value: object) -> bool:
    return isinstance(value, str) and MANIFEST_ID_RE.fullmatch(value) is not None


def is_host_name(value: object) -> bool:
    return isinstance(value, str) and HOST_NAME_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class SnapshotRecord:
    """One snapshotter's run: its stream is the `data` blob `content` (a stream index), if it produced one."""

    name: str
    description: str
    restore_through: str | None
    size: int
    content: str | None
    exit_status: int | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "restore_through": self.restore_through,
            "size": self.size,
            "content": self.content,
            "exit_status": self.exit_status,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, item: object, where: str = "snapshot") -> "SnapshotRecord":
        document = canonical.require_object(item, where, _SNAPSHOT_FIELDS, ("error",))
        name = canonical.require_str(
            document["name"], f"{where} name", max_chars=MAX_SNAPSHOT_NAME_CHARS, allow_empty=False
        )
        if "/" in name or "\x00" in name:
            raise InvalidDocument(f"{where} name {name!r:.80} contains '/' or NUL")
        where = f"snapshot {name!r:.80}"
        return cls(
            name=name,
            description=canonical.require_str(
                document["description"], f"{where} description", max_chars=MAX_SNAPSHOT_TEXT_CHARS
            ),
            restore_through=_optional_str(document["restore_through"], f"{where} restore_through"),
            size=canonical.require_int(document["size"], f"{where} size", 0),
            content=None
            if document["content"] is None
            else canonical.require_hash(document["content"], where),
            exit_status=None
            if document["exit_status"] is None
            else canonical.require_int(document["exit_status"], f"{where} exit_status", -(2**31), 2**31 - 1),
            error=_optional_str(document.get("error"), f"{where} error"),
        )


@dataclass(frozen=True)
class BlobLocation:
    """Where a host says a blob is stored: a hint only, the backend checks what it reads against the hash."""

    pack_id: str
    offset: int
    length: int
    codec: str
    raw_length: int

    def entry(self, blob: str, kind: str) -> PackEntry:
        """The pack entry this location claims for `blob` (what `open_blob` decodes and checks)."""
        return PackEntry(blob, kind, self.codec, self.offset, self.length, self.raw_length)

    def to_json(self) -> dict[str, Any]:
        return {
            "pack_id": self.pack_id,
            "offset": self.offset,
            "length": self.length,
            "codec": self.codec,
            "raw_length": self.raw_length,
        }

    @classmethod
    def from_json(cls, blob: str, value: object) -> "BlobLocation":
        where = f"locations[{blob}]"
        fields = canonical.require_object(value, where, _LOCATION_FIELDS)
        pack_id = canonical.require_hash(fields["pack_id"], f"{where} pack_id")
        # PackEntry holds the bounds of offsets, lengths and codecs: one validation for trailers and hints.
        try:
            entry = PackEntry.from_json(
                {**{name: fields[name] for name in _LOCATION_FIELDS[1:]}, "hash": blob, "kind": "data"}
            )
        except InvalidDocument as error:
            raise InvalidDocument(f"{where}: {error}") from None
        return cls(pack_id, entry.offset, entry.length, entry.codec, entry.raw_length)


@dataclass(frozen=True)
class CommitRequest:
    """What a host asks to commit (POST /manifests body), validated."""

    parent: str | None
    root: str | None
    snapshots: tuple[SnapshotRecord, ...]
    warnings: tuple[str, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)
    days_retained: int | None = None
    # Packs holding the blobs the parent does not reference at the same place (deduplicated, in order).
    packs: tuple[str, ...] = ()
    # Where the trees and stream indexes the walk reads are (new ones and the parent's at the same places).
    locations: Mapping[str, BlobLocation] = field(default_factory=dict)


def parse_commit_request(body: object) -> CommitRequest:
    """Validate a commit request body; InvalidDocument names the offending field."""
    document = canonical.require_object(body, "commit request", _COMMIT_REQUIRED, _COMMIT_OPTIONAL)
    parent = document["parent"]
    if parent is not None and not is_manifest_id(parent):
        raise InvalidDocument(f"parent must be a manifest id or null, got {parent!r:.80}")
    root = document["root"]
    if root is not None:
        canonical.require_hash(root, "root")
    days = document.get("days_retained")
    if days is not None:
        canonical.require_int(days, "days_retained", 0, MAX_DAYS_REQUESTED)
    request = CommitRequest(
        parent=parent,
        root=root,
        snapshots=_parse_snapshots(document["snapshots"]),
        warnings=_parse_warnings(document.get("warnings", [])),
        stats=_parse_stats(document.get("stats", {})),
        days_retained=days,
        packs=_parse_packs(document.get("packs", [])),
        locations=_parse_locations(document.get("locations", {})),
    )
    _check_manifest_size(request)
    return request


def _parse_packs(value: object) -> tuple[str, ...]:
    items = canonical.require_list(value, "packs", max_items=MAX_COMMIT_PACKS)
    return tuple(
        dict.fromkeys(canonical.require_hash(item, f"packs[{index}]") for index, item in enumerate(items))
    )


def _parse_locations(value: object) -> dict[str, BlobLocation]:
    if not isinstance(value, dict):
        raise InvalidDocument(f"locations must be an object, got {type(value).__name__}")
    if len(value) > MAX_COMMIT_LOCATIONS:
        raise InvalidDocument(f"locations has {len(value)} blobs, more than {MAX_COMMIT_LOCATIONS}")
    return {
        canonical.require_hash(blob, "a locations key"): BlobLocation.from_json(blob, location)
        for blob, location in value.items()
    }


def _check_manifest_size(request: CommitRequest) -> None:
    variable = {
        "snapshots": [snapshot.to_json() for snapshot in request.snapshots],
        "warnings": list(request.warnings),
        "stats": dict(request.stats),
    }
    size = len(canonical.dumps(variable)) + _FIXED_FIELDS_BYTES
    if size > MAX_MANIFEST_BYTES:
        raise InvalidDocument(
            f"the manifest would be about {size} bytes encoded, more than {MAX_MANIFEST_BYTES}:"
            " send fewer or shorter warnings and snapshot texts"
        )


def referenced_blobs(request: "CommitRequest | Manifest") -> set[str]:
    """The blobs a commit needs stored: the root tree and each snapshot's stream index.

    (The trees and chunks below them are found by walking; the commit checks these roots.)
    """
    hashes = {snapshot.content for snapshot in request.snapshots if snapshot.content is not None}
    if request.root is not None:
        hashes.add(request.root)
    return hashes


@dataclass(frozen=True)
class Manifest:
    version: int
    id: str
    host: str
    parent: str | None
    created: datetime
    retain_until: datetime
    root: str | None
    snapshots: tuple[SnapshotRecord, ...]
    warnings: tuple[str, ...]
    stats: Mapping[str, Any]


def build_manifest(
    request: CommitRequest, *, manifest_id: str, host: str, created: datetime, retain_until: datetime
) -> Manifest:
    """The manifest the backend stores for a validated request and the server-decided fields."""
    if not is_manifest_id(manifest_id):
        raise ValueError(f"not a manifest id: {manifest_id!r}")
    if not is_host_name(host):
        raise ValueError(f"not a host name: {host!r}")
    return Manifest(
        version=MANIFEST_VERSION,
        id=manifest_id,
        host=host,
        parent=request.parent,
        created=created,
        retain_until=retain_until,
        root=request.root,
        snapshots=request.snapshots,
        warnings=request.warnings,
        stats=request.stats,
    )


def manifest_to_json(manifest: Manifest) -> dict[str, Any]:
    return {
        "version": manifest.version,
        "id": manifest.id,
        "host": manifest.host,
        "parent": manifest.parent,
        "created": iso_utc(manifest.created),
        "retain_until": iso_utc(manifest.retain_until),
        "root": manifest.root,
        "snapshots": [snapshot.to_json() for snapshot in manifest.snapshots],
        "warnings": list(manifest.warnings),
        "stats": dict(manifest.stats),
    }


def encode_manifest(manifest: Manifest) -> bytes:
    """Canonical JSON of a manifest (times as "YYYY-MM-DDTHH:MM:SSZ")."""
    return canonical.dumps(manifest_to_json(manifest))


def decode_manifest(data: bytes | bytearray | memoryview) -> Manifest:
    """Parse and strictly validate a stored manifest document."""
    document = canonical.require_object(
        canonical.loads(data, "manifest", allow_floats=True), "manifest", _MANIFEST_FIELDS
    )
    canonical.require_version(document, "manifest", MANIFEST_VERSION)
    if not is_manifest_id(document["id"]):
        raise InvalidDocument(f"manifest id is not a manifest id: {document['id']!r:.80}")
    if not is_host_name(document["host"]):
        raise InvalidDocument(f"manifest host is not a host name: {document['host']!r:.80}")
    parent = document["parent"]
    if parent is not None and not is_manifest_id(parent):
        raise InvalidDocument(f"manifest parent must be a manifest id or null, got {parent!r:.80}")
    root = document["root"]
    if root is not None:
        canonical.require_hash(root, "manifest root")
    created = _parse_time(document["created"], "manifest created")
    retain_until = _parse_time(document["retain_until"], "manifest retain_until")
    if retain_until < created:
        raise InvalidDocument(f"manifest retain_until {document['retain_until']} is before its creation")
    return Manifest(
        version=MANIFEST_VERSION,
        id=document["id"],
        host=document["host"],
        parent=parent,
        created=created,
        retain_until=retain_until,
        root=root,
        snapshots=_parse_snapshots(document["snapshots"]),
        warnings=_parse_warnings(document["warnings"]),
        stats=_parse_stats(document["stats"]),
    )


def encode_stream_index(chunks: Sequence[str]) -> bytes:
    """The stream index of a snapshot: canonical JSON `{"version":1,"chunks":[hash,...]}`."""
    for index, value in enumerate(chunks):
        canonical.require_hash(value, f"stream index chunk {index}")
    return canonical.dumps({"version": 1, "chunks": list(chunks)})


def decode_stream_index(data: bytes | bytearray | memoryview) -> list[str]:
    document = canonical.require_object(
        canonical.loads(data, "stream index"), "stream index", ("version", "chunks")
    )
    canonical.require_version(document, "stream index")
    chunks = canonical.require_list(document["chunks"], "stream index chunks", max_items=MAX_STREAM_CHUNKS)
    for index, value in enumerate(chunks):
        canonical.require_hash(value, f"stream index chunk {index}")
    return chunks


def _parse_snapshots(value: object) -> tuple[SnapshotRecord, ...]:
    items = canonical.require_list(value, "snapshots", max_items=MAX_SNAPSHOTS)
    snapshots = tuple(
        SnapshotRecord.from_json(item, f"snapshots[{index}]") for index, item in enumerate(items)
    )
    names = [snapshot.name for snapshot in snapshots]
    if len(set(names)) != len(names):
        raise InvalidDocument("snapshots: two snapshots have the same name")
    return snapshots


def _parse_warnings(value: object) -> tuple[str, ...]:
    items = canonical.require_list(value, "warnings", max_items=MAX_WARNINGS)
    return tuple(
        canonical.require_str(item, f"warnings[{index}]", max_chars=MAX_WARNING_CHARS)
        for index, item in enumerate(items)
    )


def _parse_stats(value: object) -> dict[str, Any]:
    """Stats are free-form (the host's figures) but must be small, plain JSON with string keys."""
    if not isinstance(value, dict):
        raise InvalidDocument(f"stats must be an object, got {type(value).__name__}")
    _check_plain_json(value, "stats", depth=1)
    try:
        encoded = canonical.dumps(value)
    except ValueError as error:  # NaN or infinity
        raise InvalidDocument(f"stats: {error}") from None
    if len(encoded) > MAX_STATS_BYTES:
        raise InvalidDocument(f"stats are larger than {MAX_STATS_BYTES} bytes")
    return value


def _check_plain_json(value: object, where: str, depth: int) -> None:
    if depth > MAX_STATS_DEPTH:
        raise InvalidDocument(f"{where} nests deeper than {MAX_STATS_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidDocument(f"{where} has a non-string key {key!r:.40}")
            _check_plain_json(item, f"{where}.{key:.40}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_plain_json(item, f"{where}[{index}]", depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool):
        # Stats land in DynamoDB summaries too, whose numbers hold 38 digits: keep to 64-bit figures.
        canonical.require_int(value, where)
    elif value is not None and not isinstance(value, (str, float, bool)):
        raise InvalidDocument(f"{where} has a {type(value).__name__}, not plain JSON")


def _optional_str(value: object, where: str) -> str | None:
    if value is None:
        return None
    return canonical.require_str(value, where, max_chars=MAX_SNAPSHOT_TEXT_CHARS)


def _parse_time(value: object, where: str) -> datetime:
    try:
        return parse_iso_utc(value)  # type: ignore[arg-type]
    except ValueError as error:
        raise InvalidDocument(f"{where}: {error}") from None
