"""Directory trees: one canonical JSON blob per directory, forming a Merkle tree.

Canonical encoding (sorted keys, no spaces, ASCII with \\u escapes, entries sorted by name bytes,
optional fields omitted when unset) makes the same directory always the same bytes, hence the same
hash: an unchanged subtree costs nothing to send, check or commit again.

Names are file-system bytes decoded as UTF-8 with surrogateescape (`name_from_bytes`; what `os.fsdecode`
does under a UTF-8 locale), so any byte name, including newlines and non-UTF-8, round-trips. Decoding
validates untrusted input strictly: a restore must never be steered outside its target directory by a
name like "../x".
"""

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sysbackup_domain import canonical
from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import is_blob_hash

ENTRY_TYPES = ("file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket")

# Generous bounds: Linux allows 255-byte names and 4096-byte paths; beyond these an entry is hostile.
MAX_NAME_BYTES = 1024
MAX_TARGET_BYTES = 4096
MAX_OWNER_CHARS = 256
MAX_ACL_CHARS = 64 * 1024
MAX_XATTRS = 1024
MAX_XATTR_VALUE_CHARS = 1024 * 1024  # base64 of a value up to 768 KiB (ext4 caps values at a block)
MAX_CONTENT_BLOBS = 10_000_000
MAX_TREE_ENTRIES = 10_000_000

_MAX_MODE = 0o7777  # permission bits incl. setuid, setgid, sticky; the type is in `type`
_MAX_ID = 2**32 - 1
_MAX_RDEV = 2**64 - 1
_HARDLINK_RE = re.compile(r"[0-9]{1,20}:[0-9]{1,20}")

_REQUIRED_FIELDS = ("name", "type", "mode", "uid", "gid", "user", "group", "mtime_ns")
_OPTIONAL_FIELDS = ("size", "content", "subtree", "target", "rdev", "xattrs", "acl", "hardlink")
_REQUIRED_KEYS = frozenset(_REQUIRED_FIELDS)
# Which optional fields each type requires and allows (xattrs, acl and hardlink are checked apart).
_TYPE_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "file": (frozenset({"size", "content"}), frozenset({"size", "content"})),
    "dir": (frozenset({"subtree"}), frozenset({"subtree"})),
    "symlink": (frozenset({"target"}), frozenset({"target"})),
    "fifo": (frozenset(), frozenset()),
    "chardev": (frozenset({"rdev"}), frozenset({"rdev"})),
    "blockdev": (frozenset({"rdev"}), frozenset({"rdev"})),
    "socket": (frozenset(), frozenset()),
}


@dataclass(frozen=True)
class TreeEntry:
    name: str
    type: str
    mode: int
    uid: int
    gid: int
    user: str | None
    group: str | None
    mtime_ns: int
    size: int | None = None
    content: tuple[str, ...] = ()
    subtree: str | None = None
    target: str | None = None
    rdev: int | None = None
    xattrs: Mapping[str, str] | None = None  # name -> base64 value
    acl: str | None = None
    hardlink: str | None = None  # "<dev>:<ino>" when nlink > 1, to relink on restore


@dataclass(frozen=True)
class Tree:
    entries: tuple[TreeEntry, ...]

    def referenced_blobs(self) -> set[str]:
        """Every blob this directory needs directly: file contents and child trees."""
        hashes: set[str] = set()
        for entry in self.entries:
            hashes.update(entry.content)
            if entry.subtree is not None:
                hashes.add(entry.subtree)
        return hashes


def name_bytes(name: str) -> bytes:
    """The file-system bytes of a decoded name (UTF-8 with surrogateescape, as `os.fsencode` on Linux)."""
    return name.encode("utf-8", "surrogateescape")


def name_from_bytes(raw: bytes) -> str:
    """The tree spelling of file-system bytes (names, symlink targets, xattr names).

    Always UTF-8 with surrogateescape, unlike `os.fsdecode`, which follows the locale: a host running
    under a Latin-1 locale must still write trees that any restorer reads back to the same bytes.
    """
    return raw.decode("utf-8", "surrogateescape")


