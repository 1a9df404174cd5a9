"""An in-memory backend speaking the v2 HTTP API (docs/PACK_INDEX.md), for uploader unit tests.

It is a real (small) implementation, not a mock: a pack registry with the contract's states, presign
answering `stored` for packs already there, and a commit that walks the new manifest against its
parent exactly as the contract says (trees read from `locations` or the listed packs' trailers and
checked against their hash, blobs the parent holds at the same place are stored, every other blob
must be in a listed pack usable by the host), refusing with `422 {missing, packs}` otherwise.
Presigned URLs are served from the stored pack bytes. Integration tests use the real stack.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, BinaryIO

from s3_sysbackup.api import ApiError, PackDownloads
from s3_sysbackup.net import RequestCounter
from s3_sysbackup.transfer import TransferError
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import blob_hash, sha256_base64
from sysbackup_domain.manifest import (
    CommitRequest,
    decode_stream_index,
    new_manifest_id,
    parse_commit_request,
)
from sysbackup_domain.packs import PackEntry, PackWriter, open_blob, parse_trailer
from sysbackup_domain.tree import Tree, decode_tree

URL_PREFIX = "fake-s3://packs/"
HOST = "test-host"
USABLE = ("presigned", "verified")


@dataclass
class FakePack:
    """A registry item: one per pack."""

    size: int
    state: str = "presigned"
    hosts: set[str] = field(default_factory=lambda: {HOST})
    state_before_condemned: str | None = None


@dataclass
class FakeBackend:
    endpoint: str = "https://fake-api.invalid"
    counter: RequestCounter = field(default_factory=RequestCounter)
    objects: dict[str, bytes] = field(default_factory=dict)  # pack_id -> bytes (what S3 holds)
    registry: dict[str, FakePack] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)
    commit_requests: list[dict] = field(default_factory=list)  # every POST /manifests body
    head: str | None = None
    _ids: Iterable[int] = field(default_factory=lambda: itertools.count(1))

    def _count(self, route: str) -> None:
        self.counter.add("api", route)

    # -- test helpers: what gc does --------------------------------------------------------------

    def condemn(self, pack_id: str) -> None:
        item = self.registry[pack_id]
        item.state_before_condemned, item.state = item.state, "condemned"

    def collect(self, pack_id: str) -> None:
        """gc deleted the pack: object and item gone."""
        self.objects.pop(pack_id, None)
        self.registry.pop(pack_id, None)

    def repack(self, pack_id: str) -> str:
        """gc copied the pack's blobs, with another pack's, into a new pack and condemned the old one."""
        data = self.objects[pack_id]
        writer = PackWriter()
        writer.add(blob_hash(pack_id.encode()), "data", pack_id.encode())  # a live blob of another pack
        for entry in parse_trailer(data):
            stored = data[entry.offset : entry.offset + entry.length]
            writer.add_stored(entry.hash, entry.kind, entry.codec, stored, entry.raw_length)
        packed, _ = writer.finish()
        new_id = hashlib.sha256(packed).hexdigest()
        self.objects[new_id] = packed
        self.registry[new_id] = FakePack(len(packed), "verified", set(self.registry[pack_id].hosts))
        self.condemn(pack_id)
        return new_id

    def store_pack(self, data: bytes) -> str:
        """A pack in S3 and the registry, as if this host uploaded it (tests that build packs by hand)."""
        pack_id = hashlib.sha256(data).hexdigest()
        self.objects[pack_id] = data
        self.registry[pack_id] = FakePack(len(data), "verified")
        return pack_id

    def plant_manifest(self, root: str) -> str:
        """A manifest no commit walk checked (what a compromised store could serve to a restore)."""
        manifest_id = new_manifest_id(datetime.now(timezone.utc), f"{next(self._ids):08x}")  # type: ignore[call-overload]
        self.manifests[manifest_id] = {"id": manifest_id, "parent": self.head, "root": root, "snapshots": []}
        self.head = manifest_id
        return manifest_id

    # -- POST /packs/presign -------------------------------------------------------------------

    def presign_packs(self, packs: Sequence[Mapping[str, Any]]) -> tuple[list[dict], set[str]]:
        self._count("POST /packs/presign")
        uploads, stored = [], set()
        collecting = [p["sha256"] for p in packs if self._state(p["sha256"]) == "deleting"]
        if collecting:
            raise ApiError("POST /packs/presign", 409, "gc is collecting", {"collecting": collecting})
        for pack in packs:
            pack_id, size = pack["sha256"], int(pack["size"])
            item = self.registry.get(pack_id)
            if item is None:
                item = self.registry[pack_id] = FakePack(size)
            if item.state == "corrupt":
                raise ApiError("POST /packs/presign", 422, f"pack {pack_id} is corrupt")
            if item.state == "condemned":
                item.state = item.state_before_condemned or "presigned"
            item.hosts.add(HOST)
            there = len(self.objects.get(pack_id, b"")) == item.size
            if item.state == "verified" or there:
                stored.add(pack_id)
                continue
            uploads.append(
                {
                    "pack_id": pack_id,
                    "url": URL_PREFIX + pack_id,
                    "method": "PUT",
                    "headers": {"If-None-Match": "*", "x-amz-checksum-sha256": "(pinned)"},
                    "expires_at": "2099-01-01T00:00:00Z",
                }
            )
        return uploads, stored

    def _state(self, pack_id: str) -> str | None:
        item = self.registry.get(pack_id)
        return item.state if item is not None else None

    # -- GET /packs, POST /downloads -------------------------------------------------------------

    def list_packs(self, host: str | None = None) -> list[dict]:
        self._count("GET /packs")
        who = host or HOST
        return [
            {"pack_id": pack_id, "size": item.size, "state": item.state}
            for pack_id, item in sorted(self.registry.items())
            if who in item.hosts
        ]

    def download_urls(self, pack_ids: Iterable[str], host: str | None = None) -> PackDownloads:
        wanted = sorted(set(pack_ids))
        if not wanted:
            return PackDownloads({}, {}, {})
        self._count("POST /downloads")
        who = host or HOST
        downloads = PackDownloads({}, {}, {})
        for pack_id in wanted:
            item = self.registry.get(pack_id)
            if item is None:
                downloads.missing[pack_id] = "unknown"
            elif who not in item.hosts:
                downloads.missing[pack_id] = "not_yours"
            elif item.state == "deleting":
                downloads.missing[pack_id] = "deleting"
            else:
                downloads.urls[pack_id] = URL_PREFIX + pack_id
                downloads.sizes[pack_id] = item.size
        return downloads

    # -- POST /manifests -------------------------------------------------------------------------

    def commit_manifest(self, body: Mapping[str, Any]) -> dict:
        self._count("POST /manifests")
        self.commit_requests.append(dict(body))
        request = parse_commit_request(dict(body))
        if request.parent != self.head:
            raise ApiError("POST /manifests", 409, f"parent {request.parent} is not the head {self.head}")
        refused, missing = _CommitWalk(self, request).run()
        if refused or missing:
            raise ApiError(
                "POST /manifests",
                422,
                "blobs or packs refused",
                {"message": "refused", "missing": sorted(missing), "packs": refused},
            )
        for pack_id in request.packs:
            self.registry[pack_id].state = "verified"  # what the commit or the verifier does
        # Suffixes count *down*: within one second a newer id sorts first, as a random suffix may.
        suffix = f"{0xFFFFFFFF - next(self._ids):08x}"  # type: ignore[call-overload]
        manifest_id = new_manifest_id(datetime.now(timezone.utc), suffix)
        self.manifests[manifest_id] = {
            "version": 1,
            "id": manifest_id,
            "host": HOST,
            "parent": request.parent,
            "created": datetime.now(timezone.utc).isoformat(),
            "retain_until": "2099-01-01T00:00:00Z",
            "root": request.root,
            "snapshots": [s.to_json() for s in request.snapshots],
            "warnings": list(request.warnings),
            "stats": dict(request.stats),
        }
        self.head = manifest_id
        return {"manifest_id": manifest_id, "retain_until": "2099-01-01T00:00:00Z"}

    # -- manifests -------------------------------------------------------------------------------

    def list_manifests(self, host: str | None = None) -> list[dict]:
        self._count("GET /manifests")
        return self.list_manifests_uncounted()

    def latest_manifest(self, host: str | None = None) -> dict | None:
        self._count("GET /manifests")
        return next((m for m in self.list_manifests_uncounted() if m["manifest_id"] == self.head), None)

    def list_manifests_uncounted(self) -> list[dict]:
        return [
            {key: m[key] for key in ("created", "parent", "root", "retain_until", "stats")}
            | {"manifest_id": mid}
            for mid, m in sorted(self.manifests.items())
        ]

    def get_manifest(self, manifest_id: str, host: str | None = None) -> dict:
        self._count("GET /manifests/{manifest_id}")
        if manifest_id not in self.manifests:
            raise ApiError("GET /manifests/{manifest_id}", 404, f"no manifest {manifest_id}")
        return self.manifests[manifest_id]

    # -- what the tests look at ------------------------------------------------------------------

    def blobs(self) -> dict[str, str]:
        """Every blob in a usable pack -> its pack."""
        return {
            entry.hash: pack_id
            for pack_id, item in self.registry.items()
            if item.state in USABLE and pack_id in self.objects
            for entry in parse_trailer(self.objects[pack_id])
        }


class _CommitWalk:
    """The contract's commit walk over (new, parent at the same place) pairs."""

    def __init__(self, backend: FakeBackend, request: CommitRequest) -> None:
        self.backend = backend
        self.request = request
        self.refused: dict[str, str] = {}
        self.missing: set[str] = set()
        self.trailers: dict[str, tuple[str, PackEntry]] = {}
        for pack_id in request.packs:
            item = backend.registry.get(pack_id)
            if item is None:
                self.refused[pack_id] = "unknown"
            elif HOST not in item.hosts:
                self.refused[pack_id] = "not_yours"
            elif item.state not in USABLE:
                self.refused[pack_id] = item.state
            elif pack_id not in backend.objects:
                self.refused[pack_id] = "unreadable"
            else:
                for entry in parse_trailer(backend.objects[pack_id]):
                    self.trailers[entry.hash] = (pack_id, entry)

    def run(self) -> tuple[dict[str, str], set[str]]:
        parent = self.backend.manifests.get(self.request.parent) if self.request.parent else None
        pairs: list[tuple[str | None, str | None]] = [(self.request.root, parent["root"] if parent else None)]
        while pairs:
            new, old = pairs.pop()
            if new is None or new == old:
                continue
            new_tree = self._tree(new)
            old_tree = self._tree(old) if old is not None else None
            if new_tree is None:
                continue
            before = {e.name: e for e in old_tree.entries} if old_tree is not None else {}
            for entry in new_tree.entries:
                same = before.get(entry.name)
                if entry.type == "dir" and entry.subtree is not None:
                    pairs.append(
                        (entry.subtree, same.subtree if same is not None and same.type == "dir" else None)
                    )
                    continue
                held = set(same.content) if same is not None and same.type == "file" else set()
                self._need(digest for digest in entry.content if digest not in held)
        parent_snapshots = {s["name"]: s.get("content") for s in (parent or {}).get("snapshots", [])}
        for snapshot in self.request.snapshots:
            old = parent_snapshots.get(snapshot.name)
            if snapshot.content is None or snapshot.content == old:
                continue
            chunks = self._read(snapshot.content)
            old_chunks = self._read(old) if old is not None else None
            if chunks is None:
                continue
            held = set(decode_stream_index(old_chunks)) if old_chunks is not None else set()
            self._need(c for c in decode_stream_index(chunks) if c not in held)
        return self.refused, self.missing

    def _need(self, digests: Iterable[str]) -> None:
        self.missing.update(digest for digest in digests if digest not in self.trailers)

    def _tree(self, digest: str) -> Tree | None:
        data = self._read(digest)
        return decode_tree(data) if data is not None else None

    def _read(self, digest: str) -> bytes | None:
        """A blob the walk reads: from its location hint (checked), else the listed packs' trailers."""
        location = self.request.locations.get(digest)
        if location is not None:
            data = self.backend.objects.get(location.pack_id)
            item = self.backend.registry.get(location.pack_id)
            if data is not None and item is not None and HOST in item.hosts:
                stored = data[location.offset : location.offset + location.length]
                try:
                    return open_blob(location.entry(digest, "data"), stored)
                except (CorruptBlob, InvalidDocument):
                    pass
        found = self.trailers.get(digest)
        if found is None:
            self.missing.add(digest)
            return None
        pack_id, entry = found
        return open_blob(entry, self.backend.objects[pack_id][entry.offset : entry.offset + entry.length])


