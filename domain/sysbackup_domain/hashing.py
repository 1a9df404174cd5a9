"""Content hashes: a blob is named by the SHA-256 of its plaintext."""

import base64
import hashlib

_LOWER_HEX = "0123456789abcdef"


def blob_hash(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 hex digest of a blob's plaintext."""
    return hashlib.sha256(data).hexdigest()


def is_blob_hash(value: object) -> bool:
    """True for exactly 64 lowercase hex characters (the only spelling we store, so lookups match)."""
    # strip() leaves nothing only if every character is lowercase hex: faster than a regex, and this
    # runs for every hash in every trailer, tree and request.
    return isinstance(value, str) and len(value) == 64 and not value.strip(_LOWER_HEX)


def sha256_base64(data: bytes | bytearray | memoryview) -> str:
    """Base64 SHA-256, the form S3 wants in `x-amz-checksum-sha256` (used for whole packs)."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
