"""The local API gateway: an HTTP API with IAM auth, payload format 2.0, routes read from template.yaml."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from .identities import Identity
from .sigv4 import IncomingRequest, SignatureError, SigV4Verifier
from .template import ACCOUNT_ID, HttpRoute

MAX_BODY_BYTES = 10 * 1024 * 1024
NOT_FOUND = {"message": "Not Found"}
INTERNAL_ERROR = {"message": "Internal Server Error"}
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class InvocationOutcome:
    result: Any = None
    error: dict[str, Any] | None = None


Invoker = Callable[[str, dict[str, Any]], InvocationOutcome]


@dataclass(frozen=True)
class CompiledRoute:
    route: HttpRoute
    function: str
    pattern: re.Pattern[str]
    parameter_names: tuple[str, ...]


def compile_route(route: HttpRoute, function: str) -> CompiledRoute:
    """`/manifests/{manifest_id}` -> a regex capturing one segment; `{proxy+}` captures the rest."""
    names: list[str] = []
    pattern = ""
    for piece in re.split(r"(\{[^}]+\})", route.path):
        if piece.startswith("{") and piece.endswith("}"):
            name = piece[1:-1]
            greedy = name.endswith("+")
            names.append(name.rstrip("+"))
            pattern += "(.+)" if greedy else "([^/]+)"
        else:
            pattern += re.escape(piece)
    return CompiledRoute(route, function, re.compile(f"^{pattern}$"), tuple(names))


class RouteTable:
    def __init__(self) -> None:
        self._routes: list[CompiledRoute] = []
        self._lock = threading.Lock()

    def add(self, route: HttpRoute, function: str) -> None:
        with self._lock:
            self._routes.append(compile_route(route, function))
            # Like API Gateway: the most specific (fewest parameters, longest literal) route wins.
            self._routes.sort(key=lambda item: (len(item.parameter_names), -len(item.route.path)))

    def match(self, method: str, path: str) -> tuple[CompiledRoute, dict[str, str]] | None:
        with self._lock:
            routes = list(self._routes)
        for compiled in routes:
            if compiled.route.method not in (method, "ANY"):
                continue
            found = compiled.pattern.match(path)
            if found:
                return compiled, {
                    name: unquote(value)
                    for name, value in zip(compiled.parameter_names, found.groups(), strict=True)
                }
        return None


def _is_text(content_type: str | None) -> bool:
    return content_type is None or content_type.startswith(TEXT_TYPES) or "json" in content_type


def build_event(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: dict[str, str],
    body: bytes,
    route: CompiledRoute,
    path_parameters: dict[str, str],
    caller: Identity,
    source_ip: str,
    now: dt.datetime,
) -> dict[str, Any]:
    """An API Gateway HTTP API (payload 2.0) event with the caller's IAM principal."""
    lowered = {name.lower(): value for name, value in headers.items()}
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        # API Gateway joins repeated query parameters with commas.
        query[name] = f"{query[name]},{value}" if name in query else value
    is_base64 = bool(body) and not _is_text(lowered.get("content-type"))
    body_text: str | None
    if not body:
        body_text = None
    elif is_base64:
        body_text = base64.b64encode(body).decode()
    else:
        body_text = body.decode("utf-8", errors="replace")
    request_id = str(uuid.uuid4())
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route.route.route_key,
        "rawPath": raw_path,
        "rawQueryString": raw_query,
        "headers": lowered,
        "requestContext": {
            "accountId": ACCOUNT_ID,
            "apiId": "local",
            "authorizer": {
                "iam": {
                    "accessKey": caller.access_key,
                    "accountId": ACCOUNT_ID,
                    "callerId": caller.access_key,
                    "cognitoIdentity": None,
                    "principalOrgId": None,
                    "userArn": caller.principal_arn,
                    "userId": caller.access_key,
                }
            },
            "domainName": lowered.get("host", "127.0.0.1"),
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": lowered.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": route.route.route_key,
            "stage": "$default",
            "time": now.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(now.timestamp() * 1000),
        },
        "isBase64Encoded": is_base64,
    }
    if query:
        event["queryStringParameters"] = query
    if path_parameters:
        event["pathParameters"] = path_parameters
    if body_text is not None:
        event["body"] = body_text
    return event


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def json_response(status: int, payload: Any) -> HttpResponse:
    return HttpResponse(status, {"Content-Type": "application/json"}, json.dumps(payload).encode())


