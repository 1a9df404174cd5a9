"""SigV4 verification as API Gateway does it for an IAM-authorized HTTP API.

The canonical request is rebuilt with botocore's own SigV4Auth from the request as it arrived, so a
request botocore signed verifies here byte for byte, and any change to the method, path, query, a signed
header or the body changes the signature. Error messages are API Gateway's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "execute-api"
# API Gateway refuses a request whose X-Amz-Date is more than 5 minutes from its clock (either way).
MAX_CLOCK_SKEW = dt.timedelta(minutes=5)
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

MISSING_TOKEN = "Missing Authentication Token"
INVALID_TOKEN = "The security token included in the request is invalid."
SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)

_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256\s+"
    r"Credential=(?P<credential>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed_headers>[^,\s]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*$"
)


# API Gateway's x-amzn-ErrorType for each refusal.
_ERROR_TYPES = {
    MISSING_TOKEN: "MissingAuthenticationTokenException",
    INVALID_TOKEN: "UnrecognizedClientException",
}


class SignatureError(Exception):
    """A request API Gateway would refuse with 403 and this message."""

    status = 403

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = _ERROR_TYPES.get(message, "InvalidSignatureException")


@dataclass(frozen=True)
class IncomingRequest:
    method: str
    raw_path: str  # as sent on the wire, still percent-encoded
    raw_query: str  # without the leading "?"
    headers: Mapping[str, str]  # any case
    body: bytes


@dataclass(frozen=True)
class VerifiedCaller:
    access_key: str
    region: str
    signed_at: dt.datetime


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None


def _parse_amz_date(value: str | None) -> dt.datetime:
    if not value:
        raise SignatureError(MISSING_TOKEN)
    try:
        return dt.datetime.strptime(value, AMZ_DATE_FORMAT).replace(tzinfo=dt.timezone.utc)
    except ValueError:
        raise SignatureError(
            f"Date must be in ISO-8601 'basic format'. Got '{value}'. See http://en.wikipedia.org/wiki/ISO_8601"
        ) from None


def expected_signature(
    request: IncomingRequest,
    secret_key: str,
    access_key: str,
    region: str,
    amz_date: str,
    signed_headers: str,
) -> str:
    """The signature botocore computes for this request with this secret and these signed headers."""
    names = signed_headers.split(";")
    headers = {name: _header(request.headers, name) or "" for name in names}
    url = f"http://{headers.get('host', 'localhost')}{request.raw_path}"
    if request.raw_query:
        url += f"?{request.raw_query}"
    aws_request = AWSRequest(method=request.method, url=url, headers=headers, data=request.body)
    aws_request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret_key), SERVICE, region)
    canonical = signer.canonical_request(aws_request)
    string_to_sign = signer.string_to_sign(aws_request, canonical)
    return signer.signature(string_to_sign, aws_request)


class SigV4Verifier:
    """Checks requests against known access keys; `secret_for` returns None for an unknown key."""

    def __init__(
        self,
        secret_for: Callable[[str], str | None],
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self._secret_for = secret_for
        self._clock = clock

    def verify(self, request: IncomingRequest) -> VerifiedCaller:
        authorization = _header(request.headers, "Authorization")
        if not authorization:
            raise SignatureError(MISSING_TOKEN)
        match = _AUTHORIZATION.match(authorization.strip())
        if match is None:
            raise SignatureError(
                f"Authorization header requires existence of 'Credential', 'Signature' and "
                f"'SignedHeaders' parameters. Authorization={authorization}"
            )
        credential = match["credential"].split("/")
        if len(credential) != 5 or credential[3] != SERVICE or credential[4] != "aws4_request":
            raise SignatureError(f"Credential should be scoped to correct service: '{SERVICE}'.")
        access_key, scope_date, region = credential[0], credential[1], credential[2]
        amz_date_text = _header(request.headers, "X-Amz-Date")
        signed_at = _parse_amz_date(amz_date_text)
        assert amz_date_text is not None
        signed_headers = match["signed_headers"]
        if "host" not in signed_headers.split(";"):
            raise SignatureError("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
        if scope_date != amz_date_text[:8]:
            raise SignatureError(SIGNATURE_MISMATCH)
        secret = self._secret_for(access_key)
        if secret is None:
            raise SignatureError(INVALID_TOKEN)
        declared_payload_hash = _header(request.headers, "X-Amz-Content-SHA256")
        if declared_payload_hash and declared_payload_hash != hashlib.sha256(request.body).hexdigest():
            raise SignatureError(SIGNATURE_MISMATCH)
        wanted = expected_signature(request, secret, access_key, region, amz_date_text, signed_headers)
        if not hmac.compare_digest(wanted, match["signature"]):
            raise SignatureError(SIGNATURE_MISMATCH)
        self._check_clock(signed_at, amz_date_text)
        return VerifiedCaller(access_key=access_key, region=region, signed_at=signed_at)

    def _check_clock(self, signed_at: dt.datetime, amz_date: str) -> None:
        now = self._clock()
        if abs(now - signed_at) <= MAX_CLOCK_SKEW:
            return
        now_text = now.strftime(AMZ_DATE_FORMAT)
        if signed_at < now:
            earliest = (now - MAX_CLOCK_SKEW).strftime(AMZ_DATE_FORMAT)
            raise SignatureError(
                f"Signature expired: {amz_date} is now earlier than {earliest} ({now_text} - 5 min.)"
            )
        latest = (now + MAX_CLOCK_SKEW).strftime(AMZ_DATE_FORMAT)
        raise SignatureError(
            f"Signature not yet current: {amz_date} is still later than {latest} ({now_text} + 5 min.)"
        )