def encode_tree(tree: Tree) -> bytes:
    """Canonical JSON of a tree: same entries, same bytes. InvalidDocument if an entry is malformed."""
    entries = sorted(tree.entries, key=lambda entry: name_bytes(_check_name(entry.name)))
    documents = [_entry_to_json(entry) for entry in entries]
    for document in documents:
        _validate_entry_json(document)
    _check_sorted_unique(entries)
    return canonical.dumps({"version": 1, "entries": documents})


def decode_tree(data: bytes | bytearray | memoryview) -> Tree:
    """Parse and strictly validate an untrusted tree blob. InvalidDocument on anything off."""
    document = canonical.require_object(canonical.loads(data, "tree"), "tree", ("version", "entries"))
    canonical.require_version(document, "tree")
    items = canonical.require_list(document["entries"], "tree entries", max_items=MAX_TREE_ENTRIES)
    entries = tuple(_entry_from_json(_validate_entry_json(item)) for item in items)
    _check_sorted_unique(entries)
    return Tree(entries)


def _entry_to_json(entry: TreeEntry) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": entry.name,
        "type": entry.type,
        "mode": entry.mode,
        "uid": entry.uid,
        "gid": entry.gid,
        "user": entry.user,
        "group": entry.group,
        "mtime_ns": entry.mtime_ns,
    }
    if entry.type == "file":
        document["content"] = list(entry.content)
    elif entry.content:
        document["content"] = list(entry.content)  # invalid: rejected by validation with a clear message
    optional = {
        "size": entry.size,
        "subtree": entry.subtree,
        "target": entry.target,
        "rdev": entry.rdev,
        "xattrs": dict(entry.xattrs) if entry.xattrs else None,
        "acl": entry.acl,
        "hardlink": entry.hardlink,
    }
    document.update({key: value for key, value in optional.items() if value is not None})
    return document


def _entry_from_json(document: dict[str, Any]) -> TreeEntry:
    return TreeEntry(
        name=document["name"],
        type=document["type"],
        mode=document["mode"],
        uid=document["uid"],
        gid=document["gid"],
        user=document["user"],
        group=document["group"],
        mtime_ns=document["mtime_ns"],
        size=document.get("size"),
        content=tuple(document.get("content", ())),
        subtree=document.get("subtree"),
        target=document.get("target"),
        rdev=document.get("rdev"),
        xattrs=document.get("xattrs") or None,
        acl=document.get("acl"),
        hardlink=document.get("hardlink"),
    )


def _validate_entry_json(item: object) -> dict[str, Any]:
    """Check one entry's JSON form; used on both encode (host bugs) and decode (hostile input)."""
    if _is_plain_entry(item):
        return item  # type: ignore[return-value]  # _is_plain_entry checked it is a dict
    return _validate_entry_json_field_by_field(item)


# What _is_plain_entry accepts: no xattrs, ACL or hard link (those take the field-by-field path).
_TYPED_KEYS = frozenset({"size", "content", "subtree", "target", "rdev"})
_PLAIN_KEYS = _REQUIRED_KEYS | _TYPED_KEYS


