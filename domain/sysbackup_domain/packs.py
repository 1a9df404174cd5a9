"""The pack format: many compressed blobs in one S3 object, with a trailer listing them.

Layout (see docs/ARCHITECTURE.md, "Pack format"):

    blob_0 | blob_1 | ... | trailer | trailer_length (u32 BE) | magic b"S3SBPK01"

The trailer is zstd-compressed canonical JSON `{"version":1,"blobs":[{hash,kind,codec,offset,length,
raw_length}, ...]}`. A reader can fetch the last TRAILER_TAIL_BYTES with a ranged GET, learn the trailer
length, fetch the trailer, and then fetch single blobs by range.

Everything read back from a pack is untrusted: the trailer is validated (offsets inside the blob area,
no overlaps, no duplicate hashes) and every blob is re-hashed before it is believed.
"""

import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, BinaryIO

from sysbackup_domain import canonical
from sysbackup_domain.compression import (
    CODECS,
    compress_if_worth,
    compress_zstd,
    decompress,
    decompress_zstd_at_most,
)
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import blob_hash as compute_blob_hash
from sysbackup_domain.hashing import is_blob_hash

MAGIC = b"S3SBPK01"
TRAILER_TAIL_BYTES = 12  # u32 trailer length + 8-byte magic
_TAIL = struct.Struct(">I8s")

# One PUT (S3 allows 5 GB, but the verifier Lambda reads a whole pack into memory).
MAX_PACK_BYTES = 128 * 1024 * 1024

# A run's first packs aim at 16 MiB; a run that has sealed more grows its packs (a quarter of what it
# sealed so far) up to 64 MiB. Why: S3 bills per PUT ($0.005 per 1,000), and every pack also costs a
# registry item, a trailer read at commit, a verifier read and one lock extension per fold window; a
# 1 GiB dump in 16 MiB packs is 64 of each, in growing packs about 22 (restic's default packs are
# 16 MiB: 64 PUTs). Small runs keep small packs, which matter to gc: it repacks at pack granularity (a
# mostly-dead pack costs its whole size to rewrite), and a one-file change is one small pack the commit
# verifies in the GET it reads anyway. Against bigger packs still: a failed PUT retries the whole pack,
# the verifier reads it whole into memory, and the host spools a few of them on disk. Restores read
# single blobs by ranged GET, so pack size does not change restore granularity.
TARGET_PACK_BYTES = 16 * 1024 * 1024
PACK_GROWTH_LIMIT = 4  # the biggest target is 4 x the first: 64 MiB


