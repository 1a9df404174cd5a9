"""Trees: canonical encoding, byte-exact names, strict rejection of hostile documents."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import blob_hash
from sysbackup_domain.tree import Tree, TreeEntry, decode_tree, encode_tree, name_bytes, name_from_bytes

HASH_A = blob_hash(b"a")
HASH_B = blob_hash(b"b")

name_bytes_strategy = st.binary(min_size=1, max_size=40).filter(
    lambda raw: b"/" not in raw and b"\0" not in raw and raw not in (b".", b"..")
)
hash_strategy = st.binary(max_size=8).map(blob_hash)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
owner = st.one_of(st.none(), st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=20))


@st.composite
def entries(draw: st.DrawFn, name: bytes) -> TreeEntry:
    entry_type = draw(st.sampled_from(["file", "dir", "symlink", "fifo", "chardev", "socket"]))
    common = {
        "name": os.fsdecode(name),
        "type": entry_type,
        "mode": draw(st.integers(0, 0o7777)),
        "uid": draw(st.integers(0, 2**32 - 1)),
        "gid": draw(st.integers(0, 2**32 - 1)),
        "user": draw(owner),
        "group": draw(owner),
        "mtime_ns": draw(int64),
        "xattrs": draw(
            st.one_of(
                st.none(),
                st.dictionaries(st.sampled_from(["user.a", "security.selinux"]), st.just("AAE="), min_size=1),
            )
        ),
        "acl": draw(st.one_of(st.none(), st.just("user::rw-\ngroup::r--\nother::r--\n"))),
    }
    if entry_type == "file":
        return TreeEntry(
            **common,
            size=draw(st.integers(0, 2**40)),
            content=tuple(draw(st.lists(hash_strategy, max_size=3))),
            hardlink=draw(st.one_of(st.none(), st.just("2049:1234"))),
        )
    if entry_type == "dir":
        return TreeEntry(**common, subtree=draw(hash_strategy))
    if entry_type == "symlink":
        return TreeEntry(
            **common,
            target=os.fsdecode(draw(st.binary(min_size=1, max_size=30).filter(lambda t: b"\0" not in t))),
        )
    if entry_type == "chardev":
        return TreeEntry(**common, rdev=draw(st.integers(0, 2**64 - 1)))
    return TreeEntry(**common)


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    names = draw(st.lists(name_bytes_strategy, max_size=12, unique=True))
    return Tree(tuple(draw(entries(name)) for name in names))


def file_entry(name: str, **fields: object) -> TreeEntry:
    values: dict = {"mode": 0o644, "uid": 0, "gid": 0, "user": "root", "group": "root", "mtime_ns": 1}
    values.update(fields)
    return TreeEntry(
        name=name, type="file", size=values.pop("size", 1), content=values.pop("content", (HASH_A,)), **values
    )


def encoded_entry(**overrides: object) -> dict:
    document = json.loads(encode_tree(Tree((file_entry("x"),))))["entries"][0]
    document.update(overrides)
    return document


def tree_bytes(*entry_documents: dict, version: object = 1) -> bytes:
    return json.dumps({"version": version, "entries": list(entry_documents)}).encode()


@settings(max_examples=150, deadline=None)
@given(trees())
def test_any_tree_round_trips_byte_exact(tree: Tree) -> None:
    encoded = encode_tree(tree)
    decoded = decode_tree(encoded)

    original = {name_bytes(entry.name): entry for entry in tree.entries}
    assert {name_bytes(entry.name): entry for entry in decoded.entries} == original
    assert encode_tree(decoded) == encoded  # canonical: decoding then encoding changes nothing
    encoded.decode("ascii")  # canonical form is pure ASCII


@settings(max_examples=60, deadline=None)
@given(trees(), st.randoms())
def test_encoding_ignores_input_order(tree: Tree, random: object) -> None:
    shuffled = list(tree.entries)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assert encode_tree(Tree(tuple(shuffled))) == encode_tree(tree)


def test_entries_sort_by_name_bytes_not_by_code_points() -> None:
    # U+FFFD is EF BF BD in UTF-8; the lone byte 0xF0 (surrogateescaped) sorts between; '\udcf0' > '\ufffd'
    # as a str comparison would put it after.
    names = ["\ufffd", os.fsdecode(b"\xf0"), "a"]
    decoded = decode_tree(encode_tree(Tree(tuple(file_entry(name) for name in names))))
    assert [name_bytes(entry.name) for entry in decoded.entries] == sorted(name_bytes(name) for name in names)


def test_names_with_newlines_and_invalid_utf8_survive() -> None:
    raw_names = [b"line\nbreak", b"\xff\xfe", b"caf\xc3\xa9", b" leading space", b"tab\there"]
    tree = Tree(tuple(file_entry(os.fsdecode(raw)) for raw in raw_names))
    decoded = decode_tree(encode_tree(tree))
    assert sorted(os.fsencode(entry.name) for entry in decoded.entries) == sorted(raw_names)


def test_canonical_bytes_are_stable() -> None:
    tree = Tree(
        (
            file_entry("b", content=(HASH_B,)),
            TreeEntry("a", "dir", 0o755, 0, 0, None, None, 5, subtree=HASH_A),
        )
    )
    expected = (
        '{"entries":[{"gid":0,"group":null,"mode":493,"mtime_ns":5,"name":"a","subtree":"' + HASH_A + '",'
        '"type":"dir","uid":0,"user":null},{"content":["' + HASH_B + '"],"gid":0,"group":"root","mode":420,'
        '"mtime_ns":1,"name":"b","size":1,"type":"file","uid":0,"user":"root"}],"version":1}'
    )
    assert encode_tree(tree).decode() == expected


def test_referenced_blobs_collects_contents_and_subtrees() -> None:
    tree = Tree(
        (
            file_entry("f", content=(HASH_A, HASH_B)),
            TreeEntry("d", "dir", 0o755, 0, 0, None, None, 0, subtree=blob_hash(b"child")),
            TreeEntry("l", "symlink", 0o777, 0, 0, None, None, 0, target="f"),
        )
    )
    assert tree.referenced_blobs() == {HASH_A, HASH_B, blob_hash(b"child")}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        (".", "not allowed"),
        ("..", "not allowed"),
        ("a/b", "'/'"),
        ("../etc", "'/'"),
        ("nul\x00", "NUL"),
        ("\ud800", "surrogate"),  # not a surrogateescape byte: no file-system name decodes to it
        ("\udcc3\udca9", "canonical"),  # the bytes of "é", spelled as escapes: a second spelling
        ("x" * 2000, "longer"),
        (7, "string"),
    ],
)
def test_hostile_names_are_rejected(name: object, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        decode_tree(tree_bytes(encoded_entry(name=name)))


def test_duplicate_names_are_rejected_on_decode_and_encode() -> None:
    with pytest.raises(InvalidDocument, match="duplicate"):
        decode_tree(tree_bytes(encoded_entry(), encoded_entry()))
    with pytest.raises(InvalidDocument, match="duplicate"):
        encode_tree(Tree((file_entry("x"), file_entry("x", size=2))))


def test_unsorted_entries_are_rejected() -> None:
    with pytest.raises(InvalidDocument, match="sorted"):
        decode_tree(tree_bytes(encoded_entry(name="b"), encoded_entry(name="a")))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"type": "door"}, "type"),
        ({"mode": 0o10000}, "mode"),
        ({"mode": -1}, "mode"),
        ({"mode": "0644"}, "mode"),
        ({"uid": 2**32}, "uid"),
        ({"gid": True}, "gid"),
        ({"mtime_ns": 2**63}, "mtime_ns"),
        ({"mtime_ns": 1.5}, "integers"),
        ({"size": 10**40}, "size"),
        ({"size": -1}, "size"),
        ({"content": ["not-a-hash"]}, "content"),
        ({"content": "abc"}, "content"),
        ({"content": [HASH_A.upper()]}, "content"),
        ({"subtree": HASH_A}, "cannot have subtree"),
        ({"target": "x"}, "cannot have target"),
        ({"user": 0}, "user"),
        ({"user": "a\x00b"}, "NUL"),
        ({"xattrs": {"user.a": "not base64!"}}, "base64"),
        ({"xattrs": {"user.a": "AAE"}}, "base64"),
        ({"xattrs": ["user.a"]}, "xattrs"),
        ({"hardlink": "1-2"}, "hardlink"),
        ({"acl": 5}, "acl"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_hostile_file_entries_are_rejected(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        decode_tree(tree_bytes(encoded_entry(**overrides)))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {
                "name": "d",
                "type": "dir",
                "mode": 493,
                "uid": 0,
                "gid": 0,
                "user": None,
                "group": None,
                "mtime_ns": 0,
            },
            "needs subtree",
        ),
        (
            {
                "name": "l",
                "type": "symlink",
                "mode": 511,
                "uid": 0,
                "gid": 0,
                "user": None,
                "group": None,
                "mtime_ns": 0,
                "target": "",
            },
            "empty",
        ),
        (
            {
                "name": "c",
                "type": "chardev",
                "mode": 438,
                "uid": 0,
                "gid": 0,
                "user": None,
                "group": None,
                "mtime_ns": 0,
            },
            "needs rdev",
        ),
        (
            {
                "name": "d",
                "type": "dir",
                "mode": 493,
                "uid": 0,
                "gid": 0,
                "user": None,
                "group": None,
                "mtime_ns": 0,
                "subtree": HASH_A,
                "hardlink": "1:2",
            },
            "hard link",
        ),
        (
            {
                "name": "p",
                "type": "fifo",
                "mode": 420,
                "uid": 0,
                "gid": 0,
                "user": None,
                "group": None,
                "mtime_ns": 0,
                "content": [],
            },
            "cannot have content",
        ),
        (
            {
                "name": "f",
                "type": "file",
                "mode": 420,
                "uid": 0,
                "gid": 0,
                "user": None,
                "group": None,
                "mtime_ns": 0,
                "size": 0,
            },
            "needs content",
        ),
    ],
)
def test_type_specific_fields_are_enforced(document: dict, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        decode_tree(tree_bytes(document))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "object"),
        (b'{"version":1}', "missing entries"),
        (b'{"version":2,"entries":[]}', "version"),
        (b'{"version":true,"entries":[]}', "version"),
        (b'{"version":1,"entries":{}}', "list"),
        (b'{"version":1,"version":1,"entries":[]}', "duplicate key"),
        (b'{"version":1,"entries":[NaN]}', "NaN"),
        (b'{"version":1,"entries":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON"),
        (b'{"version":1,"entries":[' + b"9" * 5000 + b"]}", "JSON"),
    ],
)
def test_malformed_documents_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(InvalidDocument, match=message):
        decode_tree(data)


def test_empty_directory_is_a_valid_tree() -> None:
    assert decode_tree(encode_tree(Tree(()))) == Tree(())


def test_name_from_bytes_ignores_the_locale_and_inverts_name_bytes() -> None:
    for raw in (b"caf\xc3\xa9", b"caf\xe9", b"\xff\n", b"plain"):
        assert name_bytes(name_from_bytes(raw)) == raw
    assert name_from_bytes(b"caf\xc3\xa9") == "café"
