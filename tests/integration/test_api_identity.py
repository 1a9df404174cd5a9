"""The local API gateway checks SigV4 like API Gateway and hands the handler the caller's principal."""

from __future__ import annotations

import datetime as dt
import json
import textwrap
import unittest.mock
from pathlib import Path
from typing import Any

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from sysbackup_local.identities import Identity, host_principal_arn
from sysbackup_local.sigv4 import INVALID_TOKEN, MISSING_TOKEN, SIGNATURE_MISMATCH
from sysbackup_local.stack import LocalHost, LocalStack

ECHO_APP = textwrap.dedent(
    '''
    """Echoes what the gateway handed over; crashes on request."""
    import json


    def lambda_handler(event, context):
        if event.get("rawPath") == "/echo-test/crash":
            raise RuntimeError("echo crashed on purpose")
        return {
            "statusCode": 200,
            "headers": {"content-type": "application/json"},
            "body": json.dumps({"event": event, "function_name": context.function_name}),
        }
    '''
)


@pytest.fixture(scope="module")
def echo_route(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A test-only function on `/echo-test/...`, registered through the Python API, not template.yaml."""
    app = tmp_path_factory.mktemp("echo") / "app.py"
    app.write_text(ECHO_APP)
    stack.register_function(
        "EchoTestFunction",
        app,
        [("POST", "/echo-test/{name}"), ("GET", "/echo-test/{name}")],
    )
    return stack.endpoints["api"] + "/echo-test"


def signed(
    method: str,
    url: str,
    body: bytes,
    access_key: str,
    secret_key: str,
    *,
    when: dt.datetime | None = None,
    region: str = "us-east-1",
) -> requests.PreparedRequest:
    request = AWSRequest(method=method, url=url, data=body, headers={"Content-Type": "application/json"})
    signer = SigV4Auth(Credentials(access_key, secret_key), "execute-api", region)
    if when is None:
        signer.add_auth(request)
    else:
        with unittest.mock.patch(
            "botocore.auth.get_current_datetime", return_value=when.replace(tzinfo=None)
        ):
            signer.add_auth(request)
    prepared = request.prepare()
    return requests.Request(
        method, prepared.url, headers=dict(prepared.headers), data=prepared.body
    ).prepare()


def send(prepared: requests.PreparedRequest) -> requests.Response:
    with requests.Session() as session:
        return session.send(prepared, timeout=60)


def echo(response: requests.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return json.loads(response.text)["event"]


def as_host(identity: Identity) -> tuple[str, str]:
    return identity.access_key, identity.secret_key


def test_a_signed_request_reaches_the_handler_as_its_host(host_config: LocalHost, echo_route: str) -> None:
    body = json.dumps({"hashes": ["ab" * 32]}).encode()

    event = echo(send(signed("POST", f"{echo_route}/thing?x=1&x=2", body, *as_host(host_config.identity))))

    iam = event["requestContext"]["authorizer"]["iam"]
    assert iam["userArn"] == host_principal_arn(host_config.name)
    assert iam["accessKey"] == host_config.identity.access_key
    assert iam["accountId"] == "000000000000"
    assert iam["principalOrgId"] is None and iam["cognitoIdentity"] is None
    assert event["version"] == "2.0"
    assert event["routeKey"] == "POST /echo-test/{name}"
    assert event["pathParameters"] == {"name": "thing"}
    assert event["queryStringParameters"] == {"x": "1,2"}
    assert event["rawQueryString"] == "x=1&x=2"
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["requestContext"]["http"]["sourceIp"] == "127.0.0.1"
    assert json.loads(event["body"]) == {"hashes": ["ab" * 32]}
    assert all(name == name.lower() for name in event["headers"])


def test_the_restore_identity_is_the_restore_roles_session(stack: LocalStack, echo_route: str) -> None:
    restore = stack.identity("restore")

    event = echo(send(signed("GET", f"{echo_route}/list", b"", restore.access_key, restore.secret_key)))

    role = stack.template.restore_role_name
    assert event["requestContext"]["authorizer"]["iam"]["userArn"] == (
        f"arn:aws:sts::000000000000:assumed-role/{role}/admin"
    )


def test_a_wrong_secret_is_refused(host_config: LocalHost, echo_route: str) -> None:
    response = send(signed("POST", f"{echo_route}/x", b"{}", host_config.identity.access_key, "wrong-secret"))

    assert response.status_code == 403
    assert response.json() == {"message": SIGNATURE_MISMATCH}


def test_a_tampered_body_is_refused(host_config: LocalHost, echo_route: str) -> None:
    prepared = signed("POST", f"{echo_route}/x", b'{"hashes":[]}', *as_host(host_config.identity))
    prepared.body = b'{"hashes":[1]}'

    response = send(prepared)

    assert response.status_code == 403
    assert response.json() == {"message": SIGNATURE_MISMATCH}


def test_a_tampered_signed_header_is_refused(host_config: LocalHost, echo_route: str) -> None:
    prepared = signed("POST", f"{echo_route}/x", b"{}", *as_host(host_config.identity))
    prepared.headers["Content-Type"] = "text/plain"

    assert send(prepared).status_code == 403


@pytest.mark.parametrize("skew", [dt.timedelta(minutes=-6), dt.timedelta(minutes=6), dt.timedelta(hours=-2)])
def test_a_skewed_or_expired_date_is_refused(
    host_config: LocalHost, echo_route: str, skew: dt.timedelta
) -> None:
    when = dt.datetime.now(dt.timezone.utc) + skew

    response = send(signed("POST", f"{echo_route}/x", b"{}", *as_host(host_config.identity), when=when))

    assert response.status_code == 403
    assert response.json()["message"].startswith(
        "Signature expired" if skew < dt.timedelta(0) else "Signature not"
    )


def test_an_unknown_key_is_an_invalid_token(echo_route: str) -> None:
    response = send(signed("POST", f"{echo_route}/x", b"{}", "AKIANOBODY0000000000", "whatever"))

    assert response.status_code == 403
    assert response.json() == {"message": INVALID_TOKEN}
    assert response.headers["x-amzn-ErrorType"] == "UnrecognizedClientException"


def test_function_and_gc_keys_are_not_api_callers(stack: LocalStack, echo_route: str) -> None:
    for who in ("gc", "UploadApiFunction"):
        identity = stack.identity(who)
        response = send(signed("POST", f"{echo_route}/x", b"{}", identity.access_key, identity.secret_key))
        assert response.status_code == 403, who
        assert response.json() == {"message": INVALID_TOKEN}


def test_an_unsigned_request_is_a_missing_token(echo_route: str) -> None:
    response = requests.post(f"{echo_route}/x", data=b"{}", timeout=30)

    assert response.status_code == 403
    assert response.json() == {"message": MISSING_TOKEN}


def test_host_a_is_never_seen_as_host_b(
    stack: LocalStack, host_config: LocalHost, echo_route: str, tmp_path: Path
) -> None:
    other = stack.add_host(f"{host_config.name}-b", tmp_path / "other")
    mine = host_config.identity

    # Naming the other host anywhere in the request changes nothing: the key decides.
    event = echo(
        send(
            signed(
                "POST",
                f"{echo_route}/x?host={other.name}",
                json.dumps({"host": other.name}).encode(),
                *as_host(mine),
            )
        )
    )
    assert event["requestContext"]["authorizer"]["iam"]["userArn"] == host_principal_arn(mine.name)

    # Claiming the other host's access key without its secret fails.
    response = send(signed("POST", f"{echo_route}/x", b"{}", other.access_key, mine.secret_key))
    assert response.status_code == 403

    # And each key maps to its own host only.
    theirs = echo(send(signed("POST", f"{echo_route}/x", b"{}", *as_host(other))))
    assert theirs["requestContext"]["authorizer"]["iam"]["userArn"] == host_principal_arn(other.name)


def test_a_handler_crash_is_a_500_with_the_traceback_in_the_functions_log(
    stack: LocalStack, host_config: LocalHost, echo_route: str
) -> None:
    response = send(signed("POST", f"{echo_route}/crash", b"{}", *as_host(host_config.identity)))

    assert response.status_code == 500
    assert response.json() == {"message": "Internal Server Error"}
    log = (stack.state_dir / "logs" / "EchoTestFunction.log").read_text()
    assert "RuntimeError: echo crashed on purpose" in log
    assert "Traceback" in log


def test_bodies_over_10_mb_are_refused(host_config: LocalHost, echo_route: str) -> None:
    body = b"x" * (10 * 1024 * 1024 + 1)

    response = send(signed("POST", f"{echo_route}/big", body, *as_host(host_config.identity)))

    assert response.status_code == 413


def test_template_routes_are_served_and_unknown_routes_are_not(
    stack: LocalStack, host_config: LocalHost
) -> None:
    api = stack.endpoints["api"]

    unknown = send(signed("POST", f"{api}/not-a-route", b"{}", *as_host(host_config.identity)))
    known = send(
        signed(
            "POST", f"{api}/packs/presign", json.dumps({"packs": []}).encode(), *as_host(host_config.identity)
        )
    )

    assert unknown.status_code == 404
    # Whatever the upload function answers, it is the function answering, not the gateway refusing.
    assert known.status_code not in (403, 404), known.text


def test_only_the_restore_principal_reads_another_hosts_manifests(
    stack: LocalStack, host_config: LocalHost, tmp_path: Path
) -> None:
    """Against the real ManifestApiFunction: the principal the gateway hands over is what it trusts."""
    url = f"{stack.endpoints['api']}/manifests?host={host_config.name}"
    restore = stack.identity("restore")
    intruder = stack.add_host(f"{host_config.name}-x", tmp_path / "intruder")

    as_restore = send(signed("GET", url, b"", restore.access_key, restore.secret_key))
    as_other_host = send(signed("GET", url, b"", *as_host(intruder)))
    as_itself = send(signed("GET", url, b"", *as_host(host_config.identity)))

    assert as_restore.status_code == 200, as_restore.text
    assert as_restore.json() == {"manifests": [], "next": None, "head": None}
    assert as_other_host.status_code == 403, as_other_host.text
    assert as_itself.status_code == 200, as_itself.text
