"""An in-memory backend speaking the HTTP API contract (docs/ARCHITECTURE.md), for uploader unit tests.

It is a real (small) implementation, not a mock: packs are parsed and re-hashed with the domain's
`verify_pack` when registered, commits check their parent and that every referenced blob is stored,
and presigned URLs are served from the stored pack bytes. Integration tests use the real stack.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from s3_sysbackup.api import ApiError
from s3_sysbackup.net import RequestCounter
from sysbackup_domain.hashing import sha256_base64
from sysbackup_domain.manifest import new_manifest_id, parse_commit_request, referenced_blobs
from sysbackup_domain.packs import PackEntry, verify_pack

URL_PREFIX = "fake-s3://packs/"


@dataclass
class FakeBackend:
    endpoint: str = "https://fake-api.invalid"
    counter: RequestCounter = field(default_factory=RequestCounter)
    packs: dict[str, bytes] = field(default_factory=dict)  # pack_id -> bytes (what S3 holds)
    registered: set[str] = field(default_factory=set)
    presigned: set[str] = field(default_factory=set)
    blobs: dict[str, tuple[str, PackEntry]] = field(default_factory=dict)
    manifests: dict[str, dict] = field(default_factory=dict)
    head: str | None = None
    _ids: Iterable[int] = field(default_factory=lambda: itertools.count(1))

    def _count(self, route: str) -> None:
        self.counter.add("api", route)

    def check_blobs(self, hashes: Iterable[str]) -> set[str]:
        self._count("POST /blobs/check")
        return {h for h in hashes if h in self.blobs}

    def presign_packs(self, packs: Sequence[Mapping[str, Any]]) -> tuple[list[dict], set[str]]:
        self._count("POST /packs/presign")
        uploads, registered = [], set()
        for pack in packs:
            pack_id = pack["sha256"]
            if pack_id in self.registered:
                registered.add(pack_id)
                continue
            self.presigned.add(pack_id)
            uploads.append(
                {
                    "pack_id": pack_id,
                    "url": URL_PREFIX + pack_id,
                    "method": "PUT",
                    "headers": {"If-None-Match": "*", "x-amz-checksum-sha256": "(pinned)"},
                    "expires_at": "2099-01-01T00:00:00Z",
                }
            )
        return uploads, registered

    def register_packs(self, packs: Sequence[Mapping[str, Any]]) -> list[str]:
        self._count("POST /packs/register")
        done = []
        for pack in packs:
            pack_id = pack["pack_id"]
            data = self.packs.get(pack_id)
            if data is None:
                raise ApiError("POST /packs/register", 400, f"pack {pack_id} was not uploaded")
            claimed = [PackEntry.from_json(blob) for blob in pack["blobs"]]
            if claimed != verify_pack(data):
                raise ApiError("POST /packs/register", 400, f"pack {pack_id}: claims differ from its trailer")
            for entry in claimed:
                self.blobs[entry.hash] = (pack_id, entry)
            self.registered.add(pack_id)
            done.append(pack_id)
        return done

    def adopt_packs(self, pack_ids: Sequence[str]) -> dict[str, Any]:
        """Register presigned, uploaded, unregistered packs from their own trailers."""
        self._count("POST /packs/adopt")
        outcome: dict[str, Any] = {"adopted": [], "registered": [], "skipped": {}}
        for pack_id in pack_ids:
            if pack_id in self.registered:
                outcome["registered"].append(pack_id)
            elif pack_id not in self.presigned:
                outcome["skipped"][pack_id] = "never presigned"
            elif pack_id not in self.packs:
                outcome["skipped"][pack_id] = "not uploaded"
            else:
                for entry in verify_pack(self.packs[pack_id]):
                    self.blobs[entry.hash] = (pack_id, entry)
                self.registered.add(pack_id)
                outcome["adopted"].append(pack_id)
        return outcome

    def commit_manifest(self, body: Mapping[str, Any]) -> dict:
        self._count("POST /manifests")
        request = parse_commit_request(dict(body))
        if request.parent != self.head:
            raise ApiError("POST /manifests", 409, f"parent {request.parent} is not the head {self.head}")
        missing = sorted(h for h in referenced_blobs(request) if h not in self.blobs)
        if missing:
            raise ApiError("POST /manifests", 422, f"missing blobs: {', '.join(missing)}")
        # Suffixes count *down*: within one second a newer id sorts first, as a random suffix may.
        suffix = f"{0xFFFFFFFF - next(self._ids):08x}"  # type: ignore[call-overload]
        manifest_id = new_manifest_id(datetime.now(timezone.utc), suffix)
        self.manifests[manifest_id] = {
            "version": 1,
            "id": manifest_id,
            "host": "test-host",
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

    def locate_blobs(self, hashes: Iterable[str], host: str | None = None) -> tuple[dict, dict]:
        self._count("POST /downloads")
        locations, urls = {}, {}
        for digest in hashes:
            if digest in self.blobs:
                pack_id, entry = self.blobs[digest]
                locations[digest] = {
                    "pack_id": pack_id,
                    **{k: v for k, v in entry.to_json().items() if k != "hash"},
                }
                urls[pack_id] = URL_PREFIX + pack_id
        return locations, urls


@dataclass
class FakeTransfer:
    """Presigned PUT/GET against the fake backend's pack store, with S3's If-None-Match semantics."""

    backend: FakeBackend
    counter: RequestCounter = field(default_factory=RequestCounter)
    puts: list[str] = field(default_factory=list)

    def put_pack(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        self.counter.add("s3", "put")
        pack_id = url.removeprefix(URL_PREFIX)
        assert hashlib.sha256(body).hexdigest() == pack_id, "pack bytes do not match the presigned key"
        assert sha256_base64(body)  # the checksum the real presign pins
        if pack_id in self.backend.packs:
            return False  # 412
        self.backend.packs[pack_id] = body
        self.puts.append(pack_id)
        return True

    def get_range(self, url: str, start: int, length: int) -> bytes:
        self.counter.add("s3", "get")
        data = self.backend.packs[url.removeprefix(URL_PREFIX)]
        assert start + length <= len(data)
        return data[start : start + length]
