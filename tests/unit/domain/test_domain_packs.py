"""Pack format: round trips, ranged-read helpers, strict trailer validation, corruption detection."""

import gzip
import hashlib
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sysbackup_domain import canonical
from sysbackup_domain.compression import compress_zstd
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import (
    MAGIC,
    MAX_PACK_BYTES,
    TRAILER_TAIL_BYTES,
    PackEntry,
    PackFull,
    PackWriter,
    check_layout,
    open_blob,
    parse_trailer,
    parse_trailer_bytes,
    read_trailer_bytes,
    trailer_length_from_tail,
    verify_pack,
)

compressible = st.integers(min_value=0, max_value=20_000).map(lambda n: b"row of a table;\n" * (n // 16))
random_bytes = st.binary(max_size=5000)


def build_pack(blobs: list[bytes], kind: str = "data") -> tuple[bytes, list[PackEntry]]:
    writer = PackWriter()
    for blob in blobs:
        writer.add(blob_hash(blob), kind, blob)
    return writer.finish()


def pack_from_documents(blob_area: bytes, entries: list[dict], version: int = 1) -> bytes:
    """A pack with a hand-written trailer, to feed hostile trailers to the parser."""
    trailer = compress_zstd(canonical.dumps({"version": version, "blobs": entries}))
    return blob_area + trailer + struct.pack(">I", len(trailer)) + MAGIC


def entry_json(blob: bytes, offset: int, overrides: dict | None = None) -> dict:
    document = {
        "hash": blob_hash(blob),
        "kind": "data",
        "codec": "none",
        "offset": offset,
        "length": len(blob),
        "raw_length": len(blob),
    }
    document.update(overrides or {})
    return document


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(random_bytes, compressible), min_size=1, max_size=20))
def test_pack_round_trip_yields_every_blob(blobs: list[bytes]) -> None:
    pack, entries = build_pack(blobs)

    assert verify_pack(pack) == entries
    by_hash = {entry.hash: entry for entry in parse_trailer(pack)}
    assert set(by_hash) == {blob_hash(blob) for blob in blobs}
    for blob in blobs:
        entry = by_hash[blob_hash(blob)]
        assert open_blob(entry, pack[entry.offset : entry.offset + entry.length]) == blob


def test_compressible_blobs_are_compressed_and_random_ones_are_not() -> None:
    text = b"INSERT INTO t VALUES (1, 'hello');\n" * 1000
    noise = os.urandom(10_000)
    _, entries = build_pack([text, noise])
    codecs = {entry.hash: entry.codec for entry in entries}
    assert codecs[blob_hash(text)] == "zstd"
    assert codecs[blob_hash(noise)] == "none"


def test_ranged_read_path_matches_whole_pack_parse() -> None:
    pack, entries = build_pack([os.urandom(300), b"x" * 3000])
    trailer_length = trailer_length_from_tail(pack[-TRAILER_TAIL_BYTES:])
    trailer = pack[len(pack) - TRAILER_TAIL_BYTES - trailer_length : -TRAILER_TAIL_BYTES]
    assert parse_trailer_bytes(trailer, len(pack)) == entries


def test_adding_the_same_hash_twice_stores_it_once() -> None:
    writer = PackWriter()
    first = writer.add(blob_hash(b"same"), "data", b"same")
    second = writer.add(blob_hash(b"same"), "data", b"same")
    assert first == second
    assert writer.count == 1
    assert blob_hash(b"same") in writer
    assert writer.size == len(b"same")


def test_add_stored_keeps_precompressed_bytes() -> None:
    plaintext = b"abc" * 1000
    stored = gzip.compress(plaintext)
    writer = PackWriter()
    entry = writer.add_stored(blob_hash(plaintext), "tree", "gzip", stored, len(plaintext))
    pack, _ = writer.finish()
    assert (entry.codec, entry.kind, entry.length) == ("gzip", "tree", len(stored))
    assert open_blob(entry, pack[entry.offset : entry.offset + entry.length]) == plaintext


def test_writer_refuses_bad_arguments() -> None:
    writer = PackWriter()
    with pytest.raises(ValueError, match="not a blob hash"):
        writer.add("ABC", "data", b"x")
    with pytest.raises(ValueError, match="kind"):
        writer.add(blob_hash(b"x"), "file", b"x")
    with pytest.raises(ValueError, match="codec none"):
        writer.add_stored(blob_hash(b"x"), "data", "none", b"xx", 1)
    with pytest.raises(ValueError, match="empty pack"):
        writer.finish()


