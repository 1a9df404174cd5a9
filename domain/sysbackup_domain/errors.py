"""Errors raised when untrusted bytes or documents fail validation.

Both derive from ValueError so callers that only care about "bad input" can catch one thing,
while the backend can still map them to distinct outcomes (400 for a document, condemn for a blob).
"""


class InvalidDocument(ValueError):
    """Untrusted JSON (tree, manifest, commit request, pack trailer, stream index) is malformed."""


class CorruptBlob(ValueError):
    """Stored bytes do not decode (bad codec, wrong length) or do not hash to the claimed hash."""