def next_pack_target(sealed_bytes: int, first_target: int = TARGET_PACK_BYTES) -> int:
    """Bytes the next pack of a run aims at, once the run has sealed `sealed_bytes` in packs."""
    return min(max(first_target, sealed_bytes // 4), first_target * PACK_GROWTH_LIMIT)


# Caps that keep a trailer small enough to parse in a Lambda: with tiny files a pack fills by count.
MAX_PACK_BLOBS = 100_000
MAX_TRAILER_RAW_BYTES = 32 * 1024 * 1024
# A blob is a chunk (<= 16 MiB by pyfastcdc's limits), a small file, or a tree document; trees of
# enormous directories are the largest legitimate blobs.
MAX_BLOB_RAW_BYTES = 512 * 1024 * 1024

BLOB_KINDS = ("data", "tree")
_ENTRY_KEYS = frozenset(("hash", "kind", "codec", "offset", "length", "raw_length"))

# Upper bound of one trailer entry's JSON, to keep a pack under its size cap before it is finished.
_TRAILER_BYTES_PER_ENTRY = 200
_TRAILER_FIXED_BYTES = 64


class PackFull(ValueError):
    """The blob does not fit in this pack; finish it and start another."""


@dataclass(frozen=True)
class PackEntry:
    """Where one blob lives inside a pack, and how it is stored."""

    hash: str
    kind: str
    codec: str
    offset: int
    length: int
    raw_length: int

    def to_json(self) -> dict[str, Any]:
        return {
            "hash": self.hash,
            "kind": self.kind,
            "codec": self.codec,
            "offset": self.offset,
            "length": self.length,
            "raw_length": self.raw_length,
        }

    @classmethod
    def from_json(cls, d: object) -> "PackEntry":
        """Validate an untrusted entry (trailer, register request, index item) -> InvalidDocument."""
        # A trailer holds up to 100k entries, parsed by every commit, verifier and index rebuild: a
        # well-formed entry is accepted by the checks inlined here; anything else takes the field-by-field
        # path below, which accepts no less (Decimals from DynamoDB) and names the problem.
        if type(d) is dict and d.keys() == _ENTRY_KEYS:
            hash_, kind, codec, offset = d["hash"], d["kind"], d["codec"], d["offset"]
            length, raw_length = d["length"], d["raw_length"]
            if (
                type(offset) is int
                and type(length) is int
                and type(raw_length) is int
                and 0 <= offset <= MAX_PACK_BYTES
                and 0 <= length <= MAX_PACK_BYTES
                and 0 <= raw_length <= MAX_BLOB_RAW_BYTES
                and kind in BLOB_KINDS
                and codec in CODECS
                and (codec != "none" or length == raw_length)
                and is_blob_hash(hash_)
            ):
                return cls(hash_, kind, codec, offset, length, raw_length)
        return cls._from_json_field_by_field(d)

    @classmethod
    def _from_json_field_by_field(cls, d: object) -> "PackEntry":
        fields = canonical.require_object(
            d, "pack entry", ("hash", "kind", "codec", "offset", "length", "raw_length")
        )
        entry = cls(
            hash=canonical.require_hash(fields["hash"], "pack entry hash"),
            kind=_require_choice(fields["kind"], "pack entry kind", BLOB_KINDS),
            codec=_require_choice(fields["codec"], "pack entry codec", CODECS),
            offset=canonical.require_int(fields["offset"], "pack entry offset", 0, MAX_PACK_BYTES),
            length=canonical.require_int(fields["length"], "pack entry length", 0, MAX_PACK_BYTES),
            raw_length=canonical.require_int(
                fields["raw_length"], "pack entry raw_length", 0, MAX_BLOB_RAW_BYTES
            ),
        )
        if entry.codec == "none" and entry.length != entry.raw_length:
            raise InvalidDocument(
                f"pack entry {entry.hash}: codec none but length {entry.length}"
                f" != raw_length {entry.raw_length}"
            )
        return entry


def _require_choice(value: object, where: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidDocument(f"{where} must be one of {', '.join(choices)}, got {value!r:.80}")
    return value


class PackWriter:
    """Builds one pack, in memory or (with `spool`) in a file. Not thread-safe: one writer per thread.

    Adding a hash that is already in the pack returns the existing entry (a blob is stored once).
    `size` counts blob bytes so far; the finished pack adds the trailer and the tail. With a spool
    (an empty file opened for writing), blobs go to the file as they come and `finish_spool` ends
    the pack there: memory stays flat whatever the pack size (the host's packs wait for their PUT
    in the page cache, not in its RSS).
    """

    def __init__(
        self, max_bytes: int = MAX_PACK_BYTES, max_blobs: int = MAX_PACK_BLOBS, spool: BinaryIO | None = None
    ) -> None:
        if not 0 < max_bytes <= MAX_PACK_BYTES:
            raise ValueError(f"max_bytes must be in 1..{MAX_PACK_BYTES}, got {max_bytes}")
        self._max_bytes = max_bytes
        self._max_blobs = max_blobs
        self._spool = spool
        self._digest = hashlib.sha256()  # of what went to the spool
        self._parts: list[bytes] = []
        self._entries: dict[str, PackEntry] = {}
        self._size = 0
        self._finished = False

    @property
    def size(self) -> int:
        return self._size

    @property
    def count(self) -> int:
        return len(self._entries)

    @property
    def spool(self) -> BinaryIO | None:
        return self._spool

    def __contains__(self, blob_hash: object) -> bool:
        return blob_hash in self._entries

    def has_room(self, stored_length: int) -> bool:
        """Would a blob of `stored_length` stored bytes still fit (counting its trailer entry)?"""
        if self.count >= self._max_blobs:
            return False
        trailer_bound = _TRAILER_FIXED_BYTES + _TRAILER_BYTES_PER_ENTRY * (self.count + 1)
        return self._size + stored_length + trailer_bound + TRAILER_TAIL_BYTES <= self._max_bytes

    def add(self, blob_hash: str, kind: str, plaintext: bytes | bytearray | memoryview) -> PackEntry:
        """Add a blob by its plaintext, compressing it if that pays. The caller vouches for the hash."""
        existing = self._entries.get(blob_hash)
        if existing is not None:
            return existing
        codec, stored = compress_if_worth(plaintext)
        return self.add_stored(blob_hash, kind, codec, stored, len(plaintext))

    def add_stored(self, blob_hash: str, kind: str, codec: str, stored: bytes, raw_length: int) -> PackEntry:
        """Add a blob already encoded with `codec` (the pipeline compresses in worker threads)."""
        if self._finished:
            raise ValueError("pack already finished")
        if not is_blob_hash(blob_hash):
            raise ValueError(f"not a blob hash: {blob_hash!r:.80}")
        if kind not in BLOB_KINDS:
            raise ValueError(f"kind must be one of {', '.join(BLOB_KINDS)}, got {kind!r}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
        if not 0 <= raw_length <= MAX_BLOB_RAW_BYTES:
            raise ValueError(f"raw_length must be in 0..{MAX_BLOB_RAW_BYTES}, got {raw_length}")
        if codec == "none" and len(stored) != raw_length:
            raise ValueError(f"codec none but {len(stored)} stored bytes != raw_length {raw_length}")
        existing = self._entries.get(blob_hash)
        if existing is not None:
            return existing
        if not self.has_room(len(stored)):
            raise PackFull(
                f"a {len(stored)}-byte blob does not fit: pack holds {self.count} blobs, {self._size} bytes"
            )
        entry = PackEntry(blob_hash, kind, codec, self._size, len(stored), raw_length)
        if self._spool is not None:
            self._spool.write(stored)
            self._digest.update(stored)
        else:
            self._parts.append(bytes(stored))
        self._entries[blob_hash] = entry
        self._size += len(stored)
        return entry

    def stored_blobs(self) -> Iterator[tuple[PackEntry, bytes]]:
        """The blobs added so far, as stored, in offset order (to move them into another pack)."""
        if self._spool is None:
            yield from zip(self._entries.values(), self._parts, strict=True)
            return
        self._spool.flush()
        for entry in self._entries.values():
            yield entry, os.pread(self._spool.fileno(), entry.length, entry.offset)

    def finish(self) -> tuple[bytes, list[PackEntry]]:
        """The whole pack (blobs, trailer, tail) and its entries in offset order. Ends this writer."""
        if self._spool is not None:
            raise ValueError("a spooled pack ends with finish_spool")
        entries, ending = self._end()
        pack = b"".join([*self._parts, ending])
        self._parts = []
        return pack, entries

    def finish_spool(self) -> tuple[str, int, list[PackEntry]]:
        """End a spooled pack in its file: (SHA-256 hex of the pack, its size, entries in offset order)."""
        if self._spool is None:
            raise ValueError("not a spooled pack: use finish")
        entries, ending = self._end()
        self._spool.write(ending)
        self._spool.flush()
        self._digest.update(ending)
        return self._digest.hexdigest(), self._size + len(ending), entries

    def _end(self) -> tuple[list[PackEntry], bytes]:
        if not self._entries:
            raise ValueError("an empty pack is not worth a PUT")
        self._finished = True
        entries = list(self._entries.values())
        trailer = encode_trailer(entries)
        return entries, trailer + _TAIL.pack(len(trailer), MAGIC)


def encode_trailer(entries: list[PackEntry]) -> bytes:
    """zstd-compressed canonical JSON listing the entries."""
    document = {"version": 1, "blobs": [entry.to_json() for entry in entries]}
    return compress_zstd(canonical.dumps(document))


def trailer_length_from_tail(tail: bytes | bytearray | memoryview) -> int:
    """The trailer's size from a pack's last TRAILER_TAIL_BYTES (for ranged reads)."""
    if len(tail) != TRAILER_TAIL_BYTES:
        raise InvalidDocument(f"pack tail must be {TRAILER_TAIL_BYTES} bytes, got {len(tail)}")
    length, magic = _TAIL.unpack(bytes(tail))
    if magic != MAGIC:
        raise InvalidDocument(f"not a pack: magic {magic!r} != {MAGIC!r}")
    if length == 0:
        raise InvalidDocument("pack trailer length is zero")
    return length


def read_trailer_bytes(read_range: Callable[[int, int], bytes], size: int, first_read: int) -> bytes:
    """A pack's raw trailer (tail excluded) through `read_range(start, length)` (a ranged GET):
    one read of the pack's last `first_read` bytes holds the tail and usually the whole trailer; a
    longer trailer costs a second read, of its front only. InvalidDocument if the pack holds none."""
    if size <= TRAILER_TAIL_BYTES:
        raise InvalidDocument(f"pack of {size} bytes is too short to hold a trailer")
    suffix_start = max(0, size - max(first_read, TRAILER_TAIL_BYTES))
    suffix = read_range(suffix_start, size - suffix_start)
    trailer_end = size - TRAILER_TAIL_BYTES
    trailer_length = trailer_length_from_tail(suffix[-TRAILER_TAIL_BYTES:])
    if trailer_length > trailer_end:
        raise InvalidDocument(f"trailer length {trailer_length} exceeds the pack ({size} bytes)")
    trailer_start = trailer_end - trailer_length
    if trailer_start >= suffix_start:
        return suffix[trailer_start - suffix_start : trailer_end - suffix_start]
    return read_range(trailer_start, suffix_start - trailer_start) + suffix[: trailer_end - suffix_start]


def parse_trailer(pack: bytes | bytearray | memoryview) -> list[PackEntry]:
    """The validated entries of a whole pack held in memory."""
    if len(pack) < TRAILER_TAIL_BYTES:
        raise InvalidDocument(f"pack of {len(pack)} bytes is too short to hold a trailer")
    view = memoryview(pack)
    trailer_length = trailer_length_from_tail(view[-TRAILER_TAIL_BYTES:])
    trailer_end = len(pack) - TRAILER_TAIL_BYTES
    if trailer_length > trailer_end:
        raise InvalidDocument(f"trailer length {trailer_length} exceeds the pack ({len(pack)} bytes)")
    return parse_trailer_bytes(view[trailer_end - trailer_length : trailer_end], len(pack))


def parse_trailer_bytes(trailer: bytes | bytearray | memoryview, pack_size: int) -> list[PackEntry]:
    """Validate a trailer read by range: every blob inside the blob area, no overlaps, no duplicates."""
    blob_area_end = pack_size - TRAILER_TAIL_BYTES - len(trailer)
    if blob_area_end < 0:
        raise InvalidDocument(f"trailer of {len(trailer)} bytes does not fit a {pack_size}-byte pack")
    try:
        raw = decompress_zstd_at_most(trailer, MAX_TRAILER_RAW_BYTES)
    except CorruptBlob as error:
        raise InvalidDocument(f"pack trailer: {error}") from None
    document = canonical.require_object(
        canonical.loads(raw, "pack trailer"), "pack trailer", ("version", "blobs")
    )
    canonical.require_version(document, "pack trailer")
    items = canonical.require_list(document["blobs"], "pack trailer blobs", max_items=MAX_PACK_BLOBS)
    if not items:
        raise InvalidDocument("pack trailer lists no blobs")
    entries = [PackEntry.from_json(item) for item in items]
    check_layout(entries, blob_area_end)
    return entries


def check_layout(entries: Sequence[PackEntry], blob_area_end: int) -> None:
    """Every blob inside [0, blob_area_end), none overlapping, no hash twice; InvalidDocument otherwise.

    Also usable on a host's claimed entries (POST /packs/register) against the pack's size.
    """
    if len({entry.hash for entry in entries}) != len(entries):
        seen: set[str] = set()
        for entry in entries:
            if entry.hash in seen:
                raise InvalidDocument(f"pack trailer lists blob {entry.hash} twice")
            seen.add(entry.hash)
    for entry in entries:
        if entry.offset + entry.length > blob_area_end:
            raise InvalidDocument(
                f"blob {entry.hash} at {entry.offset}+{entry.length}"
                f" runs past the blob area ({blob_area_end} bytes)"
            )
    previous_end = 0
    previous_hash = None
    for entry in sorted(entries, key=_by_position):
        if entry.offset < previous_end:
            raise InvalidDocument(f"blob {entry.hash} at offset {entry.offset} overlaps blob {previous_hash}")
        previous_end = entry.offset + entry.length
        previous_hash = entry.hash


_by_position = attrgetter("offset", "length")


def open_blob(entry: PackEntry, stored: bytes | bytearray | memoryview) -> bytes:
    """Decode a blob's stored bytes and check they hash to `entry.hash`; CorruptBlob otherwise."""
    if len(stored) != entry.length:
        raise CorruptBlob(f"blob {entry.hash}: got {len(stored)} stored bytes, expected {entry.length}")
    plaintext = decompress(entry.codec, stored, entry.raw_length)
    actual = compute_blob_hash(plaintext)
    if actual != entry.hash:
        raise CorruptBlob(f"blob claimed as {entry.hash} hashes to {actual}")
    return plaintext


def verify_pack(pack: bytes | bytearray | memoryview) -> list[PackEntry]:
    """Parse the trailer and re-hash every blob. InvalidDocument / CorruptBlob on the first problem."""
    entries = parse_trailer(pack)
    view = memoryview(pack)
    for entry in entries:
        open_blob(entry, view[entry.offset : entry.offset + entry.length])
    return entries