def _is_plain_entry(item: object) -> bool:
    """True for an entry of the common shape (ASCII name and owners, no xattrs, ACL or hard link) that
    `_validate_entry_json_field_by_field` accepts, checked without building its messages; False means
    "take the field-by-field path", which then accepts it or names its problem. A commit decodes every
    new tree of a run (100k entries for a first backup of 100k files); this is most of its time.
    tests/unit/domain/test_domain_fast_paths.py holds it to a subset of the full checks."""
    if type(item) is not dict:
        return False
    keys = item.keys()
    if not (keys >= _REQUIRED_KEYS and keys <= _PLAIN_KEYS):
        return False
    name, entry_type = item["name"], item["type"]
    mode, uid, gid, mtime_ns = item["mode"], item["uid"], item["gid"], item["mtime_ns"]
    if not (
        type(name) is str
        and name.isascii()
        and 0 < len(name) <= MAX_NAME_BYTES
        and name not in (".", "..")
        and "/" not in name
        and "\x00" not in name
        and type(entry_type) is str
        and entry_type in _TYPE_FIELDS
        and type(mode) is int
        and 0 <= mode <= _MAX_MODE
        and type(uid) is int
        and 0 <= uid <= _MAX_ID
        and type(gid) is int
        and 0 <= gid <= _MAX_ID
        and type(mtime_ns) is int
        and canonical.INT64_MIN <= mtime_ns <= canonical.INT64_MAX
        and _is_plain_owner(item["user"])
        and _is_plain_owner(item["group"])
        and keys & _TYPED_KEYS == _TYPE_FIELDS[entry_type][0]  # what the type requires, nothing else
    ):
        return False
    if entry_type == "file":
        size, content = item["size"], item["content"]
        return (
            type(size) is int
            and 0 <= size <= canonical.INT64_MAX
            and type(content) is list
            and len(content) <= MAX_CONTENT_BLOBS
            and all(map(is_blob_hash, content))
        )
    if entry_type == "dir":
        return is_blob_hash(item["subtree"])
    if entry_type == "symlink":
        target = item["target"]
        return (
            type(target) is str
            and target.isascii()
            and 0 < len(target) <= MAX_TARGET_BYTES
            and "\x00" not in target
        )
    if "rdev" in item:
        rdev = item["rdev"]
        return type(rdev) is int and 0 <= rdev <= _MAX_RDEV
    return True


def _is_plain_owner(owner: object) -> bool:
    return owner is None or (
        type(owner) is str and owner.isascii() and len(owner) <= MAX_OWNER_CHARS and "\x00" not in owner
    )


def _validate_entry_json_field_by_field(item: object) -> dict[str, Any]:
    document = canonical.require_object(item, "tree entry", _REQUIRED_FIELDS, _OPTIONAL_FIELDS)
    name = _check_name(document["name"])
    where = f"tree entry {name!r:.120}"
    entry_type = document["type"]
    if entry_type not in ENTRY_TYPES:
        raise InvalidDocument(
            f"{where}: type must be one of {', '.join(ENTRY_TYPES)}, got {entry_type!r:.40}"
        )
    canonical.require_int(document["mode"], f"{where} mode", 0, _MAX_MODE)
    canonical.require_int(document["uid"], f"{where} uid", 0, _MAX_ID)
    canonical.require_int(document["gid"], f"{where} gid", 0, _MAX_ID)
    canonical.require_int(document["mtime_ns"], f"{where} mtime_ns")
    for owner_field in ("user", "group"):
        if document[owner_field] is not None:
            _check_text(document[owner_field], f"{where} {owner_field}", MAX_OWNER_CHARS)
    _check_type_fields(document, entry_type, where)
    _check_common_optional(document, entry_type, where)
    return document


def _check_type_fields(document: dict[str, Any], entry_type: str, where: str) -> None:
    required, allowed = _TYPE_FIELDS[entry_type]
    present = {key for key in ("size", "content", "subtree", "target", "rdev") if key in document}
    if required - present:
        raise InvalidDocument(f"{where}: a {entry_type} needs {', '.join(sorted(required - present))}")
    if present - allowed:
        raise InvalidDocument(f"{where}: a {entry_type} cannot have {', '.join(sorted(present - allowed))}")
    if "size" in document:
        canonical.require_int(document["size"], f"{where} size", 0)
    if "content" in document:
        hashes = canonical.require_list(document["content"], f"{where} content", max_items=MAX_CONTENT_BLOBS)
        for index, value in enumerate(hashes):
            canonical.require_hash(value, f"{where} content[{index}]")
    if "subtree" in document:
        canonical.require_hash(document["subtree"], f"{where} subtree")
    if "target" in document:
        target = _check_text(document["target"], f"{where} target", MAX_TARGET_BYTES)
        if not target:
            raise InvalidDocument(f"{where}: symlink target is empty")
        if len(name_bytes(target)) > MAX_TARGET_BYTES:
            raise InvalidDocument(f"{where}: symlink target is longer than {MAX_TARGET_BYTES} bytes")
    if "rdev" in document:
        canonical.require_int(document["rdev"], f"{where} rdev", 0, _MAX_RDEV)


