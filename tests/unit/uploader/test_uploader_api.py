"""The signed API client and presigned transfers against a scripted HTTP server on loopback.

The server checks every signature with the local stack's SigV4 verifier (botocore's own canonical
request), so a request that would fail at API Gateway fails here too.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.credentials import Credentials
from s3_sysbackup.api import ApiClient, ApiError, ApiUnavailable, ClockSkewError
from s3_sysbackup.transfer import Transfer
from sysbackup_local.sigv4 import IncomingRequest, SignatureError, SigV4Verifier

ACCESS_KEY, SECRET_KEY = "AKIDHOSTONE", "host-one-secret"


class ScriptedServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script: list[tuple[int, dict, dict[str, str]]] = []  # (status, body, headers) per request
        self.seen: list[tuple[str, str, bytes]] = []
        self.verifier = SigV4Verifier(lambda key: SECRET_KEY if key == ACCESS_KEY else None)
        self.check_signatures = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: ScriptedServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path, _, query = self.path.partition("?")
        self.server.seen.append((self.command, self.path, body))
        status, payload, headers = 200, {}, {}
        if self.server.check_signatures:
            try:
                self.server.verifier.verify(
                    IncomingRequest(self.command, path, query, dict(self.headers), body)
                )
            except SignatureError as error:
                status, payload = 403, {"message": error.message}
        if status == 200:
            status, payload, headers = self.server.script.pop(0)
        data = json.dumps(payload).encode()
        self.send_response_only(status)  # send_response would add a Date of its own
        headers.setdefault("Date", self.date_time_string())
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = _handle


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    thread = threading.Thread(target=scripted.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield scripted
    scripted.shutdown()
    scripted.server_close()


def client(server: ScriptedServer, secret: str = SECRET_KEY, attempts: int = 4) -> ApiClient:
    return ApiClient(server.url, "us-east-1", Credentials(ACCESS_KEY, secret), attempts=attempts)


def test_signed_requests_verify_and_parse(server: ScriptedServer):
    server.script = [(200, {"uploads": [{"pack_id": "b" * 64, "url": "u"}], "stored": ["a" * 64]}, {})]
    api = client(server)
    uploads, stored = api.presign_packs([{"sha256": "a" * 64, "size": 20}, {"sha256": "b" * 64, "size": 30}])
    assert stored == {"a" * 64} and [u["pack_id"] for u in uploads] == ["b" * 64]
    method, path, body = server.seen[0]
    assert (method, path) == ("POST", "/packs/presign")
    assert json.loads(body) == {"packs": [{"sha256": "a" * 64, "size": 20}, {"sha256": "b" * 64, "size": 30}]}
    assert api.counter.as_dict() == {"api": {"POST /packs/presign": 1}}


def test_pack_list_follows_pages_and_passes_the_host(server: ScriptedServer):
    first = {"packs": [{"pack_id": "a" * 64, "size": 20, "state": "verified"}], "next": "tok en"}
    second = {"packs": [{"pack_id": "b" * 64, "size": 30, "state": "presigned"}], "next": None}
    server.script = [(200, first, {}), (200, second, {})]
    packs = client(server).list_packs(host="other")
    assert [p["pack_id"] for p in packs] == ["a" * 64, "b" * 64]
    assert [path for _, path, _ in server.seen] == [
        "/packs?host=other&limit=1000",
        "/packs?host=other&limit=1000&next=tok+en",
    ]


def test_download_urls_ask_for_packs_and_report_the_refused(server: ScriptedServer):
    answer = {"urls": {"a" * 64: "https://s3/a"}, "sizes": {"a" * 64: 20}, "missing": {"b" * 64: "unknown"}}
    server.script = [(200, answer, {})]
    downloads = client(server).download_urls(["b" * 64, "a" * 64])
    assert downloads.urls == {"a" * 64: "https://s3/a"} and downloads.sizes == {"a" * 64: 20}
    assert downloads.missing == {"b" * 64: "unknown"}
    assert json.loads(server.seen[0][2]) == {"packs": ["a" * 64, "b" * 64]}


def test_a_bad_signature_is_a_403_api_error_not_a_clock_problem(server: ScriptedServer):
    with pytest.raises(ApiError) as raised:
        client(server, secret="wrong").list_manifests()
    assert raised.value.status == 403 and not isinstance(raised.value, ClockSkewError)
    assert "signature" in raised.value.message.lower()


def test_server_errors_are_retried(server: ScriptedServer):
    server.script = [(503, {"message": "busy"}, {}), (500, {}, {}), (200, {"manifests": []}, {})]
    api = client(server)
    assert api.list_manifests() == []
    assert api.counter.as_dict()["api"]["GET /manifests"] == 3


def test_persistent_server_errors_give_up_clearly(server: ScriptedServer):
    server.script = [(502, {"message": "bad gateway"}, {})] * 2
    with pytest.raises(ApiUnavailable, match="502"):
        client(server, attempts=2).list_manifests()


def test_client_errors_carry_the_server_message_without_retry(server: ScriptedServer):
    server.script = [(400, {"message": "packs: not a blob hash"}, {})]
    api = client(server)
    with pytest.raises(ApiError, match="not a blob hash") as raised:
        api.download_urls(["x"])
    assert raised.value.status == 400 and len(server.seen) == 1


def test_a_far_off_server_date_is_reported_as_clock_skew(server: ScriptedServer):
    server.check_signatures = False
    server_time = datetime.now(timezone.utc) + timedelta(hours=1)
    server.script = [(403, {"message": "Forbidden"}, {"Date": format_datetime(server_time, usegmt=True)})]
    with pytest.raises(ClockSkewError, match=r"host clock is off by 3[56]\d\d s \(behind"):
        client(server).list_manifests()


def test_a_signature_expired_message_is_reported_as_clock_skew(server: ScriptedServer):
    server.check_signatures = False
    server.script = [(403, {"message": "Signature expired: 20260101T000000Z is now earlier than ..."}, {})]
    with pytest.raises(ClockSkewError, match="host clock is off"):
        client(server).list_manifests()


def test_an_accepted_commit_is_polled_until_done(server: ScriptedServer):
    server.script = [
        (202, {"job_id": "job-1"}, {}),
        (202, {"job_id": "job-1", "state": "running"}, {}),
        (201, {"manifest_id": "20260101T000000Z-00000001", "job_id": "job-1", "state": "succeeded"}, {}),
    ]
    result = client(server).commit_manifest({"parent": None, "root": None, "snapshots": []})
    assert result["manifest_id"] == "20260101T000000Z-00000001"
    assert [path for _, path, _ in server.seen] == ["/manifests", "/jobs/job-1", "/jobs/job-1"]


def test_a_failed_commit_job_is_an_api_error(server: ScriptedServer):
    server.script = [
        (202, {"job_id": "job-2"}, {}),
        (422, {"message": "missing blobs", "job_id": "job-2", "state": "failed"}, {}),
    ]
    with pytest.raises(ApiError, match="missing blobs") as raised:
        client(server).commit_manifest({"parent": None, "root": None, "snapshots": []})
    assert raised.value.status == 422


def test_unreachable_api_is_reported(server: ScriptedServer):
    url = server.url
    server.shutdown()
    server.server_close()
    api = ApiClient(url, "us-east-1", Credentials(ACCESS_KEY, SECRET_KEY), attempts=2)
    with pytest.raises(ApiUnavailable, match="unreachable"):
        api.list_manifests()


def test_presigned_put_treats_412_as_already_stored(server: ScriptedServer):
    server.check_signatures = False
    server.script = [(200, {}, {}), (412, {}, {})]
    transfer = Transfer()
    assert (
        transfer.put_pack(server.url + "/packs/abc?X-Amz-Signature=s", {"If-None-Match": "*"}, b"pack")
        is True
    )
    assert (
        transfer.put_pack(server.url + "/packs/abc?X-Amz-Signature=s", {"If-None-Match": "*"}, b"pack")
        is False
    )
    assert transfer.counter.as_dict() == {"s3": {"put": 2}}


def test_list_follows_next_tokens_and_keeps_the_host(server: ScriptedServer):
    newer, older = {"manifest_id": "20260102T000000Z-00000000"}, {"manifest_id": "20260101T000000Z-00000000"}
    server.script = [
        (200, {"manifests": [newer], "next": "tok-1", "head": newer["manifest_id"]}, {}),
        (200, {"manifests": [older], "next": None, "head": newer["manifest_id"]}, {}),
    ]
    assert client(server).list_manifests(host="web-1") == [newer, older]
    first, second = (path for _, path, _ in server.seen)
    assert first == "/manifests?host=web-1&limit=1000"
    assert second == "/manifests?host=web-1&limit=1000&next=tok-1"


def test_latest_is_the_head_from_one_page(server: ScriptedServer):
    # Two commits in one second: the newest id is not the head; the head is still found on the page.
    head, same_second = (
        {"manifest_id": "20260101T000000Z-00000001"},
        {"manifest_id": "20260101T000000Z-ffffffff"},
    )
    server.script = [
        (200, {"manifests": [same_second, head], "next": "tok", "head": head["manifest_id"]}, {})
    ]
    api = client(server)
    assert api.latest_manifest() == head
    assert api.counter.as_dict()["api"]["GET /manifests"] == 1


def test_latest_follows_pages_until_the_head_and_none_without_one(server: ScriptedServer):
    head = {"manifest_id": "20260101T000000Z-00000001"}
    server.script = [
        (
            200,
            {
                "manifests": [{"manifest_id": "20260101T000000Z-ffffffff"}],
                "next": "tok",
                "head": "20260101T000000Z-00000001",
            },
            {},
        ),
        (200, {"manifests": [head], "next": None, "head": head["manifest_id"]}, {}),
        (200, {"manifests": [], "next": None, "head": None}, {}),
        (200, {"manifests": [], "next": None, "head": head["manifest_id"]}, {}),
    ]
    api = client(server)
    assert api.latest_manifest() == head
    assert api.latest_manifest() is None
    with pytest.raises(ApiError, match="not among"):
        api.latest_manifest()


def test_a_spooled_pack_is_sent_whole_on_every_attempt(server: ScriptedServer, tmp_path):
    server.check_signatures = False
    server.script = [(503, {}, {}), (200, {}, {})]  # the first attempt fails after reading the body
    spool = (tmp_path / "pack").open("w+b")
    spool.write(b"spooled pack bytes")  # left at its end, as PackWriter.finish_spool leaves it
    headers = {"If-None-Match": "*", "Content-Length": "18"}
    assert Transfer().put_pack(server.url + "/packs/abc?X-Amz-Signature=s", headers, spool) is True
    assert [body for _, _, body in server.seen] == [b"spooled pack bytes", b"spooled pack bytes"]