@dataclass
class FakeTransfer:
    """Presigned PUT/GET against the fake backend's objects, with S3's If-None-Match semantics."""

    backend: FakeBackend
    counter: RequestCounter = field(default_factory=RequestCounter)
    puts: list[str] = field(default_factory=list)
    gets: list[tuple[str, int, int]] = field(default_factory=list)

    def put_pack(self, url: str, headers: Mapping[str, str], body: bytes | BinaryIO) -> bool:
        self.counter.add("s3", "put")
        if not isinstance(body, bytes):  # a spooled pack
            body.seek(0)
            body = body.read()
        pack_id = url.removeprefix(URL_PREFIX)
        assert hashlib.sha256(body).hexdigest() == pack_id, "pack bytes do not match the presigned key"
        assert sha256_base64(body)  # the checksum the real presign pins
        if pack_id in self.backend.objects:
            return False  # 412
        self.backend.objects[pack_id] = body
        self.puts.append(pack_id)
        return True

    def get_range(self, url: str, start: int, length: int) -> bytes:
        self.counter.add("s3", "get")
        pack_id = url.removeprefix(URL_PREFIX)
        data = self.backend.objects.get(pack_id)
        if data is None:
            raise TransferError(f"GET range {start}+{length}: HTTP 404")
        assert start + length <= len(data)
        self.gets.append((pack_id, start, length))
        return data[start : start + length]

    def open_range(self, url: str, start: int, length: int) -> FakeRangeBody:
        return FakeRangeBody(self.get_range(url, start, length))


class FakeRangeBody:
    """`RangeBody` over bytes already fetched: exact reads, and a check that none go past the range."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._position

    def read_exact(self, count: int) -> bytes:
        assert 0 <= count <= self.remaining, f"read of {count} bytes with {self.remaining} left"
        piece = self._data[self._position : self._position + count]
        self._position += count
        return piece

    def skip(self, count: int) -> None:
        self.read_exact(count)

    def __enter__(self) -> FakeRangeBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass
