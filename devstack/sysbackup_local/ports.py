"""Free loopback ports and waiting for servers to answer."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now; never the same twice in this process (several are picked at once)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        # weed derives nothing from these ports, but keep them below 55536 so port+10000 stays valid
        # for any component that still adds its usual gRPC offset.
        if port not in _handed_out and port < 55536:
            _handed_out.add(port)
            return port


class NotReady(RuntimeError):
    pass


def wait_for_http(url: str, timeout: float, process: subprocess.Popen[Any] | None = None) -> None:
    """Until `url` answers at all (any HTTP status counts), the process dies, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise NotReady(f"{url}: the process exited with {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError) as error:
            last_error = error
        time.sleep(0.1)
    raise NotReady(f"{url} did not answer within {timeout:.0f}s: {last_error}")
