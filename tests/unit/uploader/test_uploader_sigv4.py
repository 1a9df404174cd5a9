"""The uploader's own SigV4 signer signs exactly as botocore's SigV4Auth (which API Gateway accepts)."""

from __future__ import annotations

from datetime import datetime, timezone
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from s3_sysbackup.sigv4 import Keys, signed_headers

NOW = datetime(2026, 11, 22, 5, 30, 7, tzinfo=timezone.utc)
JSON = {"Content-Type": "application/json"}


def botocore_headers(method: str, url: str, headers: dict[str, str], body: bytes | None, keys: Keys) -> dict:
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    credentials = Credentials(keys.access_key, keys.secret_key, keys.token)
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        SigV4Auth(credentials, "execute-api", "eu-west-1").add_auth(request)
    return dict(request.headers.items())  # as signed (prepare() adds Content-Length, unsigned)


@pytest.mark.parametrize(
    ("method", "url", "headers", "body"),
    [
        ("POST", "https://abc123.execute-api.eu-west-1.amazonaws.com/packs/presign", JSON, b'{"packs":[]}'),
        ("GET", "https://abc123.execute-api.eu-west-1.amazonaws.com/manifests?limit=10&host=web-1", {}, None),
        ("GET", "http://127.0.0.1:38087/packs?next=a%2Fb%3D&limit=1000", {}, None),
        ("GET", "https://api.example.com:443/manifests/20261122T053007Z-abcdef01", {}, None),
        ("GET", "https://api.example.com:8443/jobs/x%20y/./z/../w", {}, None),
        ("POST", "http://[::1]:9000/downloads", {**JSON, "X-Custom": "  two   spaces "}, b"{}"),
        ("GET", "https://api.example.com", {"User-Agent": "not signed"}, None),
    ],
)
@pytest.mark.parametrize("token", [None, "session-token/with+chars="])
def test_signatures_match_botocores(method: str, url: str, headers: dict, body: bytes | None, token) -> None:
    keys = Keys("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    ours = signed_headers(method, url, headers, body, keys, "eu-west-1", "execute-api", now=NOW)
    assert ours == botocore_headers(method, url, headers, body, keys)
    assert ours["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261122/eu-west-1/")


def test_a_different_secret_gives_a_different_signature() -> None:
    url = "https://api.example.com/manifests"
    first = signed_headers("GET", url, {}, None, Keys("AK", "secret-1"), "us-east-1", "execute-api", now=NOW)
    second = signed_headers("GET", url, {}, None, Keys("AK", "secret-2"), "us-east-1", "execute-api", now=NOW)
    assert first["Authorization"] != second["Authorization"]
