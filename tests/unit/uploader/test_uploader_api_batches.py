"""Download-URL calls over more packs than one request takes: split, sent in parallel, merged."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.credentials import Credentials
from s3_sysbackup.api import DOWNLOAD_BATCH, PARALLEL_CALLS, ApiClient, ApiError


class AnsweringServer(ThreadingHTTPServer):
    """Answers from the request itself: a pack is served when its id starts with "a", else missing."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.most_at_once = 0
        self.fail_path: str | None = None
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: AnsweringServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with self.server.lock:
            self.server.bodies.append(request)
            self.server.in_flight += 1
            self.server.most_at_once = max(self.server.most_at_once, self.server.in_flight)
        time.sleep(0.05)  # long enough for parallel calls to overlap
        path = self.path.partition("?")[0]
        if path == self.server.fail_path:
            status, answer = 422, {"message": "no"}
        else:
            served = [p for p in request["packs"] if p.startswith("a")]
            answer = {
                "urls": {p: f"u{p}" for p in served},
                "sizes": {p: 100 for p in served},
                "missing": {p: "unknown" for p in request["packs"] if p not in served},
            }
            status = 200
        with self.server.lock:
            self.server.in_flight -= 1
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[AnsweringServer]:
    answering = AnsweringServer()
    thread = threading.Thread(target=answering.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield answering
    answering.shutdown()
    answering.server_close()


def client(server: AnsweringServer) -> ApiClient:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return ApiClient(url, "us-east-1", Credentials("AKIDHOST", "secret"), attempts=1)


def hashes(count: int) -> list[str]:
    return [f"{'ab'[n % 2]}{n:063d}" for n in range(count)]


def test_download_urls_split_send_in_parallel_and_merge(server: AnsweringServer) -> None:
    wanted = hashes(DOWNLOAD_BATCH * 5 + 7)
    api = client(server)
    downloads = api.download_urls(wanted)
    assert downloads.urls == {h: f"u{h}" for h in wanted if h.startswith("a")}
    assert set(downloads.missing) == {h for h in wanted if h.startswith("b")}
    sent = [h for body in server.bodies for h in body["packs"]]
    assert sorted(sent) == sorted(wanted)  # each pack asked once
    assert max(len(body["packs"]) for body in server.bodies) <= DOWNLOAD_BATCH
    assert 1 < server.most_at_once <= PARALLEL_CALLS
    assert api.counter.as_dict() == {"api": {"POST /downloads": 6}}


def test_no_packs_no_call(server: AnsweringServer) -> None:
    api = client(server)
    assert api.download_urls([]).urls == {}
    assert server.bodies == []


def test_a_failing_batch_fails_the_call(server: AnsweringServer) -> None:
    server.fail_path = "/downloads"
    with pytest.raises(ApiError) as raised:
        client(server).download_urls(hashes(DOWNLOAD_BATCH * 3))
    assert raised.value.status == 422