def map_result(result: Any) -> HttpResponse:
    """Payload 2.0 response rules: a dict with statusCode is taken as is; anything else is a 200 JSON body."""
    if isinstance(result, dict) and "statusCode" in result:
        headers = {str(name): str(value) for name, value in (result.get("headers") or {}).items()}
        for name, values in (result.get("multiValueHeaders") or {}).items():
            headers[str(name)] = ",".join(str(value) for value in values)
        raw_body = result.get("body")
        if raw_body is None:
            body = b""
        elif result.get("isBase64Encoded"):
            body = base64.b64decode(raw_body)
        else:
            body = str(raw_body).encode()
        headers.setdefault("Content-Type", "application/json")
        return HttpResponse(int(result["statusCode"]), headers, body)
    if isinstance(result, str):
        return HttpResponse(200, {"Content-Type": "application/json"}, result.encode())
    return json_response(200, result)


class ApiGateway:
    """Checks the signature, finds the route, invokes the function and maps its answer."""

    def __init__(
        self,
        routes: RouteTable,
        identity_for_key: Callable[[str], Identity | None],
        invoke: Invoker,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc),
    ) -> None:
        self.routes = routes
        self._identity_for_key = identity_for_key
        self._invoke = invoke
        self._clock = clock
        self._verifier = SigV4Verifier(self._secret_for, clock)

    def _secret_for(self, access_key: str) -> str | None:
        identity = self._identity_for_key(access_key)
        # Only principals that API Gateway would know as IAM callers (hosts, restore) can sign requests.
        if identity is None or identity.principal_arn is None:
            return None
        return identity.secret_key

    def handle(
        self, method: str, target: str, headers: dict[str, str], body: bytes, source_ip: str
    ) -> HttpResponse:
        split = urlsplit(target)
        raw_path, raw_query = split.path or "/", split.query
        matched = self.routes.match(method, raw_path)
        if matched is None:
            # API Gateway answers unknown routes of an IAM API with the missing-token 403 only when
            # unsigned; a signed request to an unknown route gets 404.
            if not any(name.lower() == "authorization" for name in headers):
                return json_response(403, {"message": "Missing Authentication Token"})
            return json_response(404, NOT_FOUND)
        route, path_parameters = matched
        try:
            verified = self._verifier.verify(IncomingRequest(method, raw_path, raw_query, headers, body))
        except SignatureError as error:
            refusal = json_response(error.status, {"message": error.message})
            refusal.headers["x-amzn-ErrorType"] = error.error_type
            return refusal
        caller = self._identity_for_key(verified.access_key)
        assert caller is not None
        event = build_event(
            method=method,
            raw_path=raw_path,
            raw_query=raw_query,
            headers=headers,
            body=body,
            route=route,
            path_parameters=path_parameters,
            caller=caller,
            source_ip=source_ip,
            now=self._clock(),
        )
        outcome = self._invoke(route.function, event)
        if outcome.error is not None:
            return json_response(500, INTERNAL_ERROR)
        try:
            return map_result(outcome.result)
        except (TypeError, ValueError, KeyError):
            return json_response(500, INTERNAL_ERROR)


def make_http_server(gateway: ApiGateway, port: int) -> ThreadingHTTPServer:
    class GatewayRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                # Drain what the client sends so it reads our answer instead of a reset connection.
                remaining = length
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                response = json_response(413, {"message": "Request Entity Too Large"})
                self.close_connection = True
            else:
                body = self.rfile.read(length) if length else b""
                headers = {name: value for name, value in self.headers.items()}
                response = gateway.handle(self.command, self.path, headers, body, self.client_address[0])
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("apigw-requestid", uuid.uuid4().hex[:16])
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _serve

    server = ThreadingHTTPServer(("127.0.0.1", port), GatewayRequestHandler)
    server.daemon_threads = True
    return server
