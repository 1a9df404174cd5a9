"""Invocations go to the execution environment used last: Lambda reuses a warm one before starting one."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from sysbackup_local.supervisor import Supervisor, idle_environments


class CountingWorker(HTTPServer):
    """Answers /invoke like a worker and counts what it served."""

    def __init__(self) -> None:
        self.served = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def do_POST(handler) -> None:  # `self` is the server here
                handler.rfile.read(int(handler.headers["Content-Length"]))
                self.served += 1
                body = json.dumps({"result": {"served_by": self.server_address[1]}}).encode()
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def workers() -> Iterator[list[CountingWorker]]:
    servers = [CountingWorker(), CountingWorker()]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_sequential_invocations_reuse_the_warm_environment(workers: list[CountingWorker]) -> None:
    supervisor = object.__new__(Supervisor)  # the invocation logic only, without a stack behind it
    supervisor.usage, supervisor._usage_lock = {}, threading.Lock()
    supervisor._idle_workers = {"Fn": idle_environments([server.server_address[1] for server in workers])}

    answers = [supervisor.invoke("Fn", {"n": n}).result for n in range(3)]

    assert len({answer["served_by"] for answer in answers}) == 1  # one environment served all three
    assert sorted(server.served for server in workers) == [0, 3]
    assert supervisor.usage_snapshot()["Fn"]["invocations"] == 3
