"""Commit requests, manifests and stream indexes: round trips and strict validation."""

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.manifest import (
    MANIFEST_ID_RE,
    MAX_COMMIT_LOCATIONS,
    MAX_COMMIT_PACKS,
    MAX_WARNINGS,
    BlobLocation,
    CommitRequest,
    build_manifest,
    decode_manifest,
    decode_stream_index,
    encode_manifest,
    encode_stream_index,
    new_manifest_id,
    parse_commit_request,
    referenced_blobs,
)

ROOT = blob_hash(b"root tree")
STREAM = blob_hash(b"stream index")
NOW = datetime(2026, 11, 21, 23, 50, 0, tzinfo=timezone.utc)


def snapshot_json(**overrides: object) -> dict:
    document = {
        "name": "postgres",
        "description": "pg_dumpall",
        "restore_through": "psql -f -",
        "size": 12345,
        "content": STREAM,
        "exit_status": 0,
    }
    document.update(overrides)
    return document


def commit_body(**overrides: object) -> dict:
    body = {
        "parent": None,
        "root": ROOT,
        "snapshots": [snapshot_json()],
        "warnings": ["/var/tmp/x: permission denied"],
        "stats": {"files": 10, "bytes": 2048, "seconds": 1.25, "by_kind": {"new": 3}},
        "days_retained": None,
    }
    body.update(overrides)
    return body


def test_new_manifest_ids_sort_by_time() -> None:
    earlier = new_manifest_id(NOW, "ffffffff")
    later = new_manifest_id(NOW + timedelta(seconds=1), "00000000")
    assert earlier == "20261121T235000Z-ffffffff"
    assert earlier < later
    assert MANIFEST_ID_RE.match(new_manifest_id(NOW))
    assert new_manifest_id(NOW) != new_manifest_id(NOW)  # random suffix


def test_manifest_id_uses_utc_whatever_the_zone() -> None:
    elsewhere = NOW.astimezone(timezone(timedelta(hours=5)))
    assert new_manifest_id(elsewhere, "01234567") == "20261121T235000Z-01234567"


def test_manifest_id_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="timezone"):
        new_manifest_id(datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="rand"):
        new_manifest_id(NOW, "XYZ")


def test_commit_request_parses_and_lists_referenced_blobs() -> None:
    request = parse_commit_request(commit_body(parent="20261120T000000Z-0123abcd", days_retained=90))
    assert request.parent == "20261120T000000Z-0123abcd"
    assert request.days_retained == 90
    assert request.snapshots[0].name == "postgres"
    assert referenced_blobs(request) == {ROOT, STREAM}


def test_optional_commit_fields_default() -> None:
    request = parse_commit_request({"parent": None, "root": None, "snapshots": []})
    assert request == CommitRequest(parent=None, root=None, snapshots=())
    assert referenced_blobs(request) == set()


def test_failed_snapshot_without_content_is_allowed() -> None:
    body = commit_body(
        snapshots=[snapshot_json(content=None, exit_status=2, error="pg_dump: connection refused")]
    )
    snapshot = parse_commit_request(body).snapshots[0]
    assert (snapshot.content, snapshot.exit_status, snapshot.error) == (
        None,
        2,
        "pg_dump: connection refused",
    )
    assert referenced_blobs(parse_commit_request(body)) == {ROOT}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parent": "latest"}, "parent"),
        ({"parent": 5}, "parent"),
        ({"root": "abc"}, "root"),
        ({"snapshots": {}}, "snapshots"),
        ({"warnings": "one"}, "warnings"),
        ({"warnings": [1]}, r"warnings\[0\]"),
        ({"warnings": ["x"] * (MAX_WARNINGS + 1)}, "warnings"),
        ({"warnings": ["é" * 1000] * 400}, "more than 2097152"),  # each é is 6 bytes escaped
        ({"snapshots": [snapshot_json(name=f"s{i}", description="d" * 60_000) for i in range(40)]}, "bytes"),
        ({"stats": []}, "stats"),
        ({"stats": {"x": {"a": {"b": {"c": {"d": 1}}}}}}, "deeper"),
        ({"stats": {"x": float("nan")}}, "stats"),
        ({"stats": {"blob": "x" * 70_000}}, "larger"),
        ({"stats": {"when": datetime(2026, 1, 1)}}, "plain JSON"),
        ({"stats": {"files": 2**64}}, "stats.files"),
        ({"days_retained": -1}, "days_retained"),
        ({"days_retained": "30"}, "days_retained"),
        ({"days_retained": 10**9}, "days_retained"),
        ({"host": "someone-else"}, "unknown field"),
        ({"snapshots": [snapshot_json(name="")]}, "empty"),
        ({"snapshots": [snapshot_json(name="../x")]}, "'/'"),
        ({"snapshots": [snapshot_json(size=-5)]}, "size"),
        ({"snapshots": [snapshot_json(content="zz")]}, "SHA-256"),
        ({"snapshots": [snapshot_json(exit_status=True)]}, "exit_status"),
        ({"snapshots": [snapshot_json(), snapshot_json()]}, "same name"),
    ],
)
def test_bad_commit_requests_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parse_commit_request(commit_body(**overrides))


