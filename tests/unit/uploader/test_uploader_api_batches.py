"""Check and locate calls over more hashes than one request takes: split, sent in parallel, merged."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from botocore.credentials import Credentials
from s3_sysbackup.api import CHECK_BATCH, DOWNLOAD_BATCH, PARALLEL_CALLS, ApiClient, ApiError


class AnsweringServer(ThreadingHTTPServer):
    """Answers from the request itself: a hash is stored when it starts with "a"; one pack per hash."""

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
        elif path == "/blobs/check":
            status, answer = 200, {"stored": [h for h in request["hashes"] if h.startswith("a")]}
        else:
            locations = {h: {"pack_id": f"p{h}", "offset": 0} for h in request["blobs"]}
            status, answer = (
                200,
                {"locations": locations, "urls": {f"p{h}": f"u{h}" for h in request["blobs"]}},
            )
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


def test_check_splits_sends_in_parallel_and_merges(server: AnsweringServer) -> None:
    wanted = hashes(CHECK_BATCH * 5 + 7)
    api = client(server)
    assert api.check_blobs(wanted) == {h for h in wanted if h.startswith("a")}
    sent = [h for body in server.bodies for h in body["hashes"]]
    assert sorted(sent) == sorted(wanted)  # each hash asked once
    assert max(len(body["hashes"]) for body in server.bodies) <= CHECK_BATCH
    assert 1 < server.most_at_once <= PARALLEL_CALLS
    assert api.counter.as_dict() == {"api": {"POST /blobs/check": 6}}


def test_locate_merges_every_batch(server: AnsweringServer) -> None:
    wanted = hashes(DOWNLOAD_BATCH * 2 + 1)
    locations, urls = client(server).locate_blobs(wanted)
    assert set(locations) == set(wanted)
    assert urls == {f"p{h}": f"u{h}" for h in wanted}


def test_a_failing_batch_fails_the_call(server: AnsweringServer) -> None:
    server.fail_path = "/blobs/check"
    with pytest.raises(ApiError) as raised:
        client(server).check_blobs(hashes(CHECK_BATCH * 3))
    assert raised.value.status == 422
