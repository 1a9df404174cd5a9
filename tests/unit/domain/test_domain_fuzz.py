"""Hostile input of any shape gets InvalidDocument (or CorruptBlob), never another exception."""

import contextlib
import json
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sysbackup_domain.compression import compress_zstd
from sysbackup_domain.errors import CorruptBlob, InvalidDocument
from sysbackup_domain.manifest import decode_manifest, decode_stream_index, parse_commit_request
from sysbackup_domain.packs import MAGIC, PackEntry, parse_trailer, verify_pack
from sysbackup_domain.tree import decode_tree

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)

# Documents that look almost right are likelier to reach deep validation than random noise.
tree_like = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 2, True, "1"]), "entries": st.lists(json_values, max_size=3)}
)
entry_like = st.fixed_dictionaries(
    {
        key: json_values
        for key in ("name", "type", "mode", "uid", "gid", "user", "group", "mtime_ns", "size", "content")
    }
)
trailer_like = st.fixed_dictionaries(
    {
        "version": st.just(1),
        "blobs": st.lists(
            st.dictionaries(st.sampled_from(list(PackEntry.__annotations__)), json_values), max_size=3
        ),
    }
)
EXPECTED = (InvalidDocument, CorruptBlob)
fuzz = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def refused_or_accepted(function: Callable[..., object], *args: object) -> None:
    """Accepting is fine and so is refusing with our errors; any other exception fails the test."""
    with contextlib.suppress(*EXPECTED):
        function(*args)


def as_json(value: object) -> bytes:
    return json.dumps(value).encode()


@fuzz
@given(st.binary(max_size=200) | json_values.map(as_json) | tree_like.map(as_json))
def test_decode_tree_only_raises_invalid_document(data: bytes) -> None:
    refused_or_accepted(decode_tree, data)


@fuzz
@given(st.lists(entry_like, min_size=1, max_size=2))
def test_decode_tree_entries_only_raise_invalid_document(entries: list) -> None:
    refused_or_accepted(decode_tree, as_json({"version": 1, "entries": entries}))


@fuzz
@given(json_values)
def test_parse_commit_request_only_raises_invalid_document(body: object) -> None:
    refused_or_accepted(parse_commit_request, body)
    refused_or_accepted(parse_commit_request, {"parent": None, "root": None, "snapshots": [body]})
    refused_or_accepted(parse_commit_request, {"parent": None, "root": None, "snapshots": [], "stats": body})


@fuzz
@given(st.binary(max_size=200) | json_values.map(as_json))
def test_decode_manifest_and_stream_index_only_raise_invalid_document(data: bytes) -> None:
    refused_or_accepted(decode_manifest, data)
    refused_or_accepted(decode_stream_index, data)


@fuzz
@given(st.binary(max_size=64), trailer_like | json_values)
def test_parse_trailer_only_raises_invalid_document(blob_area: bytes, document: object) -> None:
    trailer = compress_zstd(as_json(document))
    pack = blob_area + trailer + struct.pack(">I", len(trailer)) + MAGIC
    refused_or_accepted(parse_trailer, pack)
    refused_or_accepted(verify_pack, pack)


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes_are_never_a_pack(data: bytes) -> None:
    refused_or_accepted(verify_pack, data + MAGIC)
    refused_or_accepted(verify_pack, data)
