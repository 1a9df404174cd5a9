"""Canonical JSON and strict field checks for untrusted documents.

Canonical means: sorted keys, no spaces, ASCII only (non-ASCII and lone surrogates as \\u escapes),
so equal documents are equal bytes and hash equal. Parsing is strict: duplicate keys, NaN/Infinity,
absurd nesting or number sizes are all InvalidDocument, never a crash or a silent guess.
"""

import functools
import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from sysbackup_domain.errors import InvalidDocument
from sysbackup_domain.hashing import is_blob_hash

# Integers in our documents are sizes, offsets, ids and nanosecond times: all fit in a signed 64-bit
# value. Anything larger is hostile (and would not fit DynamoDB numbers or C-level struct fields).
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def dumps(document: object) -> bytes:
    """Canonical JSON bytes of a document made of dicts, lists, str, int, bool and None."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _reject_constant(name: str) -> object:
    raise InvalidDocument(f"{name} is not valid JSON here")


def _reject_float(text: str) -> object:
    raise InvalidDocument(f"non-integer number {text[:40]!r} where only integers are allowed")


def _pairs_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # built in C: called once per JSON object, 100k times for a big trailer
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidDocument(f"duplicate key {key!r}")
            seen.add(key)
    return result


def loads(data: bytes | bytearray | memoryview | str, what: str, *, allow_floats: bool = False) -> Any:
    """Parse untrusted JSON; any failure is InvalidDocument naming `what`."""
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_pairs_without_duplicates,
            parse_constant=_reject_constant,
            parse_float=None if allow_floats else _reject_float,
        )
    except InvalidDocument as error:
        raise InvalidDocument(f"{what}: {error}") from None
    except (ValueError, RecursionError) as error:  # JSONDecodeError, int digit limits, bad UTF-8, nesting
        raise InvalidDocument(f"{what} is not valid JSON: {error}") from None


def require_object(value: object, where: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict:
    """`value` must be a JSON object with all `required` keys and nothing outside required+optional."""
    if not isinstance(value, dict):
        raise InvalidDocument(f"{where} must be a JSON object, got {type(value).__name__}")
    required_keys, allowed_keys = _key_sets(tuple(required), tuple(optional))
    keys = value.keys()
    if keys >= required_keys and keys <= allowed_keys:  # the common case: one check per entry of a tree
        return value
    missing = required_keys - keys
    if missing:
        raise InvalidDocument(f"{where} is missing {', '.join(sorted(missing))}")
    unknown = keys - allowed_keys
    if unknown:
        raise InvalidDocument(f"{where} has unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    return value


@functools.lru_cache(maxsize=64)
def _key_sets(required: tuple[str, ...], optional: tuple[str, ...]) -> tuple[frozenset[str], frozenset[str]]:
    return frozenset(required), frozenset(required) | frozenset(optional)


def require_int(value: object, where: str, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int:
    if type(value) is int and minimum <= value <= maximum:  # the common case, first (not bool: its type)
        return value
    # DynamoDB hands numbers back as Decimal; an integral Decimal is an integer for our purposes.
    if isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value():
        value = int(value)
    # bool is an int subclass in Python, but JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidDocument(f"{where} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidDocument(f"{where} must be between {minimum} and {maximum}, got {value}")
    return value


def require_str(value: object, where: str, *, max_chars: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidDocument(f"{where} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise InvalidDocument(f"{where} must not be empty")
    if len(value) > max_chars:
        raise InvalidDocument(f"{where} is longer than {max_chars} characters")
    return value


def require_hash(value: object, where: str) -> str:
    if not is_blob_hash(value):
        raise InvalidDocument(
            f"{where} must be a SHA-256 hex digest (64 lowercase hex), got {_preview(value)}"
        )
    assert isinstance(value, str)
    return value


def require_list(value: object, where: str, *, max_items: int) -> list:
    if not isinstance(value, list):
        raise InvalidDocument(f"{where} must be a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise InvalidDocument(f"{where} has {len(value)} items, more than {max_items}")
    return value


def require_version(document: Mapping, where: str, supported: int = 1) -> None:
    version = document.get("version")
    if version != supported or isinstance(version, bool):
        raise InvalidDocument(f"{where} version must be {supported}, got {_preview(version)}")


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