def _check_common_optional(document: dict[str, Any], entry_type: str, where: str) -> None:
    if "acl" in document:
        _check_text(document["acl"], f"{where} acl", MAX_ACL_CHARS)
    if "hardlink" in document:
        hardlink = document["hardlink"]
        if entry_type == "dir":
            raise InvalidDocument(f"{where}: a directory cannot be a hard link")
        if not isinstance(hardlink, str) or _HARDLINK_RE.fullmatch(hardlink) is None:
            raise InvalidDocument(f"{where} hardlink must look like '<dev>:<ino>', got {hardlink!r:.60}")
    if "xattrs" in document:
        _check_xattrs(document["xattrs"], where)


def _check_xattrs(xattrs: object, where: str) -> None:
    if not isinstance(xattrs, dict):
        raise InvalidDocument(f"{where} xattrs must be an object, got {type(xattrs).__name__}")
    if len(xattrs) > MAX_XATTRS:
        raise InvalidDocument(f"{where} has more than {MAX_XATTRS} xattrs")
    for key, value in xattrs.items():
        _check_text(key, f"{where} xattr name", MAX_NAME_BYTES)
        if not key:
            raise InvalidDocument(f"{where}: empty xattr name")
        encoded = _check_text(value, f"{where} xattr {key!r:.60}", MAX_XATTR_VALUE_CHARS)
        try:
            canonical_value = base64.b64encode(base64.b64decode(encoded, validate=True)).decode("ascii")
        except (binascii.Error, ValueError):
            raise InvalidDocument(f"{where} xattr {key!r:.60} is not base64") from None
        if canonical_value != encoded:
            raise InvalidDocument(f"{where} xattr {key!r:.60} is not canonical base64")


def _check_text(value: object, where: str, max_chars: int) -> str:
    text = canonical.require_str(value, where, max_chars=max_chars)
    if "\x00" in text:
        raise InvalidDocument(f"{where} contains NUL")
    if not text.isascii():  # ASCII is always the one decoding of its bytes
        _require_byte_form(text, where)
    return text


def _require_byte_form(text: str, where: str) -> bytes:
    """Text must be the one canonical decoding of some bytes (else two strings name the same file)."""
    try:
        raw = name_bytes(text)
    except UnicodeEncodeError:
        raise InvalidDocument(f"{where} holds a surrogate that no byte string decodes to") from None
    if raw.decode("utf-8", "surrogateescape") != text:
        raise InvalidDocument(f"{where} is not the canonical decoding of its bytes")
    return raw


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidDocument(f"tree entry name must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidDocument("tree entry name is empty")
    if name in (".", ".."):
        raise InvalidDocument(f"tree entry name {name!r} is not allowed")
    if "/" in name or "\x00" in name:
        raise InvalidDocument(f"tree entry name {name!r:.120} contains '/' or NUL")
    if name.isascii():  # ASCII is always the one decoding of its bytes
        byte_length = len(name)
    else:
        byte_length = len(_require_byte_form(name, f"tree entry name {name!r:.120}"))
    if byte_length > MAX_NAME_BYTES:
        raise InvalidDocument(f"tree entry name {name[:60]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return name


def _check_sorted_unique(entries: Sequence[TreeEntry]) -> None:
    previous: bytes | None = None
    for entry in entries:
        current = name_bytes(entry.name)
        if previous is not None and current <= previous:
            problem = "duplicate name" if current == previous else "entries not sorted by name bytes"
            raise InvalidDocument(f"tree: {problem} at {entry.name!r:.120}")
        previous = current
