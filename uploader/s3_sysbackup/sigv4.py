"""AWS Signature Version 4 for the host's API calls (API Gateway's `execute-api`), in the standard library.

Why not botocore's SigV4Auth: importing botocore.auth costs every CLI run about 30 MiB of RSS (it pulls in
botocore's HTTP stack, pyOpenSSL and cryptography) and ~0.1 s, for a signature that is a few HMACs. This
follows botocore's canonical forms exactly (tests/unit/uploader/test_sigv4.py signs the same requests
with both and compares), so API Gateway and the local stack's checker see the same signatures as before.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import NamedTuple, Protocol
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
# Headers botocore leaves out of signatures (proxies and SDKs may change them on the way).
_UNSIGNED_HEADERS = frozenset({"expect", "user-agent", "x-amzn-trace-id"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Keys(NamedTuple):
    """A key pair (and session token): what signing needs, as botocore's frozen credentials hold it."""

    access_key: str
    secret_key: str
    token: str | None = None


class CredentialSource(Protocol):
    """Static keys, or botocore's refreshing credentials (an assumed role): both freeze to `Keys`' fields."""

    def get_frozen_credentials(self) -> Keys: ...


class StaticCredentials:
    def __init__(self, keys: Keys) -> None:
        self._keys = keys

    def get_frozen_credentials(self) -> Keys:
        return self._keys


def utc_now() -> datetime:
    """The signing clock (tests move it to play a host whose clock is off)."""
    return datetime.now(timezone.utc)


def signed_headers(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes | None,
    keys: Keys,
    region: str,
    service: str,
    now: datetime | None = None,
) -> dict[str, str]:
    """`headers` plus X-Amz-Date, X-Amz-Security-Token (with a session token) and Authorization."""
    timestamp = (now or utc_now()).strftime("%Y%m%dT%H%M%SZ")
    result = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    result["X-Amz-Date"] = timestamp
    if keys.token:
        result["X-Amz-Security-Token"] = keys.token
    parts = urlsplit(url)
    to_sign = {name.lower(): " ".join(value.split()) for name, value in result.items()}
    to_sign = {name: value for name, value in to_sign.items() if name not in _UNSIGNED_HEADERS}
    to_sign.setdefault("host", _host(parts.scheme, parts.hostname or "", parts.port))
    names = sorted(to_sign)
    canonical_request = "\n".join(
        [
            method.upper(),
            quote(_remove_dot_segments(parts.path) or "/", safe="/~"),
            _canonical_query(parts.query),
            "".join(f"{name}:{to_sign[name]}\n" for name in names),
            ";".join(names),
            hashlib.sha256(body or b"").hexdigest(),
        ]
    )
    scope = f"{timestamp[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [ALGORITHM, timestamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = f"AWS4{keys.secret_key}".encode()
    for part in (timestamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    result["Authorization"] = (
        f"{ALGORITHM} Credential={keys.access_key}/{scope}, SignedHeaders={';'.join(names)}, "
        f"Signature={signature}"
    )
    return result


def _host(scheme: str, hostname: str, port: int | None) -> str:
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"


def _canonical_query(query: str) -> str:
    """The URL's query pairs, already percent-encoded, sorted (as botocore signs a URL's query)."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{name}={value}" for name, value in pairs)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 dot-segment removal, as botocore does it (empty segments dropped too)."""
    if not path:
        return ""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    first = "/" if path.startswith("/") else ""
    last = "/" if path.endswith("/") and segments else ""
    return first + "/".join(segments) + last
