"""The decoders' fast paths (tree entries, pack trailer entries) accept nothing the field-by-field checks
refuse, and take the common shapes (else they would not be fast paths)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.packs import PackEntry
from sysbackup_domain.tree import _is_plain_entry, _validate_entry_json_field_by_field

HASH = blob_hash(b"x")

# Values near every bound and of every JSON type, so mutations hit each check's edge.
ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 0o7777, 0o10000, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),
    st.sampled_from(
        ["", ".", "..", "a/b", "a\x00", "x" * 1025, "é", "\udcff", HASH, HASH.upper(), HASH[:-1]]
    ),
    st.sampled_from(["file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket", "door"]),
    st.lists(st.sampled_from([HASH, "nothash", 5]), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), st.sampled_from(["AAAA", "!"]), max_size=2),
    st.floats(allow_nan=False),
)


BY_TYPE: dict[str, dict[str, Any]] = {
    "file": {"size": 3, "content": [HASH]},
    "dir": {"subtree": HASH},
    "symlink": {"target": "../x"},
    "fifo": {},
    "chardev": {"rdev": 5},
    "socket": {},
}


def plain_entry(kind: str) -> dict[str, Any]:
    base = {"name": "a.txt", "mode": 0o644, "uid": 0, "gid": 0, "user": "root", "group": None, "mtime_ns": 1}
    return {**base, "type": kind, **BY_TYPE[kind]}


# Per field, the values that sit on one side or the other of one of its checks.
NEAR_BOUNDS: dict[str, list[Any]] = {
    "name": ["", ".", "..", "a/b", "a\x00", "x" * 1024, "x" * 1025, "é", "\udcff", 5],
    "type": ["door", 1, None, "chardev", "blockdev", "dir"],
    "mode": [-1, 0o7777, 0o10000, True, 1.0],
    "uid": [-1, 2**32 - 1, 2**32, False],
    "gid": [-1, 2**32 - 1, 2**32],
    "user": ["", "é", "a\x00", "x" * 257, 5],
    "group": ["\udcff", "x" * 256, []],
    "mtime_ns": [2**63 - 1, 2**63, -(2**63), -(2**63) - 1, "1"],
    "size": [-1, 2**63, None, True],
    "content": [[], [HASH.upper()], [HASH, 5], HASH, [HASH[:-1] + "g"]],
    "subtree": [HASH.upper(), None, [HASH]],
    "target": ["", "x" * 4097, "é" * 2049, "a\x00", 5],
    "rdev": [-1, 2**64, None],
    "xattrs": [{}, {"user.a": "AAAA"}],
    "acl": ["u::rw-"],
    "hardlink": ["1:2"],
    "extra": [1],
}


@st.composite
def mutated_entries(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    entry = plain_entry(kind)
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(sorted(NEAR_BOUNDS)))
        if draw(st.integers(0, 4)):
            entry[field] = draw(st.one_of(st.sampled_from(NEAR_BOUNDS[field]), ODD_VALUES))
        else:
            entry.pop(field, None)
    return entry


@pytest.mark.parametrize("kind", sorted(BY_TYPE))
@given(data=st.data())
@settings(max_examples=600, deadline=None)
def test_a_tree_entry_the_fast_path_takes_passes_every_check(kind: str, data: st.DataObject) -> None:
    entry = data.draw(mutated_entries(kind))
    if _is_plain_entry(entry):
        _validate_entry_json_field_by_field(entry)  # raises if the fast path let a bad entry through


@pytest.mark.parametrize("kind", sorted(BY_TYPE))
def test_common_tree_entries_take_the_fast_path(kind: str) -> None:
    assert _is_plain_entry(plain_entry(kind))


def test_entries_with_xattrs_or_non_ascii_names_take_the_full_checks() -> None:
    entry = {"name": "é", "type": "fifo", "mode": 0, "uid": 0, "gid": 0, "user": None, "group": None}
    assert not _is_plain_entry({**entry, "mtime_ns": 1})
    assert not _is_plain_entry({**entry, "name": "a", "mtime_ns": 1, "xattrs": {"user.a": "AAAA"}})


PACK_ENTRY = {"hash": HASH, "kind": "data", "codec": "zstd", "offset": 0, "length": 10, "raw_length": 20}
PACK_FIELDS = [*PACK_ENTRY, "extra"]


@st.composite
def mutated_pack_entries(draw: st.DrawFn) -> dict[str, Any]:
    entry = dict(PACK_ENTRY)
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(PACK_FIELDS))
        if draw(st.booleans()):
            entry[field] = draw(
                st.one_of(ODD_VALUES, st.sampled_from(["none", "gzip", "tree", 10, 128 << 20]))
            )
        else:
            entry.pop(field, None)
    return entry


def _outcome(parse: Any, document: dict[str, Any]) -> PackEntry | str:
    try:
        return parse(document)
    except InvalidDocument:
        return "refused"


@given(mutated_pack_entries())
@settings(max_examples=3000, deadline=None)
def test_a_pack_entry_parses_the_same_through_the_fast_path_and_field_by_field(entry: dict[str, Any]) -> None:
    assert _outcome(PackEntry.from_json, entry) == _outcome(PackEntry._from_json_field_by_field, entry)