PACK = blob_hash(b"a pack")


def location_json(**overrides: object) -> dict:
    return {"pack_id": PACK, "offset": 10, "length": 20, "codec": "zstd", "raw_length": 50, **overrides}


def test_commit_request_carries_packs_and_locations() -> None:
    other = blob_hash(b"another pack")
    request = parse_commit_request(commit_body(packs=[PACK, other, PACK], locations={ROOT: location_json()}))
    assert request.packs == (PACK, other)  # a repeated pack is listed once, first place kept
    assert request.locations == {ROOT: BlobLocation(PACK, 10, 20, "zstd", 50)}
    assert request.locations[ROOT].to_json() == location_json()
    entry = request.locations[ROOT].entry(ROOT, "tree")
    assert (entry.hash, entry.kind, entry.offset, entry.length) == (ROOT, "tree", 10, 20)


def test_packs_and_locations_may_be_left_out_or_empty() -> None:
    request = parse_commit_request(commit_body(packs=[], locations={}))
    assert (request.packs, dict(request.locations)) == ((), {})
    assert parse_commit_request(commit_body()).packs == ()


def test_the_limits_of_packs_and_locations() -> None:
    assert len(parse_commit_request(commit_body(packs=[PACK] * MAX_COMMIT_PACKS)).packs) == 1
    too_many_packs = [blob_hash(str(n).encode()) for n in range(MAX_COMMIT_PACKS + 1)]
    with pytest.raises(InvalidDocument, match=f"packs has {MAX_COMMIT_PACKS + 1} items"):
        parse_commit_request(commit_body(packs=too_many_packs))
    too_many_locations = {
        blob_hash(str(n).encode()): location_json() for n in range(MAX_COMMIT_LOCATIONS + 1)
    }
    with pytest.raises(InvalidDocument, match=f"more than {MAX_COMMIT_LOCATIONS}"):
        parse_commit_request(commit_body(locations=too_many_locations))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"packs": PACK}, "packs must be a list"),
        ({"packs": [PACK, "nothex"]}, r"packs\[1\] must be a SHA-256"),
        ({"locations": []}, "locations must be an object"),
        ({"locations": {"nothex": location_json()}}, "a locations key must be a SHA-256"),
        ({"locations": {ROOT: "here"}}, f"locations\\[{ROOT}\\] must be a JSON object"),
        ({"locations": {ROOT: location_json(kind="tree")}}, "unknown field"),
        ({"locations": {ROOT: {"pack_id": PACK}}}, "missing codec, length, offset, raw_length"),
        ({"locations": {ROOT: location_json(pack_id="p")}}, "pack_id must be a SHA-256"),
        ({"locations": {ROOT: location_json(offset=-1)}}, "offset must be between"),
        ({"locations": {ROOT: location_json(length=True)}}, "length must be an integer"),
        ({"locations": {ROOT: location_json(codec="brotli")}}, "codec must be one of"),
        ({"locations": {ROOT: location_json(codec="none")}}, "codec none but length 20 != raw_length 50"),
    ],
)
def test_bad_packs_and_locations_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        parse_commit_request(commit_body(**overrides))