def test_writer_reports_full_before_exceeding_its_cap() -> None:
    writer = PackWriter(max_bytes=10_000)
    blob = os.urandom(4000)
    writer.add(blob_hash(blob), "data", blob)
    assert not writer.has_room(6000)
    other = os.urandom(6000)
    with pytest.raises(PackFull):
        writer.add(blob_hash(other), "data", other)
    pack, _ = writer.finish()
    assert len(pack) <= 10_000


def test_writer_fills_by_count() -> None:
    writer = PackWriter(max_blobs=3)
    for index in range(3):
        blob = str(index).encode()
        writer.add(blob_hash(blob), "data", blob)
    assert not writer.has_room(1)
    with pytest.raises(PackFull):
        writer.add(blob_hash(b"4"), "data", b"4")


def test_finished_writer_cannot_be_reused() -> None:
    writer = PackWriter()
    writer.add(blob_hash(b"a"), "data", b"a")
    writer.finish()
    with pytest.raises(ValueError, match="finished"):
        writer.add(blob_hash(b"b"), "data", b"b")


def test_flipping_any_blob_byte_is_detected() -> None:
    blobs = [os.urandom(500), b"compressible " * 200]
    pack, entries = build_pack(blobs)
    for entry in entries:
        for position in (entry.offset, entry.offset + entry.length // 2, entry.offset + entry.length - 1):
            damaged = bytearray(pack)
            damaged[position] ^= 0x01
            with pytest.raises(CorruptBlob):
                verify_pack(bytes(damaged))


def test_flipping_a_trailer_byte_is_rejected() -> None:
    pack, _ = build_pack([os.urandom(100)])
    damaged = bytearray(pack)
    damaged[-TRAILER_TAIL_BYTES - 5] ^= 0xFF
    with pytest.raises((InvalidDocument, CorruptBlob)):
        verify_pack(bytes(damaged))


def test_truncated_or_foreign_objects_are_not_packs() -> None:
    pack, _ = build_pack([b"hello"])
    with pytest.raises(InvalidDocument, match="too short"):
        parse_trailer(pack[:5])
    with pytest.raises(InvalidDocument, match="magic"):
        parse_trailer(pack[:-1] + b"X")
    with pytest.raises(InvalidDocument, match="exceeds"):
        parse_trailer(struct.pack(">I", 1000) + MAGIC)
    with pytest.raises(InvalidDocument, match="12 bytes"):
        trailer_length_from_tail(b"short")
    with pytest.raises(InvalidDocument, match="zero"):
        trailer_length_from_tail(struct.pack(">I", 0) + MAGIC)


def test_trailer_that_is_not_zstd_is_rejected() -> None:
    garbage = b"not zstd at all"
    pack = b"x" + garbage + struct.pack(">I", len(garbage)) + MAGIC
    with pytest.raises(InvalidDocument, match="trailer"):
        parse_trailer(pack)


def test_overlapping_blobs_are_rejected() -> None:
    area = b"abcdefgh"
    pack = pack_from_documents(area, [entry_json(area[0:6], 0), entry_json(area[4:8], 4)])
    with pytest.raises(InvalidDocument, match="overlaps"):
        parse_trailer(pack)


def test_blob_running_past_the_blob_area_is_rejected() -> None:
    area = b"abcdefgh"
    # The blob claims 4 bytes starting at 6: its end would be inside the trailer.
    pack = pack_from_documents(area, [entry_json(b"ghij", 6)])
    with pytest.raises(InvalidDocument, match="past the blob area"):
        parse_trailer(pack)


def test_duplicate_hashes_in_a_trailer_are_rejected() -> None:
    area = b"abab"
    pack = pack_from_documents(area, [entry_json(b"ab", 0), entry_json(b"ab", 2)])
    with pytest.raises(InvalidDocument, match="twice"):
        parse_trailer(pack)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"hash": "A" * 64}, "hash"),
        ({"hash": "0" * 63}, "hash"),
        ({"kind": "exe"}, "kind"),
        ({"codec": "lz4"}, "codec"),
        ({"offset": -1}, "offset"),
        ({"offset": "0"}, "offset"),
        ({"offset": True}, "offset"),
        ({"length": 10**30}, "length"),
        ({"raw_length": 2**62}, "raw_length"),
        ({"length": 3}, "codec none"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_hostile_trailer_entries_are_rejected(override: dict, message: str) -> None:
    area = b"abcd"
    pack = pack_from_documents(area, [entry_json(area, 0, override)])
    with pytest.raises(InvalidDocument, match=message):
        parse_trailer(pack)


def test_missing_entry_field_is_rejected() -> None:
    document = entry_json(b"abcd", 0)
    del document["raw_length"]
    with pytest.raises(InvalidDocument, match="missing raw_length"):
        PackEntry.from_json(document)


def test_wrong_trailer_version_is_rejected() -> None:
    pack = pack_from_documents(b"abcd", [entry_json(b"abcd", 0)], version=2)
    with pytest.raises(InvalidDocument, match="version"):
        parse_trailer(pack)


def test_entry_json_round_trip_and_decimal_numbers_from_dynamodb() -> None:
    from decimal import Decimal

    entry = PackEntry(blob_hash(b"x"), "data", "zstd", 10, 20, 30)
    assert PackEntry.from_json(entry.to_json()) == entry
    as_dynamodb = {
        **entry.to_json(),
        "offset": Decimal(10),
        "length": Decimal("20"),
        "raw_length": Decimal(30),
    }
    assert PackEntry.from_json(as_dynamodb) == entry
    with pytest.raises(InvalidDocument):
        PackEntry.from_json({**entry.to_json(), "offset": Decimal("10.5")})


def test_open_blob_rejects_wrong_length_and_wrong_content() -> None:
    entry = PackEntry(blob_hash(b"good"), "data", "none", 0, 4, 4)
    assert open_blob(entry, b"good") == b"good"
    with pytest.raises(CorruptBlob, match="stored bytes"):
        open_blob(entry, b"goo")
    with pytest.raises(CorruptBlob, match="hashes to"):
        open_blob(entry, b"evil")


def test_zstd_bomb_claiming_a_small_raw_length_is_refused_without_inflating() -> None:
    huge = compress_zstd(b"\0" * (64 * 1024 * 1024))
    entry = PackEntry(blob_hash(b"\0" * 10), "data", "zstd", 0, len(huge), 10)
    with pytest.raises(CorruptBlob, match="expected 10"):
        open_blob(entry, huge)


def test_limits_are_consistent() -> None:
    assert MAX_PACK_BYTES == 128 * 1024 * 1024
    writer = PackWriter()
    assert writer.has_room(16 * 1024 * 1024)


def test_trailer_listing_no_blobs_is_rejected() -> None:
    with pytest.raises(InvalidDocument, match="no blobs"):
        parse_trailer(pack_from_documents(b"", []))


def test_check_layout_validates_claimed_entries_against_a_pack_size() -> None:
    entries = [
        PackEntry(blob_hash(b"a"), "data", "none", 0, 1, 1),
        PackEntry(blob_hash(b"b"), "data", "none", 1, 1, 1),
    ]
    check_layout(entries, 2)
    with pytest.raises(InvalidDocument, match="past the blob area"):
        check_layout(entries, 1)
    with pytest.raises(InvalidDocument, match="overlaps"):
        check_layout([*entries, PackEntry(blob_hash(b"c"), "data", "none", 0, 2, 2)], 10)


def test_a_spooled_pack_is_byte_for_byte_the_in_memory_pack(tmp_path):
    blobs = [(blob_hash(b"x" * n), b"x" * n) for n in (1, 100, 5000)] + [(blob_hash(b"tree"), b"tree")]
    in_memory, spooled = PackWriter(), PackWriter(spool=(tmp_path / "spool").open("w+b"))
    for writer in (in_memory, spooled):
        for digest, plaintext in blobs:
            writer.add(digest, "tree" if plaintext == b"tree" else "data", plaintext)
    expected, expected_entries = in_memory.finish()

    sha256, size, entries = spooled.finish_spool()

    assert (tmp_path / "spool").read_bytes() == expected
    assert (sha256, size, entries) == (hashlib.sha256(expected).hexdigest(), len(expected), expected_entries)
    with pytest.raises(ValueError, match="finish_spool"):
        PackWriter(spool=(tmp_path / "other").open("w+b")).finish()


@pytest.mark.parametrize(("first_read", "reads"), [(1 << 20, 1), (20, 2), (0, 2)])
def test_a_trailer_is_read_from_the_end_with_one_read_or_two(first_read: int, reads: int) -> None:
    writer = PackWriter()
    for n in range(30):
        writer.add(blob_hash(b"%d" % n), "data", os.urandom(100 + n))
    pack, entries = writer.finish()
    asked: list[tuple[int, int]] = []

    def read_range(start: int, length: int) -> bytes:
        asked.append((start, length))
        return pack[start : start + length]

    trailer = read_trailer_bytes(read_range, len(pack), first_read)

    assert parse_trailer_bytes(trailer, len(pack)) == entries
    assert len(asked) == reads and sum(length for _, length in asked) <= max(len(pack), first_read)
    with pytest.raises(InvalidDocument, match="too short"):
        read_trailer_bytes(read_range, TRAILER_TAIL_BYTES, first_read)
