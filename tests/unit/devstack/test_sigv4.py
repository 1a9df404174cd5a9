"""The local gateway's SigV4 verifier against requests signed by botocore, as the host uploader signs them."""

from __future__ import annotations

import datetime as dt
import unittest.mock
from urllib.parse import quote

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st
from sysbackup_local.sigv4 import (
    INVALID_TOKEN,
    MISSING_TOKEN,
    SIGNATURE_MISMATCH,
    IncomingRequest,
    SignatureError,
    SigV4Verifier,
)

ACCESS_KEY = "AKIAHOSTEXAMPLE00001"
SECRET_KEY = "host-secret-key"
REGION = "eu-west-1"
HOST = "127.0.0.1:8123"


def sign(
    method: str,
    path_and_query: str,
    body: bytes,
    *,
    secret: str = SECRET_KEY,
    service: str = "execute-api",
    region: str = REGION,
    when: dt.datetime | None = None,
    headers: dict[str, str] | None = None,
) -> IncomingRequest:
    """Sign with botocore exactly as a client would, and return the request as the server receives it."""
    request = AWSRequest(
        method=method,
        url=f"http://{HOST}{path_and_query}",
        data=body,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    signer = SigV4Auth(Credentials(ACCESS_KEY, secret), service, region)
    if when is None:
        signer.add_auth(request)
    else:
        # botocore stamps the current time; freeze it to sign "in the past/future".
        with unittest.mock.patch(
            "botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)
        ):
            signer.add_auth(request)
    prepared = request.prepare()
    path, _, query = prepared.url.split(HOST, 1)[1].partition("?")
    wire_headers = {"Host": HOST, **{name: str(value) for name, value in prepared.headers.items()}}
    return IncomingRequest(method, path, query, wire_headers, prepared.body or b"")


def verifier(now: dt.datetime | None = None) -> SigV4Verifier:
    secrets = {ACCESS_KEY: SECRET_KEY}
    return SigV4Verifier(
        secrets.get, clock=(lambda: now) if now else lambda: dt.datetime.now(dt.timezone.utc)
    )


def test_a_botocore_signed_request_verifies_with_its_key_and_region() -> None:
    request = sign("POST", "/packs/presign", b'{"hashes": []}')

    caller = verifier().verify(request)

    assert caller.access_key == ACCESS_KEY
    assert caller.region == REGION


def test_query_strings_and_path_parameters_are_part_of_the_signature() -> None:
    request = sign("GET", "/manifests/20260101T000000Z-abcdef01?host=web-1&b=2", b"")

    assert verifier().verify(request).access_key == ACCESS_KEY
    tampered = IncomingRequest(
        request.method, request.raw_path, "host=web-2&b=2", request.headers, request.body
    )
    with pytest.raises(SignatureError) as refused:
        verifier().verify(tampered)
    assert refused.value.message == SIGNATURE_MISMATCH


def test_a_wrong_secret_is_a_signature_mismatch() -> None:
    request = sign("POST", "/packs/presign", b"{}", secret="not-the-secret")

    with pytest.raises(SignatureError) as refused:
        verifier().verify(request)

    assert refused.value.status == 403
    assert refused.value.message == SIGNATURE_MISMATCH


def test_an_unknown_access_key_is_an_invalid_token() -> None:
    request = sign("POST", "/packs/presign", b"{}")

    with pytest.raises(SignatureError) as refused:
        SigV4Verifier(lambda key: None).verify(request)

    assert refused.value.message == INVALID_TOKEN


def test_a_tampered_body_is_refused() -> None:
    request = sign("POST", "/packs/register", b'{"packs": []}')
    tampered = IncomingRequest(
        request.method, request.raw_path, request.raw_query, request.headers, b'{"packs":[1]}'
    )

    with pytest.raises(SignatureError) as refused:
        verifier().verify(tampered)

    assert refused.value.message == SIGNATURE_MISMATCH


def test_a_tampered_signed_header_is_refused() -> None:
    request = sign("POST", "/packs/presign", b"{}")
    headers = dict(request.headers)
    headers["Content-Type"] = "text/plain"

    with pytest.raises(SignatureError):
        verifier().verify(IncomingRequest(request.method, request.raw_path, "", headers, request.body))


def test_a_changed_method_or_path_is_refused() -> None:
    request = sign("POST", "/packs/presign", b"{}")

    with pytest.raises(SignatureError):
        verifier().verify(IncomingRequest("PUT", request.raw_path, "", request.headers, request.body))
    with pytest.raises(SignatureError):
        verifier().verify(IncomingRequest("POST", "/manifests", "", request.headers, request.body))


def test_a_request_signed_for_another_service_is_refused() -> None:
    request = sign("POST", "/packs/presign", b"{}", service="s3")

    with pytest.raises(SignatureError) as refused:
        verifier().verify(request)

    assert "execute-api" in refused.value.message


def test_missing_authorization_is_a_missing_token() -> None:
    request = sign("POST", "/packs/presign", b"{}")
    headers = {name: value for name, value in request.headers.items() if name.lower() != "authorization"}

    with pytest.raises(SignatureError) as refused:
        verifier().verify(IncomingRequest("POST", "/packs/presign", "", headers, b"{}"))

    assert refused.value.message == MISSING_TOKEN


@pytest.mark.parametrize(
    ("skew_minutes", "accepted"), [(-4.9, True), (4.9, True), (-5.5, False), (5.5, False)]
)
def test_the_date_may_be_five_minutes_off_either_way(skew_minutes: float, accepted: bool) -> None:
    now = dt.datetime(2026, 11, 21, 12, 0, 0, tzinfo=dt.timezone.utc)
    request = sign("POST", "/packs/presign", b"{}", when=now + dt.timedelta(minutes=skew_minutes))

    if accepted:
        assert verifier(now).verify(request).access_key == ACCESS_KEY
    else:
        with pytest.raises(SignatureError) as refused:
            verifier(now).verify(request)
        expected = "Signature expired" if skew_minutes < 0 else "Signature not yet current"
        assert refused.value.message.startswith(expected)


def test_a_declared_payload_hash_that_differs_from_the_body_is_refused() -> None:
    request = sign("POST", "/packs/presign", b"{}", headers={"X-Amz-Content-SHA256": "0" * 64})

    with pytest.raises(SignatureError):
        verifier().verify(request)


@settings(max_examples=40, deadline=None)
@given(
    body=st.binary(max_size=256),
    segment=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12),
    query_value=st.text(max_size=12),
)
def test_any_botocore_signed_request_verifies(body: bytes, segment: str, query_value: str) -> None:
    path = "/manifests/" + quote(segment, safe="")
    request = sign("POST", f"{path}?host={quote(query_value, safe='')}", body)

    assert verifier().verify(request).access_key == ACCESS_KEY