def test_missing_required_commit_field_is_named() -> None:
    body = commit_body()
    del body["root"]
    with pytest.raises(InvalidDocument, match="missing root"):
        parse_commit_request(body)
    with pytest.raises(InvalidDocument, match="object"):
        parse_commit_request([body])


def make_manifest(**overrides: object) -> bytes:
    request = parse_commit_request(commit_body(parent="20261120T000000Z-0123abcd"))
    manifest = build_manifest(
        request,
        manifest_id="20261121T235000Z-89abcdef",
        host="web-1.example",
        created=NOW,
        retain_until=NOW + timedelta(days=30),
    )
    return encode_manifest(manifest)


def test_manifest_round_trip_is_canonical() -> None:
    encoded = make_manifest()
    manifest = decode_manifest(encoded)
    assert manifest.host == "web-1.example"
    assert manifest.created == NOW
    assert manifest.retain_until == NOW + timedelta(days=30)
    assert manifest.stats["seconds"] == 1.25
    assert encode_manifest(manifest) == encoded
    assert json.loads(encoded)["created"] == "2026-11-21T23:50:00Z"
    assert referenced_blobs(manifest) == {ROOT, STREAM}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", 2, "version"),
        ("id", "today", "manifest id"),
        ("host", "../other", "host"),
        ("host", "-leading-dash", "host"),
        ("parent", "nope", "parent"),
        ("created", "2026-11-21 23:50:00", "created"),
        ("retain_until", 1764000000, "retain_until"),
        ("retain_until", "2026-11-20T00:00:00Z", "before its creation"),
        ("root", ROOT.upper(), "root"),
        ("snapshots", None, "snapshots"),
    ],
)
def test_tampered_manifests_are_rejected(field: str, value: object, message: str) -> None:
    document = json.loads(make_manifest())
    document[field] = value
    with pytest.raises(InvalidDocument, match=message):
        decode_manifest(json.dumps(document).encode())


def test_manifest_missing_a_field_is_rejected() -> None:
    document = json.loads(make_manifest())
    del document["warnings"]
    with pytest.raises(InvalidDocument, match="missing warnings"):
        decode_manifest(json.dumps(document).encode())


def test_build_manifest_refuses_bad_server_fields() -> None:
    request = parse_commit_request(commit_body())
    with pytest.raises(ValueError, match="host"):
        build_manifest(
            request, manifest_id="20261121T235000Z-89abcdef", host="a/b", created=NOW, retain_until=NOW
        )
    with pytest.raises(ValueError, match="manifest id"):
        build_manifest(request, manifest_id="x", host="web1", created=NOW, retain_until=NOW)


@given(st.lists(st.binary(max_size=16).map(blob_hash), max_size=50))
def test_stream_index_round_trips(chunks: list[str]) -> None:
    encoded = encode_stream_index(chunks)
    assert decode_stream_index(encoded) == chunks
    assert encoded == encode_stream_index(decode_stream_index(encoded))


def test_stream_index_keeps_order_and_repeats() -> None:
    chunks = [STREAM, ROOT, STREAM]
    assert decode_stream_index(encode_stream_index(chunks)) == chunks


@pytest.mark.parametrize(
    "data",
    [
        b'{"version":1,"chunks":["nothex"]}',
        b'{"version":1,"chunks":{}}',
        b'{"version":2,"chunks":[]}',
        b'{"chunks":[]}',
        b'{"version":1,"chunks":[],"extra":0}',
        b"null",
    ],
)
def test_bad_stream_indexes_are_rejected(data: bytes) -> None:
    with pytest.raises(InvalidDocument):
        decode_stream_index(data)


def test_encode_stream_index_refuses_bad_hashes() -> None:
    with pytest.raises(InvalidDocument, match="chunk 1"):
        encode_stream_index([STREAM, "bad"])
