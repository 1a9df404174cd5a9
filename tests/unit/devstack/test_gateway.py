"""The local API gateway in-process: routing, the payload 2.0 event, response mapping, refusals."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from sysbackup_local.gateway import ApiGateway, InvocationOutcome, RouteTable, map_result
from sysbackup_local.identities import KIND_FUNCTION, KIND_HOST, Identity, host_principal_arn
from sysbackup_local.template import HttpRoute

HOST = Identity("web-1", KIND_HOST, "AKIAHOSTWEB100000000", "web-1-secret", host_principal_arn("web-1"))
FUNCTION = Identity("UploadApiFunction", KIND_FUNCTION, "AKIAFUNC000000000000", "function-secret", None)


class RecordingInvoker:
    def __init__(self, outcome: InvocationOutcome) -> None:
        self.outcome = outcome
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, function: str, event: dict[str, Any]) -> InvocationOutcome:
        self.calls.append((function, event))
        return self.outcome


def make_gateway(outcome: InvocationOutcome | None = None) -> tuple[ApiGateway, RecordingInvoker]:
    routes = RouteTable()
    routes.add(HttpRoute("GET", "/manifests"), "ManifestApiFunction")
    routes.add(HttpRoute("GET", "/manifests/{manifest_id}"), "ManifestApiFunction")
    routes.add(HttpRoute("POST", "/packs/presign"), "UploadApiFunction")
    keys = {identity.access_key: identity for identity in (HOST, FUNCTION)}
    invoker = RecordingInvoker(outcome or InvocationOutcome(result={"ok": True}))
    return ApiGateway(routes, keys.get, invoker), invoker


def signed_headers(method: str, path: str, body: bytes, identity: Identity) -> dict[str, str]:
    request = AWSRequest(method=method, url=f"http://127.0.0.1:9999{path}", data=body)
    SigV4Auth(Credentials(identity.access_key, identity.secret_key), "execute-api", "us-east-1").add_auth(
        request
    )
    return {"Host": "127.0.0.1:9999", **{name: str(value) for name, value in request.headers.items()}}


def call(gateway: ApiGateway, method: str, path: str, body: bytes = b"", identity: Identity = HOST) -> Any:
    return gateway.handle(method, path, signed_headers(method, path, body, identity), body, "127.0.0.1")


def test_path_parameters_and_the_route_key_reach_the_function() -> None:
    gateway, invoker = make_gateway()

    response = call(gateway, "GET", "/manifests/20260101T000000Z-0a1b2c3d?host=web-2")

    assert response.status == 200
    [(function, event)] = invoker.calls
    assert function == "ManifestApiFunction"
    assert event["routeKey"] == "GET /manifests/{manifest_id}"
    assert event["pathParameters"] == {"manifest_id": "20260101T000000Z-0a1b2c3d"}
    assert event["queryStringParameters"] == {"host": "web-2"}
    assert event["requestContext"]["authorizer"]["iam"]["userArn"] == HOST.principal_arn


def test_literal_routes_win_over_parameterised_ones() -> None:
    gateway, invoker = make_gateway()

    call(gateway, "GET", "/manifests")

    assert invoker.calls[0][1]["routeKey"] == "GET /manifests"


def test_a_binary_body_is_base64_encoded() -> None:
    gateway, invoker = make_gateway()
    body = bytes(range(256))
    headers = signed_headers("POST", "/packs/presign", body, HOST)
    headers["Content-Type"] = "application/octet-stream"
    # Content-Type was not signed by this request, so changing it is allowed.
    gateway.handle("POST", "/packs/presign", headers, body, "127.0.0.1")

    event = invoker.calls[0][1]
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == body


def test_credentials_without_an_api_principal_are_invalid_tokens() -> None:
    gateway, invoker = make_gateway()

    response = call(gateway, "POST", "/packs/presign", b"{}", identity=FUNCTION)

    assert response.status == 403
    assert invoker.calls == []


def test_unknown_routes_are_404_when_signed() -> None:
    gateway, _ = make_gateway()

    assert call(gateway, "DELETE", "/packs/presign").status == 404


def test_a_function_error_is_a_500_without_details() -> None:
    gateway, _ = make_gateway(
        InvocationOutcome(error={"errorType": "KeyError", "errorMessage": "secret detail"})
    )

    response = call(gateway, "POST", "/packs/presign", b"{}")

    assert response.status == 500
    assert json.loads(response.body) == {"message": "Internal Server Error"}


@pytest.mark.parametrize(
    ("result", "status", "body"),
    [
        ({"statusCode": 201, "body": '{"a":1}'}, 201, b'{"a":1}'),
        ({"statusCode": 204}, 204, b""),
        (
            {"statusCode": 200, "body": base64.b64encode(b"\x00\x01").decode(), "isBase64Encoded": True},
            200,
            b"\x00\x01",
        ),
        ({"stored": []}, 200, b'{"stored": []}'),
        ([1, 2], 200, b"[1, 2]"),
    ],
)
def test_results_map_to_http_like_payload_2(result: Any, status: int, body: bytes) -> None:
    response = map_result(result)

    assert (response.status, response.body) == (status, body)


def test_event_time_is_the_gateway_clock() -> None:
    routes = RouteTable()
    routes.add(HttpRoute("POST", "/packs/presign"), "UploadApiFunction")
    invoker = RecordingInvoker(InvocationOutcome(result={}))
    fixed = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    gateway = ApiGateway(routes, {HOST.access_key: HOST}.get, invoker, clock=lambda: fixed)

    call(gateway, "POST", "/packs/presign", b"{}")

    assert invoker.calls[0][1]["requestContext"]["timeEpoch"] == int(fixed.timestamp() * 1000)
